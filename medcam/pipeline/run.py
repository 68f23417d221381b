"""Running explanations: inference, ``explain_case`` / ``explain_cohort``, case summaries and versions."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..errors import ModelError, TargetError
from .cases import CaseSource, load_case, split_parts
from .common import PathLike, _jsonable
from .errors import PipelineError
from .models import LoadedModel
from .resume import case_input_files, check_writable, fingerprint, plan_cohort, remove_stale_staging, staging_dir
from .target_specs import TargetSpec, build_targets, case_specs, check_masks_for_cohort

logger = logging.getLogger(__package__)  # "medcam.pipeline", as before the split

#: display names of the methods in :data:`medcam.METHODS`
METHOD_LABELS: dict[str, str] = {
    "gradcam": "Seg-Grad-CAM",
    "hirescam": "Seg-HiRes-Grad-CAM",
    "xgradcam": "Seg-XGrad-CAM",
    "gradcam++": "Seg-Grad-CAM++",
    "layercam": "Seg-LayerCAM",
}
SUMMARY_NAME = "summary.json"
#: BraTS modality used as overlay background per region (ET/TC are seen on T1ce, the oedema of WT on FLAIR)
_OVERLAY_CHANNEL = {"ET": "t1ce", "TC": "t1ce", "WT": "flair"}


#: sliding-window settings used when neither the command line nor the model (a bundle's inferer) gives them
SLIDING_DEFAULTS: dict[str, Any] = {"overlap": 0.25, "sw_batch_size": 1, "mode": "constant"}


def sliding_settings(model_settings: dict[str, Any], **given: Any) -> dict[str, Any]:
    """``overlap``/``sw_batch_size``/``mode``: what was given (not None), else the model's, else the defaults."""
    out = {**SLIDING_DEFAULTS, **model_settings}
    out.update({k: v for k, v in given.items() if v is not None})
    return out


def make_inferer(
    roi_size: Sequence[int] | None,
    *,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    mode: str = "constant",
    progress: bool = False,
) -> Any:
    """A MONAI ``SlidingWindowInferer`` (or None for whole-image explanation when ``roi_size`` is None/empty)."""
    if not roi_size:
        return None
    from monai.inferers import SlidingWindowInferer

    if any(int(s) < 1 for s in roi_size):
        raise PipelineError(f"roi size must be positive integers, got {tuple(roi_size)}")
    if not 0 <= overlap < 1:
        raise PipelineError(f"overlap must be in [0, 1), got {overlap}")
    if mode not in ("constant", "gaussian"):
        raise PipelineError(f"blend mode must be 'constant' or 'gaussian', got {mode!r}")
    return SlidingWindowInferer(
        tuple(int(s) for s in roi_size),
        sw_batch_size=int(sw_batch_size),
        overlap=float(overlap),
        mode=mode,
        progress=progress,
    )


def predict(net: nn.Module, image: torch.Tensor, inferer: Any, *, amp: bool = False) -> torch.Tensor:
    """Model output ``[B, C, *S]`` (float32 logits, detached): ``inferer(image, net)`` or ``net(image)``."""
    from ..engine import BaseSegCAM

    helper = BaseSegCAM(net, layer="auto", amp=amp)  # reuse autocast and output selection
    try:
        with torch.no_grad(), helper.autocast(image.device):
            out = inferer(image, lambda x: helper.select_output(net(x))) if inferer is not None else net(image)
    except RuntimeError as e:
        raise model_failure(e, tuple(image.shape), inferer is not None) from e
    out = helper.select_output(out)
    out = out.as_tensor() if hasattr(out, "as_tensor") else out
    return out.detach().float()


def model_failure(error: BaseException, shape: tuple[int, ...], sliding: bool) -> ModelError:
    """The network failed on a preprocessed case: say so, with the command-line fix for a volume-size mismatch."""
    from ..engine import is_size_mismatch

    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = f"the model failed on the preprocessed case of shape {shape} ({type(error).__name__}: {first[:300]})"
    if is_size_mismatch(error):
        where = "each window (--roi-size)" if sliding else "the volume"
        text += (
            f"; the network needs spatial sizes divisible by its total downsampling factor: pad {where} with "
            "--divisible-by 16 (2^levels of the encoder; 8 or 32 for other depths)"
            + (", and choose an --roi-size divisible by it" if sliding else ", or use --roi-size")
        )
    return ModelError(text)


def resolve_device(name: str) -> str:
    """``"auto"`` -> ``"cuda"`` if available else ``"cpu"``; other names are checked (PipelineError if unusable)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise PipelineError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return name


def spacing_of(affine: Any) -> tuple[float, float, float]:
    """Voxel spacing (mm) along each axis of a 4x4 affine (tensor or array): the column norms of its 3x3 part."""
    a = np.asarray(affine.detach().cpu() if hasattr(affine, "detach") else affine, float)
    return tuple(float(v) for v in np.linalg.norm(a[:3, :3], axis=0))


def versions() -> dict[str, str]:
    """Versions of medcam and the libraries that shape its results."""
    import monai
    import nibabel

    return {
        "medcam": __version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "nibabel": nibabel.__version__,
        "python": platform.python_version(),
    }


def _overlay_channel(case: Any, region: str) -> int:
    names = [str(n).lower() for n in case.channel_names]
    want = _OVERLAY_CHANNEL.get(region.upper())
    return names.index(want) if want in names else 0


def _settings_signature(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_jsonable(settings), sort_keys=True).encode()).hexdigest()[:16]


def read_summary(case_dir: PathLike) -> dict[str, Any] | None:
    """The ``summary.json`` of a finished case folder, or None if absent/unreadable/not medcam's."""
    p = Path(case_dir) / SUMMARY_NAME
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "medcam_version" in data else None


def _replace_dir(staging: Path, final: Path, overwrite: bool) -> None:
    """Move the finished staging folder onto ``final`` (replacing a previous medcam output only if allowed)."""
    if final.exists():
        if not overwrite:
            raise PipelineError(f"output folder '{final}' already exists; pass --overwrite to replace it")
        if read_summary(final) is None:
            raise PipelineError(f"'{final}' exists and is not a medcam output folder; refusing to replace it")
        old = final.parent / f".old-{uuid.uuid4().hex[:8]}-{final.name}"
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)


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
    """Explain one preprocessed case and write its folder ``out_dir`` (see the module docstring).

    Args:
        case: a loaded case (``case.image`` ``[C, X, Y, Z]`` MetaTensor, ``case.invert``, ``case.reference_path``).
        model: a :class:`LoadedModel` (or a bare ``nn.Module``: sigmoid outputs, unnamed channels).
        methods: names from :data:`medcam.METHODS` (``"hirescam"``, ``"gradcam"``, ...).
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
        settings: run settings recorded in the summary (and compared on resume).
        source: where the case came from (recorded in the summary).
        inputs: :func:`medcam.pipeline.resume.fingerprint` of the case's files (recorded as ``inputs``; the
            resume rule compares it). Default: the fingerprint of ``case.paths``.

    Returns:
        The summary dict (also written as ``out_dir/summary.json``). Per target: ``roi_voxels`` (preprocessed
        grid), ``roi_volume_ml``, ``score`` (explained score ``S = sum_ROI y`` in logit units, per method),
        ``map_max`` / ``map_sum`` (per method, preprocessed grid), relative paths of the written files.
    """
    from .. import METHODS
    from ..io import export_slicer_scene, save_heatmap, save_overlay_png

    t_start = time.perf_counter()
    if not isinstance(model, LoadedModel):
        model = LoadedModel(net=model, kind="module", spec=type(model).__name__)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise PipelineError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    layer = layer or model.default_layer
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise PipelineError(f"output folder '{out_dir}' already exists; pass --overwrite to replace it")
    device = torch.device(device)
    net = model.net.to(device)
    timings: dict[str, Any] = {}

    t0 = time.perf_counter()
    tl = build_targets(targets, case, activation=model.activation, threshold=threshold)
    image = case.image.as_tensor() if hasattr(case.image, "as_tensor") else torch.as_tensor(case.image)
    image = image[None].float().to(device)
    output = predict(net, image, inferer, amp=amp)
    timings["predict_s"] = round(time.perf_counter() - t0, 3)
    if output.shape[2:] != image.shape[2:]:
        raise ModelError(f"the model output {tuple(output.shape)} is not on the input grid {tuple(image.shape)}")
    n_out = output.shape[1]
    regions = list(model.regions) if len(model.regions) == n_out else [f"ch{i}" for i in range(n_out)]
    for s in targets:
        if s.channel >= n_out:
            raise TargetError(
                f"--target {s.text!r}: channel {s.channel} is out of range, the model has {n_out} outputs"
            )

    results = {}
    timings["explain_s"] = {}
    for m in methods:
        t0 = time.perf_counter()
        cam = METHODS[m](
            net, layer=layer, inferer=inferer, amp=amp, output_activation=model.activation, progress=progress
        )
        res = cam.explain(image, tl, output=output if inferer is not None else None)
        timings["explain_s"][m] = round(time.perf_counter() - t0, 3)
        results[m] = res

    # ---- write everything into a staging folder
    t0 = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(out_dir)
    staging.mkdir()
    try:
        first = results[methods[0]]
        layer_name = first.layer
        sp = spacing_of(case.image.affine)
        voxel_ml = sp[0] * sp[1] * sp[2] / 1000.0
        ref = Path(case.reference_path)
        target_rows = []
        roi_masks = [t.roi(output)[0].cpu().numpy() > 0 for t in tl]
        slicer_maps: dict[str, np.ndarray] = {}
        for k, (spec, t) in enumerate(zip(targets, tl)):
            target_rows.append(
                {
                    "name": spec.name,
                    "spec": spec.text,
                    "kind": spec.kind,
                    "channel": spec.channel,
                    "region": regions[spec.channel],
                    "target": repr(t),
                    "roi_voxels": int(first.roi_voxels[0, k]),
                    "roi_volume_ml": round(int(first.roi_voxels[0, k]) * voxel_ml, 4),
                    "score": {},
                    "map_max": {},
                    "map_sum": {},
                    "heatmaps": {},
                    "overlays": {},
                }
            )
        for m, res in results.items():
            maps = res.maps[0].detach().float().cpu().numpy()  # [K, *S] preprocessed grid
            original = case.invert(maps)  # [K, *original]
            for k, (spec, row) in enumerate(zip(targets, target_rows)):
                row["score"][m] = float(res.scores[0, k])
                row["map_max"][m] = float(maps[k].max())
                row["map_sum"][m] = float(maps[k].sum())
                rel = f"heatmaps/{m.replace('+', 'pp')}_{spec.name}.nii.gz"
                save_heatmap(
                    original[k], ref, staging / rel, method=METHOD_LABELS.get(m, m), target=spec.name, layer=layer_name
                )
                row["heatmaps"][m] = rel
                slicer_maps[f"{m.replace('+', 'pp')} {spec.name}"] = original[k]
                if png:
                    rel_png = f"overlays/{m.replace('+', 'pp')}_{spec.name}.png"
                    ch = _overlay_channel(case, regions[spec.channel])
                    bg = case.image[ch].detach().cpu().numpy() if hasattr(case.image, "detach") else case.image[ch]
                    save_overlay_png(
                        bg,
                        maps[k],
                        roi_masks[k],
                        staging / rel_png,
                        title=f"{case.case_id} | {METHOD_LABELS.get(m, m)} | target {spec.name} | layer {layer_name}"
                        f" | ROI contour, background {case.channel_names[ch]}",
                        spacing=sp,
                    )
                    row["overlays"][m] = rel_png
        # predicted regions (0/1 per output channel) on the original grid, for the summary and Slicer
        if model.activation == "sigmoid":
            pred = (torch.sigmoid(output[0]) > (0.5 if threshold is None else threshold)).float()
        elif model.activation == "none":  # the outputs already are probabilities
            pred = (output[0] > (0.5 if threshold is None else threshold)).float()
        else:
            pred = torch.nn.functional.one_hot(output[0].argmax(0), n_out).movedim(-1, 0).float()
        pred_np = pred.cpu().numpy()
        prediction = {regions[c]: int(pred_np[c].sum()) for c in range(n_out)}
        slicer_rel = None
        if slicer:
            pred_orig = case.invert(pred_np, nearest=True)
            export_slicer_scene(
                staging / "slicer",
                image_path=ref,
                heatmaps=slicer_maps,
                segmentation=pred_orig,
                segment_names=[f"predicted {r}" for r in regions],
                method="+".join(methods),
                layer=layer_name,
            )
            slicer_rel = "slicer/scene.mrml"
        timings["write_s"] = round(time.perf_counter() - t0, 3)
        timings["total_s"] = round(time.perf_counter() - t_start, 3)
        summary = {
            "medcam_version": __version__,
            "status": "ok",
            "case_id": case.case_id,
            "source": source.describe() if source is not None else {k: str(v) for k, v in case.paths.items()},
            "reference_image": str(ref),
            "channels": list(case.channel_names),
            "original_shape": list(case.original_shape),
            "preprocessed_shape": list(case.image.shape[1:]),
            "preprocessed_spacing_mm": [round(v, 4) for v in sp],
            "model": model.describe(),
            "layer": layer_name,
            "feature_shape": list(first.feature_shape),
            "methods": {m: METHOD_LABELS.get(m, m) for m in methods},
            "score_definition": "S = sum over ROI voxels of the target channel's logit (blended output with "
            "sliding windows); maps: pre-ReLU on the layer grid -> trilinear upsampling -> ReLU, "
            "not normalised",
            "sliding_window": None
            if inferer is None
            else {
                "roi_size": list(inferer.roi_size),
                "overlap": inferer.overlap,
                "mode": str(inferer.mode),
                "sw_batch_size": inferer.sw_batch_size,
                "windows": first.stats.get("windows"),
                "backward_windows": {m: r.stats.get("backward_windows") for m, r in results.items()},
            },
            "threshold": 0.5 if threshold is None and model.activation in ("sigmoid", "none") else threshold,
            "predicted_voxels": prediction,
            "targets": target_rows,
            "slicer_scene": slicer_rel,
            "device": str(device),
            "amp": bool(amp),
            "timings": timings,
            "versions": versions(),
            "settings": _jsonable(dict(settings or {})),
            "settings_signature": _settings_signature(settings or {}),
            "inputs": dict(inputs) if inputs is not None else fingerprint(dict(case.paths)),
        }
        from ..io import write_text_atomic

        write_text_atomic(staging / SUMMARY_NAME, json.dumps(_jsonable(summary), indent=2) + "\n")
        _replace_dir(staging, out_dir, overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("case %s done in %.1f s -> %s", case.case_id, timings["total_s"], out_dir)
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
) -> dict[str, Any]:
    """Explain many cases into ``out_dir/<case_id>/``, resumably; failures are recorded, not fatal.

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
    * ``num_parts``/``part_id`` pick this machine's share (:func:`split_parts`).
    * Per-case targets: ``mask:`` templates are filled in per case, ``label:`` reads the case's label file; one
      mask file for several cases is refused.

    Returns:
        The run summary (also written to ``out_dir/cohort_summary.json``, or
        ``cohort_summary.part<i>-of-<N>.json`` for a split run): ``cases`` [{case_id, status, error, seconds,
        summary}], counts ``ok``/``skipped``/``failed``.
    """
    from tqdm.auto import tqdm

    from ..io import write_text_atomic

    out_dir = Path(out_dir)
    mine = split_parts(cases, num_parts, part_id)
    settings = dict(settings or {})
    signature = _settings_signature(settings)
    run_name = "cohort_summary.json" if num_parts == 1 else f"cohort_summary.part{part_id}-of-{num_parts}.json"
    run_path = out_dir / run_name
    if run_path.exists() and json_key(run_path, "medcam_version") is None:
        raise PipelineError(f"'{run_path}' exists and was not written by medcam; refusing to overwrite it")
    # everything decided before anything is written: a refused run touches nothing
    check_masks_for_cohort(targets, len(cases))
    specs_of, inputs = _cohort_inputs(mine, targets)
    plan = plan_cohort(mine, out_dir, inputs, signature, overwrite)
    check_writable(out_dir)
    remove_stale_staging(out_dir)
    single = len(mine) == 1
    records = []
    bar = tqdm(mine, desc="medcam cases", unit="case", disable=not progress or single)
    for src in bar:
        bar.set_postfix_str(src.case_id)
        t0 = time.perf_counter()
        case_dir = out_dir / src.case_id
        rec: dict[str, Any] = {"case_id": src.case_id, "source": src.describe()}
        try:
            if plan[src.case_id] == "done":
                rec.update(status="skipped", summary=f"{src.case_id}/{SUMMARY_NAME}")
                logger.info("case %s already done (same inputs and settings): skipped", src.case_id)
            else:
                specs = specs_of[src.case_id]
                if isinstance(specs, Exception):
                    raise specs
                case = load_case(src, model)
                explain_case(
                    case,
                    model,
                    methods,
                    specs,
                    layer,
                    inferer,
                    case_dir,
                    device=device,
                    amp=amp,
                    threshold=threshold,
                    overwrite=plan[src.case_id] == "redo",
                    slicer=slicer,
                    png=png,
                    progress=progress and single,
                    settings=settings,
                    source=src,
                    inputs=inputs[src.case_id],
                )
                rec.update(status="ok", summary=f"{src.case_id}/{SUMMARY_NAME}")
        except Exception as e:  # noqa: BLE001 - one bad case must not stop a cohort
            msg = " ".join(str(e).split()) or type(e).__name__
            rec.update(status="failed", error=f"{type(e).__name__}: {msg}")
            logger.error("case %s failed: %s", src.case_id, msg)
            logger.debug("traceback of case %s", src.case_id, exc_info=True)
        except KeyboardInterrupt:
            logger.debug("case %s abandoned (interrupted)", src.case_id)
            raise
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        records.append(rec)
        if on_case is not None:
            on_case(rec)
    bar.close()
    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "skipped", "failed")}
    run = {
        "medcam_version": __version__,
        "output": str(out_dir),
        "num_parts": num_parts,
        "part_id": part_id,
        "cases_total": len(cases),
        "cases_in_part": len(mine),
        **counts,
        "cases": records,
        "settings": _jsonable(settings),
        "settings_signature": signature,
        "versions": versions(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_path, json.dumps(_jsonable(run), indent=2) + "\n", overwrite=True)
    run["path"] = str(run_path)
    return run


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
        try:
            specs = case_specs(targets, src)
        except MedcamError as e:
            specs_of[src.case_id], specs = e, list(targets)
        else:
            specs_of[src.case_id] = specs
        masks = [s.path for s in specs if s.kind == "mask" and not s.is_template]
        try:
            files = case_input_files(src, masks)
        except MedcamDataError as e:  # a broken case folder: its failure is reported when it is run
            files = {"folder": Path(str(src.source))}
            if not isinstance(specs_of[src.case_id], Exception):
                specs_of[src.case_id] = e
        inputs[src.case_id] = fingerprint(files)
    return specs_of, inputs


def json_key(path: PathLike, key: str) -> Any:
    """``json.load(path)[key]`` or None if unreadable/absent."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None
