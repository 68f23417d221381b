"""nnU-Net v2 cases and cohorts in, maps out, through medcam's one cohort loop.

:func:`explain_cohort` explains every case of INPUTS with a model from :func:`medcam.frameworks.nnunet.load` and
writes ``OUT/<case_id>/``: one map per method and target on the original image grid (the input's format and
geometry, through nnU-Net's own export: :meth:`~medcam.frameworks.nnunet.NnUNetModel.to_original_grid`),
``segmentation<ending>`` (nnU-Net's prediction) and ``summary.json``. The cases go through
:func:`medcam.pipeline.cohort.run_cohort` with :class:`NnUNetWork` as the per-case work (a peer of
:class:`medcam.pipeline.ExplainWork`), so nnU-Net cohorts get what every cohort gets: resume (a finished case with the
same input files and settings is skipped; the settings include the model folder, folds and the checkpoint files),
failure records (one failing case does not stop the others), ``num_parts``/``part_id``, staging folders moved into
place when complete, the run summary, progress and the Ray executor (the model is loaded once per worker).

INPUTS (:func:`discover_nnunet_cases`):

* nnU-Net's own input layout, as ``nnUNetv2_predict -i`` takes it: one folder of ``CASE_XXXX<file_ending>`` files,
  ``XXXX`` the channel index of ``dataset.json``'s ``channel_names``;
* one case's image files (``CASE_0000.nii.gz CASE_0001.nii.gz ...``: ordered by their channel index when they carry
  one, else in the order given);
* a BraTS case folder, a folder of BraTS case folders or a CSV manifest, as ``medcam explain`` takes them for
  MONAI models: the modalities are matched to ``channel_names`` by name (T1/T1n, T1ce/T1c/T1Gd, T2/T2w,
  FLAIR/T2f).

Targets (:func:`build_targets`): every ``--target`` kind of :mod:`medcam.pipeline.target_specs`, with the
``dataset.json`` label/region names as region names: ``NAME`` (predicted region), ``NAME:class``,
``NAME:component=largest|N``, ``channel:N``, ``mask:FILE:NAME``, ``box:x0,y0,z0:x1,y1,z1:NAME`` and
``label:TC|WT|ET[:NAME]`` (the case's BraTS label file). Masks, boxes and labels are given on the ORIGINAL image
grid (box corners as voxel indices i,j,k of the image, like NIfTI's array axes) and are taken to the preprocessed grid
by nnU-Net's own preprocessor, given them as the case's segmentation (:func:`to_preprocessed_grid`:
``transpose_forward``, the crop to the non-zero bounding box, the configuration's ``resampling_fn_seg``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MedcamError, TargetError
from ..pipeline.cases import CaseSource, _safe_id, discover_cases, id_from_files
from ..pipeline.errors import PipelineError
from ..pipeline.target_specs import TargetSpec
from ..targets import ClassROI, ComponentROI, MaskROI, PredictedROI, Target
from ..types import PathLike
from .nnunet import NnUNetError, NnUNetModel, explain, load

__all__ = [
    "NnUNetWork",
    "build_targets",
    "channel_files",
    "discover_nnunet_cases",
    "explain_cohort",
    "explain_files",
    "to_preprocessed_grid",
]

logger = logging.getLogger(__name__)

_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


# ---------------------------------------------------------------------------------------------------- inputs
def _endings(model: NnUNetModel) -> list[str]:
    """File endings the model's image reader takes (``dataset.json``'s ``file_ending`` first)."""
    reader = model.predictor.plans_manager.image_reader_writer_class
    own = str(model.dataset_json.get("file_ending", ".nii.gz"))
    return [own, *[str(e) for e in getattr(reader, "supported_file_endings", ()) if str(e) != own]]


def _ending_of(model: NnUNetModel, path: PathLike) -> str:
    """The ending of ``path`` among those the model's reader takes (NnUNetError naming them otherwise)."""
    name = Path(path).name
    for e in sorted(_endings(model), key=len, reverse=True):
        if name.endswith(e):
            return e
    raise NnUNetError(
        f"'{name}': this model reads {', '.join(_endings(model))} files (dataset.json file_ending "
        f"'{model.dataset_json.get('file_ending')}', reader {model.predictor.plans_manager.image_reader_writer_class.__name__})"
    )


def _nnunet_layout(folder: Path, model: NnUNetModel) -> list[CaseSource] | None:
    """The cases of a folder in nnU-Net's input layout (``CASE_XXXX<ending>``), or None if it holds no such file.

    Cases are grouped with nnU-Net's own functions (``get_identifiers_from_splitted_dataset_folder``,
    ``create_paths_fn``); each must have exactly the channels ``0000 .. C-1`` of ``dataset.json``.
    """
    from nnunetv2.utilities.utils import create_paths_fn, get_identifiers_from_splitted_dataset_folder

    ending = str(model.dataset_json.get("file_ending", ".nii.gz"))
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(ending))
    if not any(_CHANNEL_FILE.match(n[: -len(ending)]) for n in names):
        return None
    n_ch = len(model.channel_names)
    cases = []
    for cid in get_identifiers_from_splitted_dataset_folder(str(folder), ending):
        files = sorted(create_paths_fn(str(folder), names, ending, str(cid)))
        if not files:  # a file without a _XXXX channel index (not part of the layout)
            logger.warning("ignoring %s*%s in %s: not named CASE_XXXX%s", cid, ending, folder, ending)
            continue
        got = [int(Path(f).name[len(str(cid)) + 1 : len(str(cid)) + 5]) for f in files]
        if got != list(range(n_ch)):
            raise NnUNetError(
                f"case '{cid}' in '{folder}' has channel files {[f'{c:04d}' for c in got]}; the model takes "
                f"{n_ch} channels {model.channel_names} (dataset.json channel_names) as {cid}_0000{ending} .. "
                f"{cid}_{n_ch - 1:04d}{ending}"
            )
        cases.append(CaseSource(str(cid), "volumes", [Path(f) for f in files]))
    return cases


def _image_files_case(files: Sequence[Path], model: NnUNetModel, case_id: str | None) -> CaseSource:
    """ONE case given as image files: ordered by their nnU-Net channel index when all carry one, else as given."""
    n_ch = len(model.channel_names)
    if len(files) != n_ch:
        raise NnUNetError(
            f"the model takes {n_ch} input channels {model.channel_names} (dataset.json channel_names), got "
            f"{len(files)} file(s)"
        )
    endings = [_ending_of(model, f) for f in files]
    stems = [_CHANNEL_FILE.match(f.name[: -len(e)]) for f, e in zip(files, endings)]
    ordered, cid = list(files), None
    if all(stems) and len({m.group("case") for m in stems if m}) == 1:
        by_channel = sorted(zip((int(m.group("channel")) for m in stems if m), files))
        if [c for c, _ in by_channel] == list(range(n_ch)):
            ordered, cid = [f for _, f in by_channel], stems[0].group("case") if stems[0] else None
    return CaseSource(case_id or cid or id_from_files(ordered), "volumes", ordered)


def discover_nnunet_cases(
    inputs: Sequence[PathLike], model: NnUNetModel, case_id: str | None = None
) -> list[CaseSource]:
    """The cases of ``inputs`` for an nnU-Net model (the module docstring lists what INPUTS may be).

    Returns:
        :class:`~medcam.pipeline.CaseSource` list: ``"volumes"`` cases hold their files in channel order; BraTS
        cases (``"brats_folder"``/``"brats_mapping"``) are matched to the channels by :func:`channel_files`.

    Raises:
        NnUNetError / PipelineError: missing input, a folder with no case, a case missing a channel, files the
            model's reader does not take, modalities that cannot be matched to ``dataset.json``'s channel names.
    """
    paths = [Path(p) for p in inputs]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise PipelineError(f"input '{missing[0]}' does not exist")
    cases: list[CaseSource] | None = None
    if len(paths) == 1 and paths[0].is_dir():
        cases = _nnunet_layout(paths[0], model)
        if cases is not None and case_id is not None and len(cases) != 1:
            raise PipelineError(f"--case-id names ONE case, but '{paths[0]}' holds {len(cases)} cases")
        if cases is not None and case_id is not None:
            cases = [replace(cases[0], case_id=case_id)]
    if cases is None and paths and all(p.is_file() and p.suffix.lower() != ".csv" for p in paths):
        cases = [_image_files_case(paths, model, case_id)]
    if cases is None:
        cases = discover_cases(paths, case_id=case_id)
        if any(c.kind != "volumes" for c in cases):
            _modality_order(model)  # the channel names must match BraTS modalities: checked before any case
        for c in cases:
            if c.kind == "volumes" and len(c.source) != len(model.channel_names):
                raise NnUNetError(
                    f"case {c.case_id} has {len(c.source)} image file(s); the model takes "
                    f"{len(model.channel_names)} channels {model.channel_names} (dataset.json channel_names)"
                )
    bad = [c.case_id for c in cases if _safe_id(c.case_id) != c.case_id]
    if bad:
        raise PipelineError(f"case id {bad[0]!r}: use letters, digits, '.', '_' and '-' only (rename the files)")
    return cases


def _modality_order(model: NnUNetModel) -> list[str]:
    """The BraTS modality (``t1``, ``t1ce``, ``t2``, ``flair``) of each model channel, from its name."""
    from ..data.brats import MODALITIES, MODALITY_ALIASES

    names = model.channel_names
    order = [MODALITY_ALIASES.get(re.sub(r"[^a-z0-9]", "", n.lower()), "") for n in names]
    if any(m not in MODALITIES for m in order) or len(set(order)) != len(order):
        raise NnUNetError(
            f"the model's channels {names} (dataset.json channel_names) cannot be matched to the BraTS modalities "
            f"{', '.join(MODALITIES)} of these cases; give each case as image files in channel order, or in "
            "nnU-Net's layout (a folder of CASE_0000<ending>, CASE_0001<ending>, ...)"
        )
    return order


def channel_files(src: CaseSource, model: NnUNetModel) -> list[Path]:
    """The image files of case ``src`` in the model's channel order (one per ``dataset.json`` channel)."""
    if src.kind == "volumes":
        files = [Path(p) for p in src.source]
    else:
        from ..data.brats import _normalise_mapping, discover_brats_case

        order = _modality_order(model)
        if src.kind == "brats_folder":
            _, _, found = discover_brats_case(src.source)
        else:
            found = _normalise_mapping(src.source)
        missing = [m for m in order if m not in found]
        if missing:
            raise NnUNetError(f"case {src.case_id} has no {missing[0]} image (the model's channels: {order})")
        files = [Path(found[m]) for m in order]
    for f in files:
        _ending_of(model, f)
        if not f.is_file():
            raise NnUNetError(f"input file '{f}' does not exist")
    return files


def _label_file(src: CaseSource) -> Path | None:
    """The BraTS label (``seg``) file of a case, if it has one."""
    if src.kind == "brats_folder":
        from ..data.brats import discover_brats_case

        seg = discover_brats_case(src.source)[2].get("seg")
        return Path(seg) if seg is not None else None
    if src.kind == "brats_mapping":
        for key in ("seg", "label"):
            if key in src.source:
                return Path(src.source[key])
    return None


# ---------------------------------------------------------------------------------------------------- targets
def to_preprocessed_grid(model: NnUNetModel, masks: np.ndarray, files: Sequence[PathLike]) -> np.ndarray:
    """Masks ``[K, *original]`` of the case made of ``files`` (the reader's axis order, as nnU-Net reads the image)
    -> ``[K, *S']`` float32 0/1 on the preprocessed grid.

    The masks are given to nnU-Net's own preprocessor as the case's segmentation (the ``seg`` argument of
    ``run_case_npy``, what ``nnUNetv2_plan_and_preprocess`` does with a training label): ``transpose_forward``, the
    crop to the image's non-zero bounding box (voxels outside the non-zero region become nnU-Net's ``-1``), and the
    configuration's ``resampling_fn_seg``; the ROI is where the result is 1. The image is read and preprocessed
    once more for this (nnU-Net's crop needs it); its data is not used.
    """
    p = model.predictor
    rw = p.plans_manager.image_reader_writer_class()
    data, props = rw.read_images([str(f) for f in files])
    m = np.asarray(masks)
    if tuple(m.shape[1:]) != tuple(data.shape[1:]):
        raise TargetError(f"masks {tuple(m.shape[1:])} are not on the case's image grid {tuple(data.shape[1:])}")
    pre = p.configuration_manager.preprocessor_class(verbose=False)
    with contextlib.redirect_stdout(io.StringIO()):  # its foreground sampling may print
        _, seg, _ = pre.run_case_npy(
            data, (m != 0).astype(np.int8), props, p.plans_manager, p.configuration_manager, model.dataset_json
        )
    return (np.asarray(seg) == 1).astype(np.float32)


def _read_on_image_grid(model: NnUNetModel, path: Path, properties: Mapping[str, Any], spec: TargetSpec) -> np.ndarray:
    """A label/mask file read by the model's reader: ``[*original]`` (reader axis order), checked on the image grid."""
    rw = model.predictor.plans_manager.image_reader_writer_class()
    arr, props = rw.read_seg(str(path))
    shape = _reader_shape(model, properties)
    geometry = ("spacing", "origin", "direction")
    same = tuple(arr.shape[1:]) == shape and all(
        np.allclose(props.get("sitk_stuff", {}).get(k, 0), properties.get("sitk_stuff", {}).get(k, 0), atol=1e-4)
        for k in geometry
    )
    if not same:
        raise TargetError(
            f"--target {spec.text!r}: '{path.name}' must be on the case's original image grid (array shape {shape}, "
            f"same spacing, origin and direction); got shape {tuple(arr.shape[1:])}"
        )
    return np.asarray(arr[0])


def _reader_shape(model: NnUNetModel, properties: Mapping[str, Any]) -> tuple[int, ...]:
    """Shape of the image as nnU-Net's reader returns it (before ``transpose_forward``)."""
    pm = model.predictor.plans_manager
    before = properties["shape_before_cropping"]
    return tuple(int(before[i]) for i in pm.transpose_backward)


def _original_mask(model: NnUNetModel, spec: TargetSpec, src: CaseSource, properties: Mapping[str, Any]) -> np.ndarray:
    """The ROI of a ``mask``/``box``/``label`` spec on the original grid (reader axis order), 0/1."""
    shape = _reader_shape(model, properties)
    if spec.kind == "box" and spec.box is not None:
        start, stop = spec.box
        ijk = tuple(reversed(shape))  # SimpleITK/nnU-Net arrays are [k, j, i]; boxes are given as i, j, k
        if len(start) != len(ijk) or any(b > s for b, s in zip(stop, ijk)):
            raise TargetError(f"--target {spec.text!r}: box stop {stop} lies outside the image grid {ijk} (i, j, k)")
        box = np.zeros(shape, np.float32)
        box[tuple(slice(a, b) for a, b in zip(reversed(start), reversed(stop)))] = 1
        return box
    if spec.kind == "mask" and spec.path is not None:
        arr = _read_on_image_grid(model, Path(spec.path), properties, spec)
        if not (arr != 0).any():
            raise TargetError(f"--target {spec.text!r}: the mask is empty (all zero)")
        return (arr != 0).astype(np.float32)
    from ..data.brats import REGIONS, infer_label_convention, labels_to_regions

    seg = _label_file(src)
    if seg is None:
        raise TargetError(
            f"--target {spec.text!r}: case {src.case_id} has no label file (a BraTS '_seg' / 'seg' file, or a 'seg' "
            "manifest column)"
        )
    lab = _read_on_image_grid(model, seg, properties, spec)
    regions = labels_to_regions(lab, infer_label_convention(np.unique(lab).tolist()))
    res = regions[REGIONS.index(str(spec.label))].astype(np.float32)
    if not res.any():
        raise TargetError(f"--target {spec.text!r}: case {src.case_id} has no {spec.label} voxels in its label file")
    return res


def build_targets(
    specs: Sequence[TargetSpec],
    model: NnUNetModel,
    src: CaseSource,
    files: Sequence[PathLike],
    data: torch.Tensor,
    properties: Mapping[str, Any],
    threshold: float | None = None,
) -> list[Target]:
    """One target per spec (:class:`~medcam.pipeline.TargetSpec`) on the preprocessed grid of case ``src``.

    ``files``, ``data``, ``properties``: the case's channel files and nnU-Net's preprocessing of them
    (:meth:`NnUNetModel.preprocess`: ``data [C, *S']``). Predicted/component targets use nnU-Net's inference
    nonlinearity (:attr:`NnUNetModel.activation`; ``threshold`` None: 0.5 for sigmoid, argmax for softmax); masks,
    boxes and labels are mapped by :func:`to_preprocessed_grid`.
    """
    spatial = [s for s in specs if s.kind in ("mask", "box", "label")]
    mapped: dict[int, np.ndarray] = {}
    if spatial:
        stack = np.stack([_original_mask(model, s, src, properties) for s in spatial])
        on_grid = to_preprocessed_grid(model, stack, files)
        if tuple(on_grid.shape[1:]) != tuple(data.shape[1:]):
            raise NnUNetError(f"masks preprocessed to {on_grid.shape[1:]}, the data to {tuple(data.shape[1:])}")
        for s, m in zip(spatial, on_grid):
            if not m.any():
                raise TargetError(f"--target {s.text!r}: the ROI falls outside the preprocessed (cropped) image")
            mapped[id(s)] = m
    n_out = len(model.output_names)
    act: Any = model.activation
    out: list[Target] = []
    for s in specs:
        if s.channel >= n_out:
            raise TargetError(f"--target {s.text!r}: channel {s.channel} is out of range, the model has {n_out}")
        if s.kind == "predicted":
            out.append(PredictedROI(s.channel, activation=act, threshold=threshold))
        elif s.kind == "class":
            out.append(ClassROI(s.channel))
        elif s.kind == "component":
            out.append(ComponentROI(s.channel, which=int(s.rank or 1) - 1, activation=act, threshold=threshold))
        else:
            out.append(MaskROI(mapped[id(s)], s.channel))
    return out


def parse_specs(model: NnUNetModel, targets: Sequence[str]) -> list[TargetSpec]:
    """``--target`` strings with the model's ``dataset.json`` names as regions (default: every foreground one)."""
    from ..pipeline.target_specs import parse_targets

    names = model.output_names
    given = list(targets) or [n for n in names if n.lower() != "background"]
    try:
        return parse_targets(given, names)
    except TargetError as e:
        if "unknown region" in str(e):
            raise NnUNetError(f"{e} (not a label or region of this model's dataset.json)") from None
        raise


# ---------------------------------------------------------------------------------------------------- one case
def _file_name(method: str, target: str, ending: str) -> str:
    return f"{method.replace('+', 'pp')}_{re.sub(r'[^A-Za-z0-9._-]+', '_', target)}{ending}"


@dataclass
class NnUNetWork:
    """The per-case work of an nnU-Net cohort (a :data:`~medcam.pipeline.cohort.CaseWork`, peer of
    :class:`~medcam.pipeline.ExplainWork`): ``work(source, staging) -> summary``.

    Picklable without its model: a worker of a distributed executor loads the model folder once, in
    :meth:`setup`, on its own device.
    """

    folder: Path
    folds: tuple[int | str, ...]
    checkpoint: str
    methods: Sequence[str]
    specs: Sequence[TargetSpec]
    layer: str = "auto"
    threshold: float | None = None
    device: str = "cpu"
    #: ``use_mirroring``, ``tile_step_size``, ``use_gaussian`` of :func:`~medcam.frameworks.nnunet.load`
    options: Mapping[str, Any] = field(default_factory=dict)
    window_progress: bool = False
    #: PNG overlays and the montage (NIfTI cases), with ``shared_scale``/``slice_at`` options ``figures``
    png: bool = True
    figures: Mapping[str, Any] = field(default_factory=dict)
    #: per case: its target specs (mask templates filled in), or the error that fails that case
    specs_of: Mapping[str, Any] = field(default_factory=dict)
    model: NnUNetModel | None = None

    @classmethod
    def of(cls, model: NnUNetModel, methods: Sequence[str], specs: Sequence[TargetSpec], **kw: Any) -> NnUNetWork:
        """The work for a loaded model (its folder, folds, checkpoint, device and predictor options)."""
        p = model.predictor
        options = {"use_mirroring": bool(p.use_mirroring), "tile_step_size": p.tile_step_size}
        options["use_gaussian"] = bool(p.use_gaussian)
        device = str(next(model.network.parameters()).device)
        return cls(model.folder, model.folds, model.checkpoint, list(methods), list(specs), device=device,
                   options=options, model=model, **kw)  # fmt: skip

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the model (a worker loads it in :meth:`setup`)."""
        return {**self.__dict__, "model": None}

    def setup(self, device: str | None = None) -> NnUNetWork:
        """This work on ``device`` with its model loaded there (once per worker); None: as configured."""
        device = device or self.device
        if self.model is not None and device == self.device:
            return self
        model = load(self.folder, self.folds, self.checkpoint, device=device, **dict(self.options))
        return replace(self, device=device, model=model)

    def __call__(self, src: CaseSource, staging: Path) -> dict[str, Any]:
        from ..methods import METHODS

        t0 = time.perf_counter()
        if self.model is None:  # not set up (a work unpickled and called directly): load once, keep it
            self.model = self.setup().model
        model = self.model
        assert model is not None
        specs = self.specs_of.get(src.case_id, self.specs)
        if isinstance(specs, Exception):
            raise specs
        files = channel_files(src, model)
        ending = _ending_of(model, files[0])
        data, props = model.preprocess(files)
        targets = build_targets(specs, model, src, files, data, props, self.threshold)
        # nnU-Net's logits Y: predicted first when a target's ROI needs them; else the first explanation forms them
        # in its own gradient pass (explain's fused prediction, bit-equal to nnUNetPredictor's) and the others reuse them
        logits = model.predict_logits(data) if any(t.needs_prediction for t in targets) else None
        rows: list[dict[str, Any]] = []
        explain_s: dict[str, float] = {}
        timings: dict[str, Any] = {"predict_s": round(time.perf_counter() - t0, 3), "explain_s": explain_s}
        for method in self.methods:
            t1 = time.perf_counter()
            cam = METHODS[method](model.network, self.layer, progress=self.window_progress)
            res = explain(cam, model, data, targets, logits=logits, progress=self.window_progress)
            explain_s[method] = round(time.perf_counter() - t1, 3)
            if logits is None:
                assert res.output is not None
                logits = res.output[0]
                timings["prediction"] = res.stats.get("prediction")
            orig = model.to_original_grid(res.maps[0], props)
            for k, spec in enumerate(specs):
                fname = _file_name(method, spec.name, ending)
                model.write_map(orig[k], props, staging / fname)
                rows.append(
                    {
                        "method": method, "target": spec.name, "spec": spec.text, "kind": spec.kind,
                        "channel": spec.channel, "region": model.output_names[spec.channel], "layer": res.layer,
                        "file": fname, "score": float(res.scores[0, k]), "roi_voxels": int(res.roi_voxels[0, k]),
                        "map_max": float(orig[k].max()), "passes": res.stats.get("passes"),
                    }
                )  # fmt: skip
        if logits is None:  # no method given
            logits = model.predict_logits(data)
        seg = model.segmentation(logits, props)
        model.write_map(seg.astype(np.float32), props, staging / f"segmentation{ending}")
        figures = self._figures(staging, model, files, rows, targets, logits, props, ending, src.case_id)
        timings["total_s"] = round(time.perf_counter() - t0, 3)
        logger.info("case %s done in %.1f s", src.case_id, timings["total_s"])
        return {
            "source": src.describe(),
            "channel_files": [str(f.resolve()) for f in files],
            "model": model.describe(),
            "pipeline": "nnunet (nnU-Net's own preprocessing, sliding window, mirroring and export)",
            "preprocessed_shape": list(data.shape[1:]),
            "segmentation": f"segmentation{ending}",
            "maps": rows,
            "figures": figures,
            "device": self.device,
            "timings": timings,
        }

    def _figures(
        self,
        staging: Path,
        model: NnUNetModel,
        files: Sequence[Path],
        rows: list[dict[str, Any]],
        targets: Sequence[Any],
        logits: torch.Tensor,
        props: dict[str, Any],
        ending: str,
        case_id: str,
    ) -> dict[str, Any] | None:
        """PNG overlays + montage of a NIfTI case (None when off or another format)."""
        from .nnunet_figures import has_figures, write_nnunet_figures

        if not (self.png and rows and has_figures(ending)):
            return None
        y = logits[None].float()
        rois = torch.stack([t.roi(y)[0] != 0 for t in targets])  # [K, *S'] network grid
        return write_nnunet_figures(
            staging, model, files, rows, rois, props, ending, case_id=case_id, layer=str(rows[0]["layer"]),
            figures=self.figures,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------- cohorts
def _checkpoint_files(model: NnUNetModel) -> dict[str, Path]:
    folder = Path(model.folder)
    files = {name: folder / name for name in ("plans.json", "dataset.json")}
    files.update({f"fold_{f}": folder / f"fold_{f}" / model.checkpoint for f in model.folds})
    return files


def run_record(
    model: NnUNetModel, methods: Sequence[str], specs: Sequence[TargetSpec], layer: str, threshold: float | None
) -> dict[str, Any]:
    """The settings recorded in every summary and compared on resume: the model (folder, folds, checkpoint name,
    and size + time of its plans, dataset.json and checkpoint files), methods, targets, layer, threshold."""
    from ..pipeline.resume import fingerprint

    return {
        "model": {**model.describe(), "folder": str(Path(model.folder).resolve())},
        "model_files": fingerprint(_checkpoint_files(model)),
        "methods": list(methods),
        "targets": [s.text for s in specs],
        "layer": layer,
        "threshold": threshold,
    }


def explain_cohort(
    inputs: Sequence[PathLike],
    model: NnUNetModel,
    out_dir: PathLike = "medcam-out",
    *,
    methods: Sequence[str] = ("hirescam",),
    targets: Sequence[str] = (),
    layer: str = "auto",
    threshold: float | None = None,
    case_id: str | None = None,
    num_parts: int = 1,
    part_id: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    executor: Any = None,
    on_case: Callable[[dict[str, Any]], None] | None = None,
    png: bool = True,
    figures: Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Explain every case of ``inputs`` with an nnU-Net model into ``out_dir/<case_id>/`` (module docstring).

    Everything is checked before the first case (methods, targets, layer, inputs, channels, per-case masks, the
    resume plan); then :func:`medcam.pipeline.cohort.run_cohort` runs :class:`NnUNetWork` on this part's cases.

    Args:
        methods: names of :data:`medcam.METHODS`.
        targets: ``--target`` strings (empty: the predicted region of every foreground label/region).
        layer: dotted layer name of ``model.network`` or ``"auto"``.
        executor: None/``"local"``, ``"ray"`` or an executor object (:func:`~medcam.pipeline.run_cohort`).
        png: write PNG overlays (``overlays/<method>_<target>.png``) and ``montage.png`` per NIfTI case;
            ``figures``: their ``shared_scale``/``slice_at`` options (:func:`medcam.io.case_figures.write_case_figures`).
        threads: torch threads of every case wherever it runs (:mod:`medcam.pipeline.numerics`; default 1).

    Returns:
        The run summary (``cases`` records ok/skipped/failed; also written as ``cohort_summary.json``).
    """
    from ..layers import resolve_layer
    from ..methods import METHODS
    from ..pipeline.cases import split_parts
    from ..pipeline.cohort import run_cohort
    from ..pipeline.run import _cohort_inputs
    from ..pipeline.target_specs import check_masks_for_cohort

    names = list(dict.fromkeys(m.lower() for m in methods)) or ["hirescam"]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise MedcamError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    specs = parse_specs(model, targets)
    if layer != "auto":
        resolve_layer(model.network, layer)
    cases = discover_nnunet_cases(inputs, model, case_id)
    mine = split_parts(cases, num_parts, part_id)
    check_masks_for_cohort(specs, len(cases))
    specs_of, fps = _cohort_inputs(mine, specs)
    work = NnUNetWork.of(model, names, specs, layer=layer, threshold=threshold, specs_of=specs_of, png=png,
                         figures=dict(figures or {}),
                         window_progress=progress and len(mine) == 1)  # fmt: skip
    record = run_record(model, names, specs, layer, threshold)
    return run_cohort(
        cases, work, out_dir, settings=record, num_parts=num_parts, part_id=part_id, overwrite=overwrite,
        progress=progress, on_case=on_case, executor=executor, inputs=fps, threads=threads,
    )  # fmt: skip


def explain_files(
    model: NnUNetModel,
    files: Sequence[PathLike],
    output: PathLike,
    *,
    methods: Sequence[str] = ("hirescam",),
    targets: Sequence[str] = (),
    layer: str = "auto",
    case_id: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Explain ONE case given as image files (one per channel) into ``output/<case_id>/`` (:func:`explain_cohort`:
    a case folder done with the same files and settings is kept and its summary returned; other settings are refused
    unless ``overwrite``).

    Returns:
        The case's summary (``summary.json``); a failure of the case is raised as :class:`NnUNetError`.
    """
    import json

    run = explain_cohort(
        files, model, output, methods=methods, targets=targets, layer=layer, case_id=case_id, overwrite=overwrite,
        progress=progress,
    )  # fmt: skip
    rec = run["cases"][0]
    if rec["status"] == "failed":
        raise NnUNetError(f"case {rec['case_id']} failed: {rec['error']}")
    with contextlib.suppress(OSError, ValueError):
        summary: dict[str, Any] = json.loads((Path(output) / rec["summary"]).read_text(encoding="utf-8"))
        return summary
    raise NnUNetError(f"case {rec['case_id']}: its summary.json cannot be read")
