"""nnU-Net v2 model folders as a framework adapter (``--model nnunet:FOLDER``), explained exactly as
``nnUNetPredictor`` runs them.

Everything nnU-Net defines is taken from the installed ``nnunetv2`` (2.8), never re-implemented: the network and fold
checkpoints (``nnUNetPredictor.initialize_from_trained_model_folder``), preprocessing (the configuration's
``preprocessor_class.run_case``), padding (``pad_nd_image``), tiles (``_internal_get_sliding_window_slicers``), the
Gaussian (``compute_gaussian``), the checkpoint's mirror axes, the logits (``predict_logits_from_preprocessed_data``)
and the export (``convert_predicted_logits_to_segmentation_with_correct_shape``; maps: ``resampling_fn_probabilities``,
``insert_crop_into_image``, ``transpose_backward``).

No pass logic lives here: :func:`pass_plan` states nnU-Net's prediction as a :class:`~medcam.plan.PassPlan`,
``Y = (1/F) sum_f sum_w G_w y_fw / sum_w G_w`` with ``y_fw = (1/M) sum_m flip_m(net_f(flip_m(x_w)))`` (folds x
tiles x mirrors), which the one executor explains for every method of ``medcam.METHODS``. ``Y`` is the predictor's
float16-accumulated tensor (as float32): the segmentation, predicted regions and the score use it; the passes are
differentiated exactly (the rounding has no derivative). It is ``logits=`` when given, else formed in the
explanation's own passes on the CPU (:class:`~medcam.plan.PredictorAccumulation`, bit-equal), else the predictor's
own run.

Cases (:meth:`NnUNetModel.discover`): nnU-Net's input layout, image files, BraTS folders or a CSV manifest
(:func:`medcam.pipeline.cases.discover_channel_cases`; BraTS modalities matched to ``dataset.json``'s channel names),
NIfTI read by ``SimpleITKIO`` or ``NibabelIO``. Masks, boxes and ``label:`` targets are given on the ORIGINAL grid
and taken to the preprocessed grid by nnU-Net's own preprocessor (:func:`to_preprocessed_grid`).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import torch

from ..data.brats import modality_of
from ..engine import BaseSegCAM
from ..errors import MedcamError, ModelError, TargetError
from ..hooks import ActivationHook
from ..plan import Accumulation, PassPlan, PredictorAccumulation
from ..result import CAMResult
from ..runner import ModelRunner, validate_image
from ..targets import ClassROI, PredictedROI, Target
from ..types import PathLike
from .base import Activation, Framework

__all__ = ["NnUNetError", "NnUNetModel", "NnUNetCase", "load", "explain", "pass_plan", "to_preprocessed_grid"]

#: nnunetv2 releases this module was written and tested against
SUPPORTED_VERSIONS = "2.8.x (tested with 2.8.1)"
_PREDICTOR_API = (
    "initialize_from_trained_model_folder",
    "predict_logits_from_preprocessed_data",
    "_internal_get_sliding_window_slicers",
)
#: pooled methods keep the hooked layer's activation of every pass up to this many bytes (host memory)
CACHE_BYTES = 1 << 30
#: nnU-Net readers whose arrays are the NIfTI file's axes reversed (``[k, j, i]``); medcam's case folder is NIfTI
_READERS = ("SimpleITKIO", "NibabelIO")
_NIFTI = (".nii.gz", ".nii")


class NnUNetError(ModelError):
    """An nnU-Net model folder, checkpoint, input or installation medcam cannot use (message says why and the fix)."""


def _nn() -> SimpleNamespace:
    """The nnU-Net functions medcam uses; a clear error if nnunetv2 is missing or its API moved."""
    try:
        import nnunetv2
        from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
        from acvl_utils.cropping_and_padding.padding import pad_nd_image
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian
    except ImportError as e:
        raise NnUNetError(
            f"nnU-Net v2 is not usable here ({e}); install it with: pip install nnunetv2 (or medcam[nnunet])"
        ) from e
    version = getattr(nnunetv2, "__version__", None)
    if version is None:
        import importlib.metadata

        version = importlib.metadata.version("nnunetv2")
    missing = [n for n in _PREDICTOR_API if not hasattr(nnUNetPredictor, n)]
    if missing:
        raise NnUNetError(
            f"nnunetv2 {version}: its API moved (nnUNetPredictor has no {', '.join(missing)}); medcam supports "
            f"nnunetv2 {SUPPORTED_VERSIONS}: pip install 'nnunetv2>=2.8,<3'"
        )
    return SimpleNamespace(
        version=version,
        nnUNetPredictor=nnUNetPredictor,
        compute_gaussian=compute_gaussian,
        pad_nd_image=pad_nd_image,
        insert_crop_into_image=insert_crop_into_image,
        to_segmentation=convert_predicted_logits_to_segmentation_with_correct_shape,
    )


def _to_nifti_axes(reader_order: np.ndarray) -> np.ndarray:
    """``[K, k, j, i]`` (nnU-Net's reader axis order for NIfTI) -> ``[K, i, j, k]`` (nibabel's), and back."""
    return np.ascontiguousarray(np.asarray(reader_order).transpose(0, 3, 2, 1))


@dataclass
class NnUNetCase:
    """One case preprocessed by nnU-Net (a :class:`~medcam.frameworks.base.ModelCase`).

    ``image`` is nnU-Net's preprocessed data ``[C, *S']`` (a MetaTensor whose affine holds the configuration's
    spacing); ``properties`` are nnU-Net's (needed by its export); :meth:`invert` is nnU-Net's export of
    probabilities, in nibabel's axis order of the reference file.
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


@dataclass
class NnUNetModel:
    """A trained nnU-Net v2 model folder, loaded with nnU-Net's own predictor: the nnU-Net
    :class:`~medcam.frameworks.base.FrameworkAdapter` (:func:`load` makes one).

    Picklable without its predictor: a worker of a distributed executor loads the folder once, on its own device
    (:meth:`setup`).

    Attributes:
        folder: the model folder (``<Trainer>__<Plans>__<configuration>``).
        folds: the folds whose checkpoints are averaged.
        checkpoint: checkpoint file name inside each ``fold_N``.
        options: ``use_mirroring``, ``tile_step_size``, ``use_gaussian`` of the predictor.
        device: where the network runs.
    """

    folder: Path
    folds: tuple[int | str, ...]
    checkpoint: str
    options: Mapping[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    framework: Framework = Framework.NNUNET
    _predictor: Any = field(default=None, repr=False)
    #: the plan loads each fold's weights itself: a randomised copy of the network cannot be explained
    #: (``medcam evaluate``'s sanity check is refused)
    own_executor: ClassVar[bool] = True

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_predictor": None}

    # ------------------------------------------------------------------ what nnU-Net defines
    @property
    def predictor(self) -> Any:
        """The initialised ``nnUNetPredictor`` (network, plans, label manager, mirror axes), loaded on first use."""
        if self._predictor is None:
            self._predictor = _load_predictor(self.folder, self.folds, self.checkpoint, self.device, self.options)
        return self._predictor

    @property
    def network(self) -> torch.nn.Module:
        """The trainer's network (``enable_deep_supervision=False``): ``[B, Cin, *patch] -> [B, C, *patch]`` logits."""
        return self.predictor.network

    @property
    def parameters(self) -> list[dict[str, torch.Tensor]]:
        """One ``state_dict`` per fold (the predictor's ``list_of_parameters``)."""
        return list(self.predictor.list_of_parameters)

    @property
    def dataset_json(self) -> dict[str, Any]:
        return self.predictor.dataset_json

    @property
    def label_manager(self) -> Any:
        return self.predictor.label_manager

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.predictor.configuration_manager.patch_size)

    @property
    def channel_names(self) -> list[str]:
        """Input channel names from ``dataset.json`` (``channel_names`` or ``modality``), in channel order."""
        names = self.dataset_json.get("channel_names", self.dataset_json.get("modality", {}))
        return [str(names[k]) for k in sorted(names, key=int)]

    @property
    def activation(self) -> Activation:
        """Sigmoid for region-based models, softmax for label-based ones (nnU-Net's inference nonlinearity)."""
        return Activation.SIGMOID if self.label_manager.has_regions else Activation.SOFTMAX

    @property
    def output_names(self) -> tuple[str, ...]:
        """Name of each output channel: the region names (region-based) or label names, from ``dataset.json``."""
        labels = self.dataset_json["labels"]
        if self.label_manager.has_regions:
            return tuple(str(k) for k, v in labels.items() if not (isinstance(v, int) and v == 0))
        by_value = {int(v): str(k) for k, v in labels.items() if isinstance(v, int)}
        return tuple(by_value.get(int(v), str(v)) for v in self.label_manager.all_labels)

    @property
    def mirror_axes(self) -> tuple[int, ...]:
        """Spatial axes nnU-Net mirrors over at test time (empty when mirroring is off or not allowed)."""
        axes = self.predictor.allowed_mirroring_axes
        return tuple(int(a) for a in axes) if (axes is not None and self.predictor.use_mirroring) else ()

    def channel(self, name: str) -> int:
        """Output channel of a label/region name of ``dataset.json`` (case-insensitive)."""
        names = [n.lower() for n in self.output_names]
        if name.lower() not in names:
            raise NnUNetError(f"'{name}' is not a label or region of this model; it has {list(self.output_names)}")
        return names.index(name.lower())

    def target(self, name: str, kind: str = "predicted") -> Target:
        """A target by ``dataset.json`` name: the predicted region (default) or the whole channel (``"class"``)."""
        c = self.channel(name)
        return ClassROI(c) if kind == "class" else PredictedROI(c, activation=self.activation.value)

    # ------------------------------------------------------------------ running it as nnU-Net does
    def preprocess(self, files: Sequence[PathLike]) -> tuple[torch.Tensor, dict[str, Any]]:
        """nnU-Net's preprocessing of one case (one file per channel, ``dataset.json`` order) -> ``(data [C, *S']``
        float32 on the preprocessed grid, ``properties)`` (``run_case``'s, needed to go back to the original grid)."""
        files = [str(f) for f in files]
        if len(files) != len(self.channel_names):
            raise NnUNetError(
                f"the model takes {len(self.channel_names)} input channels {self.channel_names} (dataset.json "
                f"channel_names), got {len(files)} file(s)"
            )
        for f in files:
            if not Path(f).is_file():
                raise NnUNetError(f"input file '{f}' does not exist")
        p = self.predictor
        pre = p.configuration_manager.preprocessor_class(verbose=False)
        data, _, props = pre.run_case(files, None, p.plans_manager, p.configuration_manager, self.dataset_json)
        return torch.from_numpy(np.ascontiguousarray(data)).float(), props

    def predict_logits(self, data: torch.Tensor) -> torch.Tensor:
        """nnU-Net's own prediction (tiles, Gaussian blending, mirroring, fold average): ``[C_out, *S']`` float32."""
        return self.predictor.predict_logits_from_preprocessed_data(data).float()

    def export_segmentation(self, logits: torch.Tensor, properties: dict[str, Any]) -> np.ndarray:
        """nnU-Net's segmentation of ``logits [C_out, *S']`` on the original grid (its export path), integer labels
        in its reader's axis order."""
        p = self.predictor
        return _nn().to_segmentation(logits, p.plans_manager, p.configuration_manager, self.label_manager, properties)

    def to_original_grid(self, maps: torch.Tensor, properties: dict[str, Any]) -> np.ndarray:
        """Maps ``[K, *S']`` on the preprocessed grid -> ``[K, *original]`` float32, as nnU-Net exports its logits:
        ``resampling_fn_probabilities``, put back into the crop's bounding box (zero outside), transposed back;
        axis order of nnU-Net's image reader (SimpleITK: z, y, x)."""
        pm, cm = self.predictor.plans_manager, self.predictor.configuration_manager
        shape = properties["shape_after_cropping_and_before_resampling"]
        spacing_t = [properties["spacing"][i] for i in pm.transpose_forward]
        current = cm.spacing if len(cm.spacing) == len(shape) else [spacing_t[0], *cm.spacing]
        m = maps.detach().float().cpu()
        res = cm.resampling_fn_probabilities(m, shape, current, spacing_t)
        res = res.numpy() if isinstance(res, torch.Tensor) else np.asarray(res)
        full = np.zeros((m.shape[0], *properties["shape_before_cropping"]), dtype=np.float32)
        crop = [[0, m.shape[0]], *properties["bbox_used_for_cropping"]]
        full = _nn().insert_crop_into_image(full, res.astype(np.float32), crop)
        return np.ascontiguousarray(full.transpose([0, *[i + 1 for i in pm.transpose_backward]]))

    # ------------------------------------------------------------------ the adapter (medcam.frameworks.base)
    def setup(self, device: str) -> NnUNetModel:
        """This model with its predictor loaded on ``device`` (once)."""
        if self._predictor is None or device != self.device:
            self.device, self._predictor = device, None
            _ = self.predictor
        return self

    @property
    def channel_order(self) -> list[str]:
        """The BraTS modality of each model channel, from its ``dataset.json`` name (``data.brats.modality_of``)."""
        order = [modality_of(n) or "" for n in self.channel_names]
        if "" in order or len(set(order)) != len(order):
            raise NnUNetError(
                f"the model's channels {self.channel_names} (dataset.json channel_names) cannot be matched to the "
                "BraTS modalities of these cases; give each case as image files in channel order, or in nnU-Net's "
                "layout (a folder of CASE_0000<ending>, CASE_0001<ending>, ...)"
            )
        return order

    def discover(self, inputs: Sequence[PathLike], case_id: str | None = None) -> list[Any]:
        """The cases of ``inputs`` (:func:`~medcam.pipeline.cases.discover_channel_cases` with ``dataset.json``'s
        channels and file ending); BraTS layouts need channel names of BraTS modalities; NIfTI only."""
        from ..pipeline.cases import CaseLayout, discover_channel_cases

        reader = self.predictor.plans_manager.image_reader_writer_class.__name__
        if reader not in _READERS:
            raise NnUNetError(
                f"this model reads images with {reader}; medcam explains nnU-Net models whose reader is one of "
                f"{', '.join(_READERS)} (NIfTI cases)"
            )
        endings = [str(self.dataset_json.get("file_ending", ".nii.gz")), *_NIFTI]
        cases = discover_channel_cases(inputs, len(self.channel_names), endings, case_id)
        if any(c.kind is not CaseLayout.VOLUMES for c in cases):
            _ = self.channel_order  # checked before any case
        for c in cases:
            other = [f for f in c.channel_files() if not str(f).endswith(_NIFTI)]
            if other:
                raise NnUNetError(
                    f"case {c.case_id}: '{other[0].name}' is not NIfTI; medcam's case folder is NIfTI on the input's "
                    "grid (convert the case, e.g. with SimpleITK, to .nii.gz)"
                )
        return cases

    def load_case(self, source: Any) -> NnUNetCase:
        """nnU-Net's preprocessing of the case's channel files (``dataset.json`` order)."""
        from monai.data import MetaTensor

        from ..data.loading import read_header
        from ..pipeline.cases import CaseLayout

        files = source.files_in_order(self.channel_order if source.kind is not CaseLayout.VOLUMES else ())
        data, props = self.preprocess(files)
        spacing = [float(v) for v in self.predictor.configuration_manager.spacing]
        if len(spacing) < data.ndim - 1:  # a 2D configuration: the first (slice) axis keeps the case's spacing
            spacing = [float(props["spacing"][self.predictor.plans_manager.transpose_forward[0]]), *spacing]
        image = MetaTensor(data, affine=torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64)))
        names = [modality_of(n) or n for n in self.channel_names]  # BraTS names where they are (figures)
        names = names if len(set(names)) == len(names) else self.channel_names
        paths = dict(zip(names, files))
        if source.files.get("seg") is not None:
            paths["seg"] = Path(source.files["seg"])
        props = {**props, "case_id": source.case_id}
        header = read_header(files[0])
        shape = (int(header.shape[0]), int(header.shape[1]), int(header.shape[2]))
        return NnUNetCase(
            image, props, files, paths, files[0], source.case_id, tuple(names), shape, header.affine, self
        )

    def targets(self, specs: Sequence[Any], case: Any, source: Any, threshold: float | None) -> list[Target]:
        """One target per spec on the preprocessed grid: predicted/component targets with nnU-Net's nonlinearity
        (``threshold`` None: 0.5 for sigmoid, argmax for softmax); masks, boxes and labels read on the original grid
        and mapped by :func:`to_preprocessed_grid`."""
        from ..pipeline.target_specs import build_targets, roi_on_original_grid

        spatial = [s for s in specs if s.kind in ("mask", "box", "label")]
        masks = []
        if spatial:
            rois = [roi_on_original_grid(s, case.files[0], case.case_id, case.paths.get("seg")) for s in spatial]
            on_grid = to_preprocessed_grid(self, _to_nifti_axes(np.stack(rois)), case.files)
            if tuple(on_grid.shape[1:]) != tuple(case.image.shape[1:]):
                raise NnUNetError(
                    f"masks preprocessed to {on_grid.shape[1:]}, the data to {tuple(case.image.shape[1:])}"
                )
            for s, m in zip(spatial, on_grid):
                if not m.any():
                    raise TargetError(f"--target {s.text!r}: the ROI falls outside the preprocessed (cropped) image")
                masks.append(m)
        for s in specs:
            if s.channel >= len(self.output_names):
                raise TargetError(
                    f"--target {s.text!r}: channel {s.channel} is out of range, the model has {len(self.output_names)}"
                )
        return build_targets(specs, None, activation=self.activation.value, threshold=threshold, masks=masks)

    def predict(
        self, case: Any, targets: Sequence[Any], *, inferer: Any, device: torch.device, amp: bool
    ) -> torch.Tensor | None:
        """None: the first explanation forms nnU-Net's logits in its own passes, bit-equal to the predictor's (where
        that is not available, e.g. on a GPU, it runs the predictor itself and says so in ``stats``)."""
        if amp:
            raise NnUNetError("--amp does not apply to nnU-Net models: the predictor's own precision is used")
        return None

    def predict_image(self, case: Any, image: torch.Tensor, *, inferer: Any, device: torch.device) -> torch.Tensor:
        """nnU-Net's own prediction (:meth:`predict_logits`) of each volume of ``image`` ``[N, C, *S']`` on the
        case's grid (e.g. perturbed copies of ``case.image``) -> ``[N, C_out, *S']`` float32 on ``image.device``."""
        from ..pipeline.adapters import check_on_case_grid

        check_on_case_grid(case, image)
        return torch.stack([self.predict_logits(x.detach().float().cpu()) for x in image]).to(image.device)

    def reference_regions(self, case: Any, source: Any) -> torch.Tensor | None:
        """The case's BraTS label file (``seg``) as region masks ``[3, *S']`` (TC, WT, ET) on the preprocessed grid:
        read on the original grid, taken through nnU-Net's preprocessor (:func:`to_preprocessed_grid`); None when
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
        return torch.from_numpy(to_preprocessed_grid(self, _to_nifti_axes(regions), case.files) > 0.5)

    def plan(self, case: Any, *, inferer: Any, device: torch.device) -> PassPlan:
        """nnU-Net's prediction of the case as a pass plan (:func:`pass_plan`; ``inferer`` is not used)."""
        return pass_plan(self, torch.as_tensor(case.image.as_tensor()))

    def segmentation(self, case: Any, output: torch.Tensor, threshold: float | None) -> np.ndarray:
        """nnU-Net's own export of the logits ``[1, C_out, *S']``: integer labels on the original grid, nibabel's
        axis order."""
        seg = self.export_segmentation(output[0].detach().float().cpu(), case.properties)
        return _to_nifti_axes(np.asarray(seg)[None])[0]

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description (``summary.json``'s ``model``), with the fingerprint of the plans,
        dataset.json and checkpoint files (so that a retrained checkpoint is not taken for a finished run)."""
        from ..pipeline.resume import fingerprint

        p, folder = self.predictor, Path(self.folder)
        files = {name: folder / name for name in ("plans.json", "dataset.json")}
        files.update({f"fold_{f}": folder / f"fold_{f}" / self.checkpoint for f in self.folds})
        return {
            "framework": "nnunetv2", "nnunetv2_version": _nn().version, "folder": str(folder.resolve()),
            "folds": list(self.folds), "checkpoint": self.checkpoint, "trainer": p.trainer_name,
            "configuration": folder.name.split("__")[-1], "patch_size": list(self.patch_size),
            "tile_step_size": p.tile_step_size, "use_gaussian": bool(p.use_gaussian),
            "mirror_axes": list(self.mirror_axes), "outputs": list(self.output_names),
            "activation": self.activation.value, "channel_names": self.channel_names,
            "model_files": fingerprint(files),
        }  # fmt: skip


def _check_folder(folder: Path, folds: Sequence[int | str], checkpoint: str) -> None:
    if not folder.is_dir():
        raise NnUNetError(f"nnU-Net model folder '{folder}' does not exist")
    missing = [n for n in ("dataset.json", "plans.json") if not (folder / n).is_file()]
    if missing:
        raise NnUNetError(
            f"'{folder}' is not an nnU-Net model folder: {' and '.join(missing)} missing (give the "
            "<Trainer>__<Plans>__<configuration> folder under nnUNet_results/DatasetXXX_Name)"
        )
    have = sorted(p.name for p in folder.glob("fold_*") if p.is_dir())
    if not folds:
        raise NnUNetError("no folds given; e.g. folds=(0,) or --folds 0,1,2,3,4")
    for f in folds:
        d = folder / f"fold_{f}"
        if not d.is_dir():
            raise NnUNetError(f"'{folder}' has no fold_{f} (it has {', '.join(have) or 'no fold folders'})")
        if not (d / checkpoint).is_file():
            there = sorted(p.name for p in d.glob("*.pth"))
            raise NnUNetError(
                f"fold_{f} of '{folder}' has no {checkpoint} (it has {', '.join(there) or 'no checkpoint'}); "
                "pick one with checkpoint=/--checkpoint-name, e.g. checkpoint_best.pth"
            )


def load(
    folder: PathLike,
    folds: Sequence[int | str] = (0,),
    checkpoint: str = "checkpoint_final.pth",
    *,
    device: str | torch.device = "cpu",
    use_mirroring: bool = True,
    tile_step_size: float = 0.5,
    use_gaussian: bool = True,
) -> NnUNetModel:
    """Load a trained nnU-Net v2 model folder with nnU-Net's ``nnUNetPredictor`` (nothing is downloaded).

    Args:
        folder: ``<results>/DatasetXXX_Name/<Trainer>__<Plans>__<configuration>`` with ``dataset.json``,
            ``plans.json`` and ``fold_N/<checkpoint>``.
        folds: folds to average (``"all"`` for a fold_all model).
        checkpoint: ``checkpoint_final.pth`` or ``checkpoint_best.pth``.
        device: where the network runs.
        use_mirroring, tile_step_size, use_gaussian: as ``nnUNetPredictor`` (its defaults).

    Raises:
        NnUNetError: not a model folder, missing fold/checkpoint, a checkpoint that does not fit the network built
            from the plans (another trainer/architecture), nnunetv2 missing or with a moved API.
    """
    folder = Path(folder)
    folds = tuple(f if f == "all" else int(f) for f in folds)
    _check_folder(folder, folds, checkpoint)
    options = {"use_mirroring": use_mirroring, "tile_step_size": tile_step_size, "use_gaussian": use_gaussian}
    return NnUNetModel(folder, folds, checkpoint, options, str(torch.device(device))).setup(str(torch.device(device)))


def _load_predictor(
    folder: Path, folds: tuple[int | str, ...], checkpoint: str, device: str, options: Mapping[str, Any]
) -> Any:
    """nnU-Net's predictor of the model folder on ``device``, every fold's checkpoint checked against its network."""
    nn_ = _nn()
    dev = torch.device(device)
    with contextlib.redirect_stdout(io.StringIO()):  # its constructor prints a notice on non-CUDA devices
        predictor = nn_.nnUNetPredictor(
            **dict(options), perform_everything_on_device=dev.type == "cuda", device=dev, verbose=False,
            allow_tqdm=False,
        )  # fmt: skip
    misfit = f"does not fit the network nnU-Net builds from '{folder}/plans.json'"
    try:
        predictor.initialize_from_trained_model_folder(str(folder), folds, checkpoint_name=checkpoint)
    except RuntimeError as e:
        if "torchvision" in str(e):
            raise NnUNetError(
                f"nnU-Net's search for trainer class of '{folder}' imported torchvision, which cannot load beside "
                f"this torch {torch.__version__} ({str(e).splitlines()[0]}); install the torchvision built for it "
                "(trainers other than nnUNetTrainer are looked up by importing every nnU-Net trainer module)"
            ) from e
        if "state_dict" in str(e):
            raise NnUNetError(f"fold_{folds[0]}/{checkpoint} {misfit} (another trainer, plans or architecture?)") from e
        raise NnUNetError(f"nnU-Net could not load '{folder}' ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    except (KeyError, ValueError, TypeError, AttributeError, AssertionError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise NnUNetError(
            f"nnU-Net could not load '{folder}' with fold(s) {list(folds)} / {checkpoint} "
            f"({type(e).__name__}: {first[:200]}); is it a model folder written by nnunetv2 {SUPPORTED_VERSIONS}?"
        ) from e
    net = predictor.network
    for f, params in zip(folds, predictor.list_of_parameters):
        try:
            net.load_state_dict(params)
        except RuntimeError as e:
            raise NnUNetError(
                f"fold_{f}/{checkpoint} {misfit} ({predictor.trainer_name}); another trainer or architecture?"
            ) from e
    net.load_state_dict(predictor.list_of_parameters[0])
    predictor.network = net.to(dev).eval()
    return predictor


# ---------------------------------------------------------------------------------------------------- the plan
def _mirror_combinations(axes: Sequence[int], nd: int) -> list[tuple[int, ...]]:
    """nnU-Net's combinations (identity first), as dims of a ``[B, C, *S]`` tensor."""
    if axes and max(axes) > nd - 1:
        raise NnUNetError(f"mirror axes {tuple(axes)} do not fit {nd} spatial dims")
    dims = [a + 2 for a in axes]
    return [(), *[c for i in range(len(dims)) for c in itertools.combinations(dims, i + 1)]]


def pass_plan(model: NnUNetModel, data: torch.Tensor) -> PassPlan:
    """nnU-Net's prediction of ``data`` ``[Cin, *S']`` (or ``[1, Cin, *S']``, preprocessed) as a pass plan: folds x
    tiles x mirrors.

    Padding (``pad_nd_image``), tiles (``_internal_get_sliding_window_slicers``), the Gaussian (``compute_gaussian``
    with the predictor's arguments; ones without it), mirror combinations, fold weights; the prediction is the
    predictor's (:meth:`NnUNetModel.predict_logits`) and, on the CPU in the network's dtype (not float16), it is
    formed in the explanation's own passes (:class:`~medcam.plan.PredictorAccumulation`). Weights and maps are
    float32 (float64 for a float64 network) on the predictor's results device (the network's GPU with
    ``perform_everything_on_device``, as :func:`load` sets it on CUDA; else the CPU).

    Raises:
        NnUNetError: data that is not one case of the model's channels and spatial dims.
    """
    data = _check_data(model, data)
    p0 = next(model.network.parameters())
    patch, nn_ = model.patch_size, _nn()
    wdtype = torch.float64 if p0.dtype == torch.float64 else torch.float32
    on_device = p0.device.type != "cpu" and bool(model.predictor.perform_everything_on_device)
    device = p0.device if on_device else torch.device("cpu")
    padded, revert = nn_.pad_nd_image(data.cpu(), patch, "constant", {"value": 0}, True, None)
    windows = [tuple(s[1:]) for s in model.predictor._internal_get_sliding_window_slicers(padded.shape[1:])]
    half = None
    if model.predictor.use_gaussian:
        half = nn_.compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu"))
    gauss = (half if half is not None else torch.ones(patch)).to(device=device, dtype=wdtype)

    def predict(plan: PassPlan, runner: ModelRunner, hook: ActivationHook, progress: bool) -> torch.Tensor:
        x = data.float() if p0.dtype == torch.float16 else data
        reset = model.network.register_forward_pre_hook(lambda *_: hook.reset())  # one capture per network call
        try:
            return model.predict_logits(x)[None]
        finally:
            reset.remove()

    def accumulate(plan: PassPlan, n_out: int) -> Accumulation:
        from nnunetv2.configuration import default_num_processes

        return PredictorAccumulation(plan, n_out, half, threads=default_num_processes)

    return PassPlan(
        image=padded[None].to(device), crop=tuple(revert[1:]), windows=windows, importance=gauss,
        count=None,  # n = sum G over the tiles: built when many tiles run (PassPlan.count_for)
        device=device, net_device=p0.device, mirrors=_mirror_combinations(model.mirror_axes, len(patch)),
        folds=model.parameters, input_dtype=p0.dtype, predict=predict,
        accumulation=accumulate if p0.device.type == "cpu" and p0.dtype != torch.float16 else None,
        prediction_always=True, n_out=int(model.label_manager.num_segmentation_heads),
        example=_layer_example(model, p0), cache_bytes=CACHE_BYTES, description={"plan": "nnunet"},
    )  # fmt: skip


def explain(
    cam: BaseSegCAM,
    model: NnUNetModel,
    data: torch.Tensor,
    targets: Target | Sequence[Target],
    *,
    relu: bool = True,
    logits: torch.Tensor | None = None,
    progress: bool = False,
) -> CAMResult:
    """Explain nnU-Net's prediction of one preprocessed case as the predictor forms it (module docstring), with the
    explainer's own execution (every method of ``medcam.METHODS``, SyCAM expressions). ``S = sum W * Y``.

    Args:
        cam: an explainer built on ``model.network`` without an inferer (e.g. ``medcam.SegGradCAM(model.network)``).
        model: from :func:`load`.
        data: ``[C, *S']`` (or ``[1, C, *S']``) from :meth:`NnUNetModel.preprocess`.
        targets: targets on the logits ``[1, C_out, *S']`` (see :meth:`NnUNetModel.target` for names).
        relu: apply ReLU to the summed maps.
        logits: nnU-Net's logits ``[C_out, *S']`` if already predicted.
        progress: tqdm bars per pass.

    Returns:
        :class:`~medcam.engine.CAMResult` with maps ``[1, K, *S']`` on the preprocessed grid (float32, CPU),
        ``output`` = ``Y[None]`` ``[1, C_out, *S']`` (CPU), scores ``[1, K]``, and ``stats`` (``prediction``:
        "given", "predictor", "fused" or "one_pass"; counts of tiles and passes); :meth:`NnUNetModel.to_original_grid`
        maps them back.
    """
    if cam.model is not model.network or cam.inferer is not None:
        raise MedcamError("build the explainer on model.network of this nnU-Net model, without an inferer")
    plan = pass_plan(model, data)
    given = None if logits is None else logits.detach()[None].float().cpu()  # its grid checked by the executor
    res = cam.explain_plan(plan, targets, relu=relu, output=given, progress=progress or cam.progress)
    res.maps = res.maps.cpu()
    res.output = None if res.output is None else res.output.cpu()
    return res


def _check_data(model: NnUNetModel, data: torch.Tensor) -> torch.Tensor:
    """``data`` as ``[Cin, *S']``, or a clear error before any network pass."""
    patch = model.patch_size
    x = validate_image(data if data.ndim == len(patch) + 2 else data[None])
    if x.shape[0] != 1:
        raise MedcamError(f"nnU-Net explains one case at a time; got a batch of {x.shape[0]}")
    if x.shape[1] != len(model.channel_names):
        raise NnUNetError(
            f"the data has {x.shape[1]} channels; the model takes {len(model.channel_names)} {model.channel_names}"
        )
    if x.ndim - 2 != len(patch):
        raise NnUNetError(f"data {tuple(x.shape[1:])} does not have the {len(patch)} spatial dims of the patch {patch}")
    return x[0]


def _layer_example(model: NnUNetModel, p0: torch.Tensor) -> torch.Tensor:
    """A zero input for resolving ``layer="auto"``: twice the network's total stride per axis (at most the patch),
    so that the coarsest stage has 2 voxels a side; its forward costs a fraction of a tile's."""
    patch = model.patch_size
    try:
        pools = model.predictor.configuration_manager.pool_op_kernel_sizes
        strides = [math.prod(int(s[d]) for s in pools) for d in range(len(patch))]
        size = [min(p, 2 * s) if p % s == 0 else p for p, s in zip(patch, strides)]
    except (KeyError, TypeError, IndexError):  # plans without strides: a whole tile
        size = list(patch)
    return torch.zeros((1, len(model.channel_names), *size), dtype=p0.dtype, device=p0.device)


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
    data, props = p.plans_manager.image_reader_writer_class().read_images([str(f) for f in files])
    m = np.asarray(masks)
    if tuple(m.shape[1:]) != tuple(data.shape[1:]):
        raise TargetError(f"masks {tuple(m.shape[1:])} are not on the case's image grid {tuple(data.shape[1:])}")
    pre = p.configuration_manager.preprocessor_class(verbose=False)
    with contextlib.redirect_stdout(io.StringIO()):  # its foreground sampling may print
        _, seg, _ = pre.run_case_npy(
            data, (m != 0).astype(np.int8), props, p.plans_manager, p.configuration_manager, model.dataset_json
        )
    return (np.asarray(seg) == 1).astype(np.float32)
