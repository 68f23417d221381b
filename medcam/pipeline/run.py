"""Explaining cases: inference, ``explain_case`` (one case folder) and ``explain_cohort`` (via the cohort loop)."""

from __future__ import annotations

import copy
import itertools
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ModelError, TargetError
from ..frameworks.base import Framework
from ..frameworks.base import explain as explain_plan
from ..geometry import spacing_of
from ..hooks import is_size_mismatch
from ..result import CAMResult
from ..types import PathLike
from .adapters import model_failure, predicted_regions
from .cases import CaseSource, load_case, split_parts
from .cohort import run_cohort, source_inputs, write_case
from .errors import PipelineError
from .executors import Executor
from .models import LoadedModel
from .resume import fingerprint
from .settings import RunSettings, prepare
from .target_specs import TargetSpec, case_specs, check_masks_for_cohort

logger = logging.getLogger(__package__)  # "medcam.pipeline", as before the split

#: display names of the methods in :data:`medcam.METHODS`
METHOD_LABELS: dict[str, str] = {
    "gradcam": "Seg-Grad-CAM",
    "hirescam": "Seg-HiRes-Grad-CAM",
    "xgradcam": "Seg-XGrad-CAM",
    "gradcam++": "Seg-Grad-CAM++",
    "layercam": "Seg-LayerCAM",
    "micam": "Seg-MI-CAM",
    "migradcam": "Seg-MI-Grad-CAM",
}
#: BraTS modality used as overlay background per region (ET/TC are seen on T1ce, the oedema of WT on FLAIR)
_OVERLAY_CHANNEL = {"ET": "t1ce", "TC": "t1ce", "WT": "flair"}
SCORE_DEFINITION = (
    "S = sum over ROI voxels of the target channel's logit (blended output with sliding windows); maps: pre-ReLU on "
    "the layer grid -> trilinear upsampling -> ReLU, not normalised"
)


def _overlay_channel(case: Any, region: str) -> int:
    names = [str(n).lower() for n in case.channel_names]
    want = _OVERLAY_CHANNEL.get(region.upper())
    return names.index(want) if want in names else 0


def _file_stem(method: str, target: str) -> str:
    """``<method>_<target>`` as a file name: ``+`` -> ``pp``, characters other than letters, digits, ``.``, ``_``,
    ``-`` -> ``_`` (nnU-Net's label names hold spaces: ``tumor core`` -> ``hirescam_tumor_core``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{method.replace('+', 'pp')}_{target}")


@dataclass
class _Explained:
    """What the explanation of one case produced (before anything is written)."""

    case: Any
    model: LoadedModel
    specs: Sequence[TargetSpec]
    targets: list[Any]  # medcam.targets objects, one per spec
    output: torch.Tensor  # [1, C, *S] model output on the preprocessed grid
    results: dict[str, CAMResult]  # per method
    regions: list[str]  # one name per output channel
    timings: dict[str, Any]

    @property
    def first(self) -> CAMResult:
        return next(iter(self.results.values()))


def _explain_maps(
    case: Any,
    model: LoadedModel,
    methods: Sequence[str],
    specs: Sequence[TargetSpec],
    layer: str,
    inferer: Any,
    *,
    device: torch.device,
    amp: bool,
    threshold: float | None,
    progress: bool,
    source: CaseSource | None = None,
    graph_budget: int | None = None,
) -> _Explained:
    """Targets, prediction and every method's explanation of one case through the model's adapter (nothing
    written). The first explanation forms the prediction in its own pass (a whole image's one forward pass; a
    predicted region through MONAI's sliding window or nnU-Net's passes in one pass with its graphs kept within
    ``graph_budget`` bytes, :mod:`medcam.kept_graphs`; nnU-Net's fused prediction), which the others reuse; the
    adapter predicts first only when that explanation would not form it (e.g. mask targets in sliding windows).

    ``methods``: names of :data:`medcam.METHODS` or ``synth:FILE`` (results keyed ``synth-<stem>``)."""
    from ..methods import resolve_method

    method_classes = dict(resolve_method(m) for m in methods)  # key -> class ("synth:F" -> "synth-<stem>")
    adapter = model.adapter
    timings: dict[str, Any] = {"explain_s": {}}
    t0 = time.perf_counter()
    tl = adapter.targets(specs, case, source, threshold)
    n_image = tuple(case.image.shape[1:])
    output = adapter.predict(case, tl, inferer=inferer, device=device, amp=amp)
    timings["predict_s"] = round(time.perf_counter() - t0, 3)
    if output is not None:
        _check_output(output, n_image, specs)
    plan = adapter.plan(case, inferer=inferer, device=device)  # one plan, every method: the one executor
    results = {}
    for m, cls in method_classes.items():
        t0 = time.perf_counter()
        try:
            results[m] = explain_plan(
                adapter, cls, plan, tl, layer, output=output, amp=amp, progress=progress, graph_budget=graph_budget
            )
        except ModelError as e:  # the explanation's own pass may be the first network call (one pass)
            cause = e.__cause__
            if cause is None or not is_size_mismatch(cause):
                raise
            raise model_failure(cause, tuple(plan.image.shape), inferer is not None) from e
        timings["explain_s"][m] = round(time.perf_counter() - t0, 3)
        formed = results[m].output
        if output is None and formed is not None:  # the first explanation formed it (one pass, fused)
            output = formed
            _check_output(output, n_image, specs)
            timings["prediction"] = results[m].stats.get("prediction", "whole image")
    if output is None:  # pragma: no cover - every adapter's explanation returns its output
        raise ModelError("the explanation returned no model output")
    n_out = output.shape[1]
    names = list(adapter.output_names)
    regions = names if len(names) == n_out else [f"ch{i}" for i in range(n_out)]
    return _Explained(case, model, specs, tl, output, results, regions, timings)


def _check_output(output: torch.Tensor, spatial: tuple[int, ...], specs: Sequence[TargetSpec]) -> None:
    """The model output ``[1, C, *S]`` is on the case's grid and has every target's channel."""
    if tuple(output.shape[2:]) != spatial:
        raise ModelError(f"the model output {tuple(output.shape)} is not on the input grid {spatial}")
    n_out = output.shape[1]
    for s in specs:
        if s.channel >= n_out:
            raise TargetError(
                f"--target {s.text!r}: channel {s.channel} is out of range, the model has {n_out} outputs"
            )


def _target_rows(ex: _Explained) -> list[dict[str, Any]]:
    sp = spacing_of(ex.case.image.affine)
    voxel_ml = sp[0] * sp[1] * sp[2] / 1000.0
    rows = []
    for k, (spec, t) in enumerate(zip(ex.specs, ex.targets)):
        n = int(ex.first.roi_voxels[0, k])
        rows.append(
            {
                "name": spec.name,
                "spec": spec.text,
                "kind": spec.kind,
                "channel": spec.channel,
                "region": ex.regions[spec.channel],
                "target": repr(t),
                "roi_voxels": n,
                "roi_volume_ml": round(n * voxel_ml, 4),
                **{key: {} for key in ("score", "map_max", "map_sum", "heatmaps", "overlays")},
            }
        )
    return rows


def _write_method_maps(
    ex: _Explained, rows: list[dict[str, Any]], staging: Path, png: bool, figures: Mapping[str, Any] | None
) -> tuple[dict[str, Path], dict[str, np.ndarray], list[str], Any]:
    """Heatmaps (original grid) of every method and target, the PNG overlays and montage
    (:func:`medcam.io.case_figures.write_case_figures`, options ``figures``: ``shared_scale``, ``slice_at``); fills
    ``rows``; returns the heatmap files for the Slicer scene (by "<method> <target>"), the same maps as arrays on the
    original grid, the zero-map warnings and the figures record."""
    from ..io import save_heatmap
    from ..io.case_figures import MapEntry, figure_inputs, write_case_figures, zero_map_warnings

    case, layer = ex.case, ex.first.layer
    ref = Path(case.reference_path)
    roi_masks = [t.roi(ex.output)[0].cpu().numpy() > 0 for t in ex.targets]
    slicer_maps: dict[str, Path] = {}
    originals: dict[str, np.ndarray] = {}  # the same maps as arrays (DICOM outputs)
    entries: list[MapEntry] = []
    for m, res in ex.results.items():
        label = METHOD_LABELS.get(m, m)
        maps = res.maps[0].detach().float().cpu().numpy()  # [K, *S] preprocessed grid
        original = case.invert(maps)  # [K, *original]
        for k, (spec, row) in enumerate(zip(ex.specs, rows)):
            row["score"][m] = float(res.scores[0, k])
            row["map_max"][m] = float(maps[k].max())
            row["map_sum"][m] = float(maps[k].sum())
            row["heatmaps"][m] = f"heatmaps/{_file_stem(m, spec.name)}.nii.gz"
            save_heatmap(original[k], ref, staging / row["heatmaps"][m], method=label, target=spec.name, layer=layer)
            name = f"{m.replace('+', 'pp')} {spec.name}"
            slicer_maps[name] = staging / row["heatmaps"][m]  # referenced, not copied
            originals[name] = original[k]
            rel_png = f"overlays/{_file_stem(m, spec.name)}.png"
            entries.append(MapEntry(m, label, spec.name, original[k], rel_png))
            if png:
                row["overlays"][m] = rel_png
    warnings = zero_map_warnings(case.case_id, entries)
    written = None
    if png:
        written = write_case_figures(
            staging,
            entries,
            **figure_inputs(case, ex.specs, [ex.regions[s.channel] for s in ex.specs], roi_masks, _overlay_channel),
            roi_ml={r["name"]: r["roi_volume_ml"] for r in rows},
            layer=layer,
            segments=[f"predicted {r}" for r in ex.regions],  # the Slicer scene's segment names
            **dict(figures or {}),
        )
    return slicer_maps, originals, warnings, written


def _predicted_regions(ex: _Explained, threshold: float | None) -> np.ndarray:
    """0/1 prediction per output channel ``[C, *S]`` (:func:`medcam.pipeline.adapters.predicted_regions`)."""
    return predicted_regions(ex.output, ex.model.adapter.activation, threshold)


def _write_segmentation(ex: _Explained, staging: Path, threshold: float | None) -> dict[str, Any]:
    """``segmentation.nii.gz``: the adapter's segmentation on the original grid as an integer label map (the
    framework's own labels for softmax/argmax models and nnU-Net; for multi-label sigmoid models the value is
    ``sum 2^c`` over the channels ``c`` predicted at the voxel)."""
    from ..io.nifti import save_label_map

    seg = np.asarray(ex.model.adapter.segmentation(ex.case, ex.output, threshold))
    if seg.ndim == 4:  # region masks [C, *original] -> one bit per channel
        encoding = "bits: value = sum of 2**c over the output channels c predicted at the voxel"
        seg = sum((seg[c].astype(np.uint16) << c) for c in range(seg.shape[0]))
    else:
        encoding = "labels: the framework's own label values"
    save_label_map(seg, ex.case.reference_path, staging / "segmentation.nii.gz", description="medcam segmentation")
    return {"file": "segmentation.nii.gz", "dtype": "uint8", "encoding": encoding, "channels": ex.regions}


def _sliding_record(ex: _Explained, inferer: Any) -> dict[str, Any] | None:
    if inferer is None:
        return None
    return {
        "roi_size": list(inferer.roi_size),
        "overlap": inferer.overlap,
        "mode": str(inferer.mode),
        "sw_batch_size": inferer.sw_batch_size,
        "windows": ex.first.stats.get("windows"),
        "backward_windows": {m: r.stats.get("backward_windows") for m, r in ex.results.items()},
    }


def _dicom_outputs(
    ex: _Explained,
    staging: Path,
    maps: Mapping[str, np.ndarray],
    pred: np.ndarray,
    mode: str | None,
    display: Mapping[str, Any] | None,
) -> dict[str, Any] | None:
    """The case's DICOM objects (:func:`medcam.io.dicom_case.case_dicom`): every map, the predicted regions and
    the targets' ROIs, on the original grid."""
    from ..io.dicom_case import case_dicom, wants_dicom

    if mode is None or not wants_dicom(mode, Path(ex.case.reference_path)):
        return None
    inv = ex.case.invert(pred, nearest=True)
    regions = {f"predicted {r}": inv[c] for c, r in enumerate(ex.regions)}
    rois = np.stack([t.roi(ex.output)[0].float().cpu().numpy() for t in ex.targets])
    regions.update({f"ROI {s.name}": m for s, m in zip(ex.specs, ex.case.invert(rois, nearest=True))})
    model = f"{ex.model.kind} {ex.model.spec}"
    return case_dicom(
        staging / "dicom", ex.case, maps, regions, model=model, layer=ex.first.layer, mode=mode, display=display
    )


def _write_case_files(
    ex: _Explained,
    staging: Path,
    *,
    inferer: Any,
    threshold: float | None,
    slicer: bool,
    png: bool,
    device: torch.device,
    amp: bool,
    source: CaseSource | None,
    figures: Mapping[str, Any] | None = None,
    dicom: str | None = None,
) -> dict[str, Any]:
    """Write the maps, overlays, montage and Slicer scene of ``ex`` into ``staging``; return the case summary."""
    from ..io import export_slicer_scene
    from ..io.case_figures import scene_images
    from ..io.dicom_scene import scene_inputs

    t0 = time.perf_counter()
    case, rows = ex.case, _target_rows(ex)
    slicer_maps, originals, warnings, written = _write_method_maps(ex, rows, staging, png, figures)
    pred = _predicted_regions(ex, threshold)
    dicom_record = _dicom_outputs(ex, staging, originals, pred, dicom, (written or {}).get("display"))
    seg_record = _write_segmentation(ex, staging, threshold)
    if slicer:
        with scene_inputs(scene_images(case), staging / ".scene-inputs") as images:  # DICOM folders as NIfTI
            export_slicer_scene(
                staging / "slicer",
                **images,
                heatmaps=slicer_maps,
                segmentation=case.invert(pred, nearest=True),
                segment_names=[f"predicted {r}" for r in ex.regions],
                method="+".join(ex.results),
                layer=ex.first.layer,
                display=(written or {}).get("display"),
            )
    ex.timings["write_s"] = round(time.perf_counter() - t0, 3)
    return {
        "source": source.describe() if source is not None else {k: str(v) for k, v in case.paths.items()},
        "reference_image": str(case.reference_path),
        "channels": list(case.channel_names),
        "original_shape": list(case.original_shape),
        "preprocessed_shape": list(case.image.shape[1:]),
        "preprocessed_spacing_mm": [round(v, 4) for v in spacing_of(case.image.affine)],
        "model": ex.model.describe(),
        "layer": ex.first.layer,
        "feature_shape": list(ex.first.feature_shape),
        "methods": {m: METHOD_LABELS.get(m, m) for m in ex.results},
        "score_definition": SCORE_DEFINITION,
        "sliding_window": _sliding_record(ex, inferer),
        "threshold": 0.5 if threshold is None and ex.model.activation in ("sigmoid", "none") else threshold,
        "predicted_voxels": {ex.regions[c]: int(pred[c].sum()) for c in range(pred.shape[0])},
        "segmentation": seg_record,
        "targets": rows,
        "slicer_scene": "slicer/scene.mrml" if slicer else None,
        "dicom": dicom_record,
        "figures": written,
        "warnings": warnings,
        "device": str(device),
        "amp": bool(amp),
        "timings": ex.timings,
    }


def explain_case(
    case: Any,
    model: LoadedModel | nn.Module,
    methods: Sequence[str],
    targets: Sequence[TargetSpec],
    layer: str | None = None,
    inferer: Any = None,
    out_dir: PathLike = "medcam-out",
    *,
    device: str | torch.device = "cpu",
    amp: bool = False,
    threshold: float | None = None,
    overwrite: bool = False,
    slicer: bool = True,
    png: bool = True,
    progress: bool = False,
    settings: Mapping[str, Any] | None = None,
    source: CaseSource | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Explain one preprocessed case and write its folder ``out_dir`` (see :mod:`medcam.pipeline`).

    Args:
        case: a loaded case (``case.image`` ``[C, X, Y, Z]`` MetaTensor, ``case.invert``, ``case.reference_path``).
        model: a :class:`LoadedModel` (or a bare ``nn.Module``: sigmoid outputs, unnamed channels).
        methods: names from :data:`medcam.METHODS` (``"hirescam"``, ``"gradcam"``, ...) or ``synth:FILE`` (a saved
            SyCAM expression; files named ``synth-<stem>``).
        targets: parsed target specs (:func:`parse_targets`).
        layer: dotted layer name, ``"auto"``, or None for the model's default.
        inferer: ``SlidingWindowInferer`` or None (whole image; spatial sizes must suit the network).
        out_dir: the case folder to create. Written in a hidden staging folder beside it and moved into place when
            complete, so a crash never leaves a half-written case.
        device, amp: where and how to run (amp: autocast, bf16 on CPU).
        threshold: probability threshold of predicted/component targets (None: 0.5 sigmoid / argmax softmax).
        overwrite: replace an existing case folder written by medcam.
        slicer, png: also write the Slicer folder / PNG overlays.
        progress: tqdm bars over sliding windows.
        settings: run settings recorded in the summary (and compared on resume); its ``"figures"`` entry
            (``shared_scale``, ``slice_at``) sets the PNGs' options.
        source: where the case came from (recorded in the summary).
        inputs: :func:`medcam.pipeline.resume.fingerprint` of the case's files (recorded as ``inputs``; the
            resume rule compares it). Default: the fingerprint of ``case.paths``.

    Returns:
        The summary dict (also written as ``out_dir/summary.json``). Per target: ``roi_voxels`` (preprocessed
        grid), ``roi_volume_ml``, ``score`` (explained score ``S = sum_ROI y`` in logit units, per method),
        ``map_max`` / ``map_sum`` (per method, preprocessed grid), relative paths of the written files.
    """
    from .. import METHODS

    t_start = time.perf_counter()
    if not isinstance(model, LoadedModel):
        model = LoadedModel(net=model, kind=Framework.MODULE, spec=type(model).__name__)
    unknown = [m for m in methods if m not in METHODS and not m.startswith("synth:")]
    if unknown or not methods:
        raise PipelineError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)} or synth:FILE")
    if Path(out_dir).exists() and not overwrite:
        raise PipelineError(f"output folder '{out_dir}' already exists; pass --overwrite to replace it")
    dev = torch.device(device)

    def work(staging: Path) -> dict[str, Any]:
        ex = _explain_maps(
            case, model, methods, targets, layer or model.default_layer, inferer,
            device=dev, amp=amp, threshold=threshold, progress=progress, source=source,
            graph_budget=(settings or {}).get("graph_budget"),
        )  # fmt: skip
        summary = _write_case_files(
            ex, staging, inferer=inferer, threshold=threshold, slicer=slicer, png=png, device=dev, amp=amp,
            source=source, figures=(settings or {}).get("figures"), dicom=(settings or {}).get("dicom"),
        )  # fmt: skip
        ex.timings["total_s"] = round(time.perf_counter() - t_start, 3)
        return summary

    if inputs is None:
        masks = [s.path for s in targets if s.kind == "mask" and not s.is_template and s.path]
        inputs = source_inputs(source, masks) if source is not None else fingerprint(dict(case.paths))
    summary = write_case(work, case.case_id, out_dir, settings=settings or {}, overwrite=overwrite, inputs=inputs)
    logger.info("case %s done in %.1f s -> %s", case.case_id, summary["timings"]["total_s"], out_dir)
    return summary


@dataclass
class ExplainWork:
    """``medcam explain``'s work on one case of a cohort (a :data:`~medcam.pipeline.cohort.CaseWork`), picklable: what
    :func:`explain_cohort` hands to the cohort loop and, through it, to every worker of an executor.

    ``work(source, staging)`` loads the case, explains it and writes its files into ``staging``; the loop
    (:func:`~medcam.pipeline.cohort.process_case`) does resume, the staging folder and the failure record.
    """

    model: LoadedModel
    methods: Sequence[str]
    targets: Sequence[TargetSpec]
    layer: str | None
    inferer: Any
    out_dir: Path
    device: str = "cpu"
    amp: bool = False
    threshold: float | None = None
    overwrite: bool = False
    slicer: bool = True
    png: bool = True
    settings: Mapping[str, Any] = field(default_factory=dict)
    window_progress: bool = False
    #: per case: its target specs (mask templates filled in), or the error that fails that case
    specs_of: Mapping[str, Any] = field(default_factory=dict)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled with the model on the CPU (a worker may have no GPU); the caller's model is not moved."""
        state = self.__dict__.copy()
        net = self.model.net
        if self.model.framework_adapter is not None:  # an adapter that pickles itself (nnU-Net: without its model)
            state["model"] = replace(self.model, net=nn.Identity())  # its network comes back with the adapter's setup
            return state
        if any(t.device.type != "cpu" for t in itertools.chain(net.parameters(), net.buffers())):
            state["model"] = replace(self.model, net=copy.deepcopy(net).cpu())
        return state

    def setup(self, device: str | None = None) -> ExplainWork:
        """This work on ``device`` (the model moved there once); None: the configured device, as it is."""
        if device is None or device == self.device:
            return self
        adapter = self.model.adapter.setup(device)  # a worker's own unpickled copy, moved (or loaded) once
        return replace(self, device=device, model=replace(self.model, net=adapter.network))

    def __call__(self, src: CaseSource, staging: Path) -> dict[str, Any]:
        t_start = time.perf_counter()
        specs = self.specs_of.get(src.case_id, self.targets)
        if isinstance(specs, Exception):
            raise specs
        case = load_case(src, self.model)
        dev = torch.device(self.device)
        ex = _explain_maps(
            case, self.model, self.methods, specs, self.layer or self.model.default_layer, self.inferer,
            device=dev, amp=self.amp, threshold=self.threshold, progress=self.window_progress, source=src,
            graph_budget=self.settings.get("graph_budget"),
        )  # fmt: skip
        summary = _write_case_files(
            ex, staging, inferer=self.inferer, threshold=self.threshold, slicer=self.slicer, png=self.png,
            device=dev, amp=self.amp, source=src, figures=self.settings.get("figures"),
            dicom=self.settings.get("dicom"),
        )  # fmt: skip
        ex.timings["total_s"] = round(time.perf_counter() - t_start, 3)
        logger.info("case %s done in %.1f s", src.case_id, ex.timings["total_s"])
        return summary


def explain_cohort(
    cases: Sequence[CaseSource],
    model: LoadedModel,
    methods: Sequence[str],
    targets: Sequence[TargetSpec],
    layer: str | None = None,
    inferer: Any = None,
    out_dir: PathLike = "medcam-out",
    *,
    num_parts: int = 1,
    part_id: int = 0,
    device: str | torch.device = "cpu",
    amp: bool = False,
    threshold: float | None = None,
    overwrite: bool = False,
    slicer: bool = True,
    png: bool = True,
    progress: bool = True,
    settings: Mapping[str, Any] | None = None,
    on_case: Callable[[dict[str, Any]], None] | None = None,
    executor: str | Executor | None = None,
) -> dict[str, Any]:
    """Explain many cases into ``out_dir/<case_id>/``, resumably; failures are recorded, not fatal.

    The loop is :func:`medcam.pipeline.cohort.run_cohort`:

    * The resume rule (:mod:`medcam.pipeline.resume`): a case folder whose ``summary.json`` records the same input
      files (resolved paths, sizes, modification times) and the same settings is skipped (``"skipped"``). Any other
      existing folder under a case id of this run - another case, edited inputs, other settings, not medcam's - is
      a conflict: the whole run is refused BEFORE anything is written (PipelineError). With ``overwrite`` every
      existing case folder written by medcam is redone and replaced.
    * The output folder must be writable (checked before the first case); staging folders left by killed runs are
      removed.
    * A case that raises is recorded as ``"failed"`` with ``"error"`` and the run goes on; nothing of it is left
      on disk, so the next run retries it. A ``KeyboardInterrupt`` (Ctrl-C; SIGTERM under
      :func:`medcam.signals.stop_on_signals`) abandons the current case and propagates.
    * ``num_parts``/``part_id`` pick this machine's share (:func:`~medcam.pipeline.split_parts`).
    * Per-case targets: ``mask:`` templates are filled in per case, ``label:`` reads the case's label file; one
      mask file for several cases is refused.

    ``executor``: who explains the cases that are not done yet: None/``"local"`` this process, one after the other;
    ``"ray"`` a Ray cluster (:class:`~medcam.pipeline.ray_executor.RayExecutor` with its defaults: a local Ray
    instance, one worker per GPU or CPU); or an executor object, e.g. ``RayExecutor("auto", gpus_per_worker=0.5)``.
    Every executor runs the same per-case function (:class:`ExplainWork` through
    :func:`~medcam.pipeline.cohort.process_case`), so case folders and the run summary have the same content
    whichever is used; resume is decided before the executor.

    Returns:
        The run summary (also written to ``out_dir/cohort_summary.json``, or
        ``cohort_summary.part<i>-of-<N>.json`` for a split run): ``cases`` [{case_id, status, error, seconds,
        summary}] in cohort order, counts ``ok``/``skipped``/``failed``.
    """
    mine = split_parts(cases, num_parts, part_id)
    single = len(mine) == 1  # one case: bars over its windows instead
    # decided before anything is written: a refused run touches nothing
    check_masks_for_cohort(targets, len(cases))
    specs_of, inputs = _cohort_inputs(mine, targets)
    settings = dict(settings or {})
    work = ExplainWork(
        model, list(methods), list(targets), layer, inferer, Path(out_dir), str(device), amp, threshold, overwrite,
        slicer, png, settings, window_progress=progress and single, specs_of=specs_of,
    )  # fmt: skip
    return run_cohort(
        cases, work, out_dir, settings=settings, num_parts=num_parts, part_id=part_id,
        overwrite=overwrite, progress=progress, on_case=on_case, executor=executor, inputs=inputs,
    )  # fmt: skip


def _cohort_inputs(
    cases: Sequence[CaseSource], targets: Sequence[TargetSpec]
) -> tuple[dict[str, list[TargetSpec] | Exception], dict[str, dict[str, Any]]]:
    """Per case: its target specs (mask templates filled in; the error instead when its mask is missing) and the
    fingerprint of every file it is made of (images, label, per-case masks)."""
    from ..data.loading import MedcamDataError
    from ..errors import MedcamError

    specs_of: dict[str, list[TargetSpec] | Exception] = {}
    inputs: dict[str, dict[str, Any]] = {}
    for src in cases:
        specs: list[TargetSpec]
        try:
            specs = case_specs(targets, src)
        except MedcamError as e:
            specs_of[src.case_id], specs = e, list(targets)
        else:
            specs_of[src.case_id] = specs
        masks = [s.path for s in specs if s.kind == "mask" and not s.is_template and s.path]
        files: dict[str, Any] = dict(src.files) or {"folder": Path(str(src.source))}
        if not src.files and not isinstance(specs_of[src.case_id], Exception):
            try:  # a broken case folder: its failure is reported when it is run
                src.require_files()
            except MedcamDataError as e:
                specs_of[src.case_id] = e
        files.update({f"mask{i}": Path(m) for i, m in enumerate(masks)})
        inputs[src.case_id] = fingerprint(files)
    return specs_of, inputs


def explain_files(
    inputs: Sequence[str],
    settings: RunSettings,
    output: PathLike = "medcam-out",
    *,
    num_parts: int = 1,
    part_id: int = 0,
    slicer: bool = True,
    png: bool = True,
    shared_scale: bool = True,
    slice_at: str = "roi",
    executor: str | Executor | None = None,
    dicom: str = "auto",
) -> dict[str, Any]:
    """What ``medcam explain`` does: check everything (:func:`~medcam.pipeline.prepare`), then
    :func:`explain_cohort` over the cases of this part (on ``executor``). Returns the run summary.

    ``shared_scale``, ``slice_at``: the pictures' colour scale (one per method, else one per picture) and slice choice
    (``roi``, ``max`` or ``x,y,z`` in RAS mm).
    ``dicom``: DICOM outputs (:mod:`medcam.io.dicom_case`): ``auto`` for DICOM-series cases, ``on``, ``off``."""
    from ..errors import MedcamError
    from ..geometry import parse_slice_at
    from ..io.dicom_case import check_dicom_cases

    try:
        parse_slice_at(slice_at)  # roi, max or x,y,z (RAS mm)
    except MedcamError as e:
        raise PipelineError(str(e)) from None
    p = prepare(inputs, settings, num_parts=num_parts, part_id=part_id, allow_synth=True)
    check_dicom_cases(p.cases, dicom)  # an unknown DICOM output mode is refused before the first case
    if len(p.layers) != 1:
        raise PipelineError(f"explain takes one layer, got {p.layers}")
    record = {
        **p.record(settings), "slicer": slicer, "png": png,
        "figures": {"shared_scale": shared_scale, "slice_at": slice_at} if png else None, "dicom": dicom,
    }  # fmt: skip
    return explain_cohort(
        p.cases, p.model, p.methods, p.specs, p.layers[0], p.inferer, output, num_parts=num_parts,
        part_id=part_id, device=p.device, amp=settings.amp, threshold=settings.threshold,
        overwrite=settings.overwrite, slicer=slicer, png=png, progress=settings.progress, settings=record,
        executor=executor,
    )  # fmt: skip
