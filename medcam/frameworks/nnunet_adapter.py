"""The nnU-Net v2 adapter of medcam's one case pipeline (:mod:`medcam.frameworks.base`): ``--model nnunet:FOLDER``.

It says how nnU-Net's own entry points enter the pipeline and holds no pass logic: cases discovered in nnU-Net's
input layout, preprocessed by nnU-Net (:meth:`~medcam.frameworks.nnunet.NnUNetModel.preprocess`), explained through
nnU-Net's pass plan (:func:`~medcam.frameworks.nnunet.pass_plan`, folds x tiles x mirrors) by the one executor,
exported back by nnU-Net (``to_original_grid``; the segmentation as ``nnUNetv2_predict`` writes it).

INPUTS (:meth:`NnUNetAdapter.discover`): nnU-Net's input layout (a folder of ``CASE_XXXX<file_ending>`` files,
``XXXX`` the channel index of ``dataset.json``'s ``channel_names``); one case's image files (ordered by their
channel index when they carry one, else as given); BraTS case folders or a CSV manifest as for MONAI models, the
modalities matched to ``channel_names`` by name. Cases must be NIfTI read by ``SimpleITKIO`` or ``NibabelIO``.

Targets (:meth:`NnUNetAdapter.targets`): every ``--target`` kind, ``dataset.json``'s label/region names as region
names; masks, boxes (voxel indices i, j, k) and ``label:`` targets are given on the ORIGINAL grid and taken to the
preprocessed grid by nnU-Net's own preprocessor, given them as the case's segmentation (:func:`to_preprocessed_grid`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.brats import modality_of
from ..errors import TargetError
from ..pipeline.cases import CaseLayout, CaseSource, _safe_id, discover_cases, id_from_files
from ..pipeline.errors import PipelineError
from ..pipeline.target_specs import TargetSpec, build_targets, roi_on_original_grid
from ..plan import PassPlan
from ..targets import Target
from ..types import PathLike
from .base import Activation, Framework
from .nnunet import NnUNetError, NnUNetModel, load, pass_plan

__all__ = ["NnUNetAdapter", "NnUNetCase", "load_adapter", "to_preprocessed_grid"]

logger = logging.getLogger(__name__)

_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
#: nnU-Net readers whose arrays are the NIfTI file's axes reversed (``[k, j, i]``)
_READERS = ("SimpleITKIO", "NibabelIO")
_NIFTI = (".nii.gz", ".nii")


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
        cases.append(CaseSource(str(cid), CaseLayout.VOLUMES, [Path(f) for f in files]))
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
    return CaseSource(case_id or cid or id_from_files(ordered), CaseLayout.VOLUMES, ordered)


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
        if any(c.kind is not CaseLayout.VOLUMES for c in cases):
            _modality_order(model)  # the channel names must match BraTS modalities: checked before any case
        for c in cases:
            if c.kind is CaseLayout.VOLUMES and len(c.source) != len(model.channel_names):
                raise NnUNetError(
                    f"case {c.case_id} has {len(c.source)} image file(s); the model takes "
                    f"{len(model.channel_names)} channels {model.channel_names} (dataset.json channel_names)"
                )
    bad = [c.case_id for c in cases if _safe_id(c.case_id) != c.case_id]
    if bad:
        raise PipelineError(f"case id {bad[0]!r}: use letters, digits, '.', '_' and '-' only (rename the files)")
    _check_nifti(model, cases)
    return cases


def _check_nifti(model: NnUNetModel, cases: Sequence[CaseSource]) -> None:
    """The case folder's maps are NIfTI on the input's grid: NIfTI inputs read by SimpleITKIO/NibabelIO only."""
    reader = model.predictor.plans_manager.image_reader_writer_class.__name__
    if reader not in _READERS:
        raise NnUNetError(
            f"this model reads images with {reader}; medcam explains nnU-Net models whose reader is one of "
            f"{', '.join(_READERS)} (NIfTI cases)"
        )
    for c in cases:
        other = [f for f in c.channel_files() if not str(f).endswith(_NIFTI)]
        if other:
            raise NnUNetError(
                f"case {c.case_id}: '{other[0].name}' is not NIfTI; medcam's case folder is NIfTI on the input's "
                "grid (convert the case, e.g. with SimpleITK, to .nii.gz)"
            )


def _modality_order(model: NnUNetModel) -> list[str]:
    """The BraTS modality of each model channel, from its ``dataset.json`` name (``data.brats.modality_of``)."""
    order = [modality_of(n) or "" for n in model.channel_names]
    if "" in order or len(set(order)) != len(order):
        raise NnUNetError(
            f"the model's channels {model.channel_names} (dataset.json channel_names) cannot be matched to the BraTS "
            "modalities of these cases; give each case as image files in channel order, or in nnU-Net's layout (a "
            "folder of CASE_0000<ending>, CASE_0001<ending>, ...)"
        )
    return order


def channel_files(src: CaseSource, model: NnUNetModel) -> list[Path]:
    """The image files of case ``src`` in the model's channel order (one per ``dataset.json`` channel), from the
    files the source resolved at discovery."""
    files = src.files_in_order(_modality_order(model) if src.kind is not CaseLayout.VOLUMES else ())
    for f in files:
        _ending_of(model, f)
        if not f.is_file():
            raise NnUNetError(f"input file '{f}' does not exist")
    return files


def _label_file(src: CaseSource | None) -> Path | None:
    """The BraTS label (``seg``) file of a case, if it has one."""
    seg = None if src is None else src.files.get("seg")
    return Path(seg) if seg is not None else None


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


def nnunet_targets(
    specs: Sequence[TargetSpec],
    model: NnUNetModel,
    src: CaseSource | None,
    files: Sequence[PathLike],
    data: torch.Tensor,
    properties: Mapping[str, Any],
    threshold: float | None = None,
) -> list[Target]:
    """One target per spec on the preprocessed grid of the case made of ``files`` (``data [C, *S']`` and
    ``properties`` from :meth:`NnUNetModel.preprocess`). Predicted/component targets use nnU-Net's inference
    nonlinearity (``threshold`` None: 0.5 for sigmoid, argmax for softmax); masks, boxes and labels are mapped by
    :func:`to_preprocessed_grid`."""
    spatial = [s for s in specs if s.kind in ("mask", "box", "label")]
    mapped: dict[int, np.ndarray] = {}
    if spatial:
        cid = str(properties.get("case_id", ""))  # the ROIs in nnU-Net's reader order [k, j, i] (NIfTI reversed)
        rois = [roi_on_original_grid(s, files[0], cid, _label_file(src)) for s in spatial]
        stack = _to_nifti_axes(np.stack(rois))
        on_grid = to_preprocessed_grid(model, stack, files)
        if tuple(on_grid.shape[1:]) != tuple(data.shape[1:]):
            raise NnUNetError(f"masks preprocessed to {on_grid.shape[1:]}, the data to {tuple(data.shape[1:])}")
        for s, m in zip(spatial, on_grid):
            if not m.any():
                raise TargetError(f"--target {s.text!r}: the ROI falls outside the preprocessed (cropped) image")
            mapped[id(s)] = m
    n_out = len(model.output_names)
    for s in specs:
        if s.channel >= n_out:
            raise TargetError(f"--target {s.text!r}: channel {s.channel} is out of range, the model has {n_out}")
    masks = [mapped[id(s)] for s in spatial]
    return build_targets(specs, None, activation=model.activation, threshold=threshold, masks=masks)


# ---------------------------------------------------------------------------------------------------- the case
def _to_nifti_axes(reader_order: np.ndarray) -> np.ndarray:
    """``[K, k, j, i]`` (nnU-Net's reader axis order for NIfTI) -> ``[K, i, j, k]`` (nibabel's), and back."""
    return np.ascontiguousarray(np.asarray(reader_order).transpose(0, 3, 2, 1))


@dataclass
class NnUNetCase:
    """One case preprocessed by nnU-Net (a :class:`~medcam.frameworks.base.ModelCase`).

    ``image`` is nnU-Net's preprocessed data ``[C, *S']`` (a MetaTensor whose affine holds the configuration's
    spacing); ``properties`` are nnU-Net's (needed by its export); :meth:`invert` is nnU-Net's export of
    probabilities (``resampling_fn_probabilities``, the crop put back, ``transpose_backward``), in nibabel's axis
    order of the reference file.
    """

    image: Any
    properties: dict[str, Any]
    files: list[Path]
    paths: dict[str, Path]
    reference_path: Path
    case_id: str
    channel_names: tuple[str, ...]
    original_shape: tuple[int, int, int]
    original_affine: np.ndarray = field(repr=False)
    model: NnUNetModel | None = field(default=None, repr=False)
    label: Any = None

    def invert(self, volume: np.ndarray | torch.Tensor, *, nearest: bool = False) -> np.ndarray:
        """``[K, *S']`` (or ``[*S']``) -> float32 ``[K, *original]`` in nibabel's axis order, by nnU-Net's export;
        ``nearest``: 0/1 masks (thresholded at 0.5 after the probability resampling)."""
        assert self.model is not None
        vol = torch.as_tensor(np.asarray(volume.detach().cpu() if isinstance(volume, torch.Tensor) else volume))
        squeeze = vol.ndim == 3
        out = _to_nifti_axes(self.model.to_original_grid(vol[None] if squeeze else vol, self.properties))
        if nearest:
            out = (out > 0.5).astype(np.float32)
        return out[0] if squeeze else out


def _channel_names(model: NnUNetModel) -> tuple[str, ...]:
    """``dataset.json``'s channel names, as BraTS modality names where they are ones (the figures' background)."""
    names = [modality_of(n) or n for n in model.channel_names]
    return tuple(names) if len(set(names)) == len(names) else tuple(model.channel_names)


# ---------------------------------------------------------------------------------------------------- the adapter
@dataclass
class NnUNetAdapter:
    """A trained nnU-Net v2 model folder as a :class:`~medcam.frameworks.base.FrameworkAdapter`.

    Picklable without its model: a worker of a distributed executor loads the folder once, in :meth:`setup`, on its
    own device.

    Attributes:
        folder, folds, checkpoint: the model (:func:`medcam.frameworks.nnunet.load`).
        options: ``use_mirroring``, ``tile_step_size``, ``use_gaussian`` of the predictor.
        device: where the model is (or is to be) loaded.
    """

    folder: Path
    folds: tuple[int | str, ...]
    checkpoint: str
    options: Mapping[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    framework: Framework = Framework.NNUNET
    _model: NnUNetModel | None = field(default=None, repr=False)
    #: :func:`~medcam.frameworks.nnunet.explain` loads each fold's weights itself: a randomised copy of the
    #: network cannot be explained (``medcam evaluate``'s sanity check is refused)
    own_executor = True

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None}

    @property
    def model(self) -> NnUNetModel:
        """The loaded :class:`~medcam.frameworks.nnunet.NnUNetModel` (loaded here when this adapter was pickled)."""
        if self._model is None:
            self._model = load(self.folder, self.folds, self.checkpoint, device=self.device, **dict(self.options))
        return self._model

    @property
    def network(self) -> torch.nn.Module:
        return self.model.network

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self.model.output_names)

    @property
    def activation(self) -> Activation:
        return Activation(self.model.activation)

    def setup(self, device: str) -> NnUNetAdapter:
        """This adapter with the model loaded on ``device`` (once)."""
        if self._model is not None and device == self.device:
            return self
        self.device, self._model = device, None
        _ = self.model
        return self

    def discover(self, inputs: Sequence[PathLike], case_id: str | None = None) -> list[CaseSource]:
        return discover_nnunet_cases(inputs, self.model, case_id)

    def load_case(self, source: CaseSource) -> NnUNetCase:
        """nnU-Net's preprocessing of the case's channel files (``dataset.json`` order)."""
        from monai.data import MetaTensor

        from ..data.loading import read_header

        model = self.model
        files = channel_files(source, model)
        data, props = model.preprocess(files)
        spacing = [float(v) for v in model.predictor.configuration_manager.spacing]
        if len(spacing) < data.ndim - 1:  # a 2D configuration: the first (slice) axis keeps the case's spacing
            spacing = [float(props["spacing"][model.predictor.plans_manager.transpose_forward[0]]), *spacing]
        image = MetaTensor(data, affine=torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64)))
        names = _channel_names(model)
        header = read_header(files[0])
        paths = dict(zip(names, files))
        label = _label_file(source)
        if label is not None:
            paths["seg"] = label
        props = {**props, "case_id": source.case_id}
        shape = (int(header.shape[0]), int(header.shape[1]), int(header.shape[2]))
        return NnUNetCase(image, props, files, paths, files[0], source.case_id, names, shape, header.affine, model)

    def targets(self, specs: Sequence[Any], case: Any, source: Any, threshold: float | None) -> list[Any]:
        return nnunet_targets(specs, self.model, source, case.files, case.image, case.properties, threshold)

    def predict(
        self, case: Any, targets: Sequence[Any], *, inferer: Any, device: torch.device, amp: bool
    ) -> torch.Tensor | None:
        """None: the first explanation forms nnU-Net's logits in its own passes, bit-equal to the predictor's (fused
        into its gradient pass, or in one pass with its graphs kept when a target's ROI needs them; where neither is
        available, e.g. on a GPU, it runs the predictor itself and says so in ``stats``)."""
        if amp:
            raise NnUNetError("--amp does not apply to nnU-Net models: the predictor's own precision is used")
        return None

    def predict_image(self, case: Any, image: torch.Tensor, *, inferer: Any, device: torch.device) -> torch.Tensor:
        """nnU-Net's own prediction of each volume of ``image`` ``[N, C, *S']`` (preprocessed data on the case's
        grid, e.g. perturbed copies of ``case.image``): ``nnUNetPredictor.predict_logits_from_preprocessed_data``
        (tiles, Gaussian blending, mirroring, fold average; :meth:`NnUNetModel.predict_logits`), one volume at a
        time as the predictor takes them -> ``[N, C_out, *S']`` float32 on ``image.device``."""
        from ..pipeline.adapters import check_on_case_grid

        check_on_case_grid(case, image)
        out = [self.model.predict_logits(x.detach().float().cpu()) for x in image]
        return torch.stack(out).to(image.device)

    def reference_regions(self, case: Any, source: Any) -> torch.Tensor | None:
        """The case's BraTS label file (``seg``) as region masks ``[3, *S']`` (TC, WT, ET) on the preprocessed grid:
        read on the original grid (checked against the case's first image), and taken through nnU-Net's own
        preprocessor as the case's segmentation (:func:`to_preprocessed_grid`: transposition, crop, ``resampling_fn_seg``); None when
        the case has no label file."""
        from ..data.brats import infer_label_convention, labels_to_regions
        from ..data.loading import check_same_grid, read_header, read_volume

        seg = case.paths.get("seg")
        if seg is None:
            return None
        try:
            check_same_grid([read_header(case.reference_path), read_header(seg)])
        except Exception as e:
            raise TargetError(
                f"the label file '{Path(seg).name}' is not on the image grid of case {case.case_id}"
            ) from e
        lab = read_volume(seg, is_label=True).as_tensor().numpy()  # nibabel's axis order
        regions = labels_to_regions(lab, infer_label_convention(np.unique(lab).tolist())).astype(np.float32)
        regions = _to_nifti_axes(regions)  # -> nnU-Net's reader order (the transposition is its own inverse)
        return torch.from_numpy(to_preprocessed_grid(self.model, regions, case.files) > 0.5)

    def plan(self, case: Any, *, inferer: Any, device: torch.device) -> PassPlan:
        """nnU-Net's prediction of the case as a pass plan (:func:`~medcam.frameworks.nnunet.pass_plan`: folds x
        tiles x mirrors; nnU-Net has its own sliding window, ``inferer`` is not used)."""
        return pass_plan(self.model, torch.as_tensor(case.image.as_tensor()))

    def segmentation(self, case: Any, output: torch.Tensor, threshold: float | None) -> np.ndarray:
        """nnU-Net's own export of the logits (``convert_predicted_logits_to_segmentation_with_correct_shape``):
        integer labels on the original grid, nibabel's axis order."""
        seg = self.model.segmentation(output[0].detach().float().cpu(), case.properties)
        return _to_nifti_axes(np.asarray(seg)[None])[0]

    def describe(self) -> Mapping[str, Any]:
        """The model (:meth:`NnUNetModel.describe`), its resolved folder and the fingerprint of its plans,
        dataset.json and checkpoint files (so a retrained checkpoint is not taken for a finished run)."""
        from ..pipeline.resume import fingerprint

        model = self.model
        folder = Path(model.folder)
        files = {name: folder / name for name in ("plans.json", "dataset.json")}
        files.update({f"fold_{f}": folder / f"fold_{f}" / model.checkpoint for f in model.folds})
        return {**model.describe(), "folder": str(folder.resolve()), "model_files": fingerprint(files)}


def load_adapter(
    folder: PathLike,
    folds: Sequence[int | str] = (0,),
    checkpoint: str = "checkpoint_final.pth",
    *,
    device: str = "cpu",
    **options: Any,
) -> NnUNetAdapter:
    """Load an nnU-Net model folder (:func:`medcam.frameworks.nnunet.load`, same arguments) as an adapter."""
    return from_model(load(Path(folder), folds, checkpoint, device=device, **options))


def from_model(model: NnUNetModel) -> NnUNetAdapter:
    """The adapter of an already loaded :class:`~medcam.frameworks.nnunet.NnUNetModel` (its predictor settings)."""
    p = model.predictor
    options = {"use_mirroring": bool(p.use_mirroring), "tile_step_size": p.tile_step_size}
    options["use_gaussian"] = bool(p.use_gaussian)
    device = str(next(model.network.parameters()).device)
    return NnUNetAdapter(Path(model.folder), tuple(model.folds), model.checkpoint, options, device, _model=model)
