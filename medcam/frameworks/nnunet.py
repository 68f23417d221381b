"""nnU-Net v2 model folders, explained exactly as ``nnUNetPredictor`` runs them.

Everything nnU-Net defines is taken from the installed ``nnunetv2`` (written against 2.8), never re-implemented: the
network (``nnUNetPredictor.initialize_from_trained_model_folder``, i.e. the trainer's
``build_network_architecture`` from the plans, fold checkpoints), preprocessing (the configuration's
``prepressor_class.run_case``: crop to non-zero, transpose, resampling, per-channel normalisation), padding
(``pad_nd_image``), the tile grid (``nnUNetPredictor._internal_get_sliding_window_slicers`` with its
``tile_step_size``), the Gaussian importance map (``compute_gaussian`` with the predictor's arguments), the
test-time mirroring axes stored in the checkpoint, the logits themselves (``predict_logits_from_preprocessed_data``)
and the export to the original image (``convert_predicted_logits_to_segmentation_with_correct_shape``; maps take the
same steps: ``resampling_fn_probabilities``, ``insert_crop_into_image``, ``transpose_backward``).

Definition (what is explained). nnU-Net's logits on the preprocessed grid are

    Y = (1/F) sum_f Y_f,    Y_f(u) = sum_w G_w(u) y_fw(u) / n(u),    n(u) = sum_w G_w(u),
    y_fw = (1/M) sum_m flip_m(net_f(flip_m(x_w)))

(``F`` folds, windows ``w`` with Gaussian ``G_w``, ``M`` = 1 + number of mirror-axis combinations, ``flip_m`` the
flip over combination ``m``). The score is ``S = sum_u W(u) Y(u)``, so the output gradient of one network pass is

    dS/d net_f(flip_m x_w) = flip_m(W G_w / n) / (M F)                                            (1)

and every (fold, window, mirror) pass is differentiated on its own with (1): no graph spans two passes.
Element-wise methods (HiResCAM, LayerCAM): each pass's map is upsampled to the tile, flipped back with ``flip_m``
and summed into the volume. Pooled methods (Grad-CAM, XGrad-CAM, Grad-CAM++): the statistics are sums over all
passes (a flip does not change a sum; activation sums use the blending weight ``flip_m(G_w/n)/(M F)``), the channel
weights are global, and each pass's ``sum_k alpha_k A_k`` is upsampled, flipped back and blended with
``G_w / n / (M F)``, like the output. With one tile, one fold and no mirroring both reduce exactly to the
whole-volume explanation of the network.

What ``Y`` is, precisely (float16). ``Y`` is the tensor nnU-Net's predictor returns
(``predict_logits_from_preprocessed_data``), as float32: per fold, each tile's mirror mean (computed in the network's
dtype) times the float16 Gaussian is added into a **float16** buffer, the Gaussian into a float16 count, the buffer
is divided by the count in float16; the folds' results are summed and divided in float16. So ``Y`` holds float16
values (relative rounding 2^-11 per operation, more where only the Gaussian's tails reach, at the volume's
corners); medcam uses this ``Y`` for everything that depends on the prediction: the segmentation (equal to
nnU-Net's), the region of predicted targets, the score ``S = sum_u W(u) Y(u)`` (a float32 sum of float32 ``W`` times
``Y``) and, for probability scores, ``dS/dY`` at ``Y``. The network passes are differentiated with (1) in exact
arithmetic (float32; float64 for a float64 network): the rounding has no derivative, so the maps are those of the
unrounded ``Y`` (in the tests, against float64 autograd: 1e-5), while ``S`` carries ``Y``'s float16 rounding
(about 1 % in the one-tile test).

Where ``Y`` comes from: ``logits=`` when the caller has them (a pipeline that ran the predictor); else, on the CPU
when no target's region depends on the prediction (box, mask, voxel, class targets) and the score is on logits, it
is accumulated from the gradient pass's own forward passes operation by operation as the predictor does
(:class:`_PredictorLogits`; bit-equal to the predictor's, tested), so that no separate prediction runs; else
nnU-Net's predictor runs first.

Passes (one function each, sharing an :class:`_ExplainState`): (A) :func:`_activation_statistics_pass`
(XGrad-CAM, Grad-CAM++): forward to the layer for every pass; (1) :func:`_gradient_pass` (or
:func:`_fused_gradient_pass`): forward with the graph from the hooked layer on plus one backward per target, for the
passes whose tile touches an ROI (every pass when the prediction is fused: the others forward only); (2)
:func:`_map_pass` (pooled methods): the maps from the channel weights, with the activations kept from the earlier
passes (up to :data:`CACHE_BYTES`) or a forward to the layer.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from ..engine import BaseSegCAM
from ..errors import MedcamError, ModelError
from ..formulas import (
    ActivationPooledFormula,
    ElementwiseFormula,
    Formula,
    PooledFormula,
    Statistics,
    weighted_channel_sum,
)
from ..hooks import ActivationHook
from ..result import CAMResult
from ..runner import ModelRunner, validate_image
from ..targets import ClassROI, PredictedROI, Target, as_target_list

__all__ = ["NnUNetError", "NnUNetModel", "load", "explain", "check_method", "SUPPORTED_VERSIONS"]

logger = logging.getLogger(__name__)

#: nnunetv2 releases this module was written and tested against
SUPPORTED_VERSIONS = "2.8.x (tested with 2.8.1)"
_PREDICTOR_API = (
    "initialize_from_trained_model_folder",
    "predict_logits_from_preprocessed_data",
    "_internal_get_sliding_window_slicers",
)


#: pooled methods keep the hooked layer's activation of every pass up to this many bytes (host memory)
CACHE_BYTES = 1 << 30


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


@dataclass
class NnUNetModel:
    """A trained nnU-Net v2 model folder loaded with nnU-Net's own predictor.

    Attributes:
        folder: the model folder (``<Trainer>__<Plans>__<configuration>``).
        folds: the folds whose checkpoints are averaged.
        checkpoint: checkpoint file name inside each ``fold_N``.
        predictor: the initialised ``nnunetv2`` ``nnUNetPredictor`` (network, plans, label manager, mirror axes).
        parameters: one ``state_dict`` per fold (the predictor's ``list_of_parameters``).
    """

    folder: Path
    folds: tuple[int | str, ...]
    checkpoint: str
    predictor: Any
    parameters: list[dict[str, torch.Tensor]] = field(default_factory=list)

    # ------------------------------------------------------------------ what nnU-Net defines
    @property
    def network(self) -> torch.nn.Module:
        """The trainer's network (``enable_deep_supervision=False``): ``[B, Cin, *patch] -> [B, C, *patch]`` logits."""
        return self.predictor.network

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
    def activation(self) -> Literal["sigmoid", "softmax"]:
        """``"sigmoid"`` for region-based models, ``"softmax"`` for label-based ones (nnU-Net's inference nonlin)."""
        return "sigmoid" if self.label_manager.has_regions else "softmax"

    @property
    def output_names(self) -> list[str]:
        """Name of each output channel: the region names (region-based) or label names, from ``dataset.json``."""
        labels = self.dataset_json["labels"]
        if self.label_manager.has_regions:
            return [str(k) for k, v in labels.items() if not (isinstance(v, int) and v == 0)]
        by_value = {int(v): str(k) for k, v in labels.items() if isinstance(v, int)}
        return [by_value.get(int(v), str(v)) for v in self.label_manager.all_labels]

    @property
    def mirror_axes(self) -> tuple[int, ...]:
        """Spatial axes nnU-Net mirrors over at test time (empty when mirroring is off or not allowed)."""
        axes = self.predictor.allowed_mirroring_axes
        return tuple(int(a) for a in axes) if (axes is not None and self.predictor.use_mirroring) else ()

    def channel(self, name: str) -> int:
        """Output channel of a label/region name of ``dataset.json`` (case-insensitive)."""
        names = [n.lower() for n in self.output_names]
        if name.lower() not in names:
            raise NnUNetError(f"'{name}' is not a label or region of this model; it has {self.output_names}")
        return names.index(name.lower())

    def target(self, name: str, kind: str = "predicted") -> Target:
        """A target by ``dataset.json`` name: the predicted region (default) or the whole channel (``"class"``)."""
        c = self.channel(name)
        if kind == "class":
            return ClassROI(c)
        return PredictedROI(c, activation=self.activation)

    # ------------------------------------------------------------------ running it as nnU-Net does
    def preprocess(self, files: Sequence[str | Path]) -> tuple[torch.Tensor, dict[str, Any]]:
        """nnU-Net's preprocessing of one case (one file per channel, ``dataset.json`` order).

        Returns ``(data [C, *S'] float32 on the preprocessed grid, properties)`` (properties as nnU-Net's
        ``run_case`` gives them; needed to go back to the original grid).
        """
        files = [str(f) for f in files]
        if len(files) != len(self.channel_names):
            raise NnUNetError(
                f"the model takes {len(self.channel_names)} input channels {self.channel_names} (dataset.json "
                f"channel_names), got {len(files)} file(s)"
            )
        for f in files:
            if not Path(f).is_file():
                raise NnUNetError(f"input file '{f}' does not exist")
        pred = self.predictor
        pre = pred.configuration_manager.preprocessor_class(verbose=False)
        data, _, props = pre.run_case(files, None, pred.plans_manager, pred.configuration_manager, self.dataset_json)
        return torch.from_numpy(np.ascontiguousarray(data)).float(), props

    def predict_logits(self, data: torch.Tensor) -> torch.Tensor:
        """nnU-Net's own prediction (tiles, Gaussian blending, mirroring, fold average): ``[C_out, *S']`` float32."""
        return self.predictor.predict_logits_from_preprocessed_data(data).float()

    def segmentation(self, logits: torch.Tensor, properties: dict[str, Any]) -> np.ndarray:
        """nnU-Net's segmentation on the original image grid (its export path), integer labels."""
        nn_ = _nn()
        p = self.predictor
        return nn_.to_segmentation(logits, p.plans_manager, p.configuration_manager, self.label_manager, properties)

    def to_original_grid(self, maps: torch.Tensor, properties: dict[str, Any]) -> np.ndarray:
        """Maps ``[K, *S']`` on the preprocessed grid -> ``[K, *original]`` float32, as nnU-Net exports its logits.

        Resampled with the configuration's ``resampling_fn_probabilities``, put back into the crop's bounding box
        (zero outside), transposed back; axis order of nnU-Net's image reader (SimpleITK: z, y, x).
        """
        nn_ = _nn()
        pm, cm = self.predictor.plans_manager, self.predictor.configuration_manager
        shape = properties["shape_after_cropping_and_before_resampling"]
        spacing_t = [properties["spacing"][i] for i in pm.transpose_forward]
        current = cm.spacing if len(cm.spacing) == len(shape) else [spacing_t[0], *cm.spacing]
        m = maps.detach().float().cpu()
        res = cm.resampling_fn_probabilities(m, shape, current, spacing_t)
        res = res.numpy() if isinstance(res, torch.Tensor) else np.asarray(res)
        full = np.zeros((m.shape[0], *properties["shape_before_cropping"]), dtype=np.float32)
        full = nn_.insert_crop_into_image(
            full, res.astype(np.float32), [[0, m.shape[0]], *properties["bbox_used_for_cropping"]]
        )
        return np.ascontiguousarray(full.transpose([0, *[i + 1 for i in pm.transpose_backward]]))

    def write_map(self, array: np.ndarray, properties: dict[str, Any], path: str | Path) -> Path:
        """Write one map ``[*original]`` (from :meth:`to_original_grid`) with the input image's geometry.

        Any format SimpleITK writes (``.nii.gz``, ``.nrrd``, ``.mha``, ...); written to a temporary file and renamed.
        """
        import SimpleITK as sitk

        stuff = properties.get("sitk_stuff")
        if stuff is None:
            raise NnUNetError(
                "this model reads images with "
                f"{self.predictor.plans_manager.image_reader_writer_class.__name__}; medcam writes maps for models "
                "read with SimpleITKIO (nnU-Net's default for NIfTI, NRRD, MHA)"
            )
        arr = np.asarray(array, dtype=np.float32)
        if len(stuff["spacing"]) == 2:
            arr = arr[0]
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(stuff["spacing"])
        img.SetOrigin(stuff["origin"])
        img.SetDirection(stuff["direction"])
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{''.join(path.suffixes)}")
        sitk.WriteImage(img, str(tmp), True)
        tmp.replace(path)
        return path

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description (for summary.json)."""
        return {
            "framework": "nnunetv2",
            "nnunetv2_version": _nn().version,
            "folder": str(self.folder),
            "folds": list(self.folds),
            "checkpoint": self.checkpoint,
            "trainer": self.predictor.trainer_name,
            "configuration": self.folder.name.split("__")[-1],
            "patch_size": list(self.patch_size),
            "tile_step_size": self.predictor.tile_step_size,
            "use_gaussian": bool(self.predictor.use_gaussian),
            "mirror_axes": list(self.mirror_axes),
            "outputs": self.output_names,
            "activation": self.activation,
            "channel_names": self.channel_names,
        }


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
    folder: str | Path,
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
    nn_ = _nn()
    folder = Path(folder)
    folds = tuple(f if f == "all" else int(f) for f in folds)
    _check_folder(folder, folds, checkpoint)
    device = torch.device(device)
    with contextlib.redirect_stdout(io.StringIO()):  # its constructor prints a notice on non-CUDA devices
        predictor = nn_.nnUNetPredictor(
            tile_step_size=tile_step_size,
            use_gaussian=use_gaussian,
            use_mirroring=use_mirroring,
            perform_everything_on_device=device.type == "cuda",
            device=device,
            verbose=False,
            allow_tqdm=False,
        )
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
            raise NnUNetError(
                f"fold_{folds[0]}/{checkpoint} does not fit the network nnU-Net builds from '{folder}/plans.json' "
                "(a checkpoint of another trainer, plans or architecture?)"
            ) from e
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
                f"fold_{f}/{checkpoint} does not fit the network nnU-Net builds from '{folder}/plans.json' "
                f"({predictor.trainer_name}); a checkpoint of another trainer or architecture?"
            ) from e
    net.load_state_dict(predictor.list_of_parameters[0])
    predictor.network = net.to(device).eval()
    return NnUNetModel(folder, folds, checkpoint, predictor, list(predictor.list_of_parameters))


# ---------------------------------------------------------------------------------------------------- explanation
#: one network pass: ``(fold index, tile index, mirror dims of a [B, C, *S] tensor)``
Pass = tuple[int, int, tuple[int, ...]]


def _mirror_combinations(axes: Sequence[int], nd: int) -> list[tuple[int, ...]]:
    """nnU-Net's combinations (identity first), as dims of a ``[B, C, *S]`` tensor."""
    if axes and max(axes) > nd - 1:
        raise NnUNetError(f"mirror axes {tuple(axes)} do not fit {nd} spatial dims")
    dims = [a + 2 for a in axes]
    return [(), *[c for i in range(len(dims)) for c in itertools.combinations(dims, i + 1)]]


def _flip(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return torch.flip(t, dims) if dims else t


def _nnunet_gaussian(patch: tuple[int, ...]) -> torch.Tensor:
    """The predictor's importance map ``[*patch]`` (float16, CPU): ``compute_gaussian`` with its arguments."""
    return _nn().compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu"))


@dataclass
class _TileGrid:
    """nnU-Net's sliding-window geometry of one case.

    Attributes:
        padded: ``[Cin, *P]`` the data padded as the predictor pads it (``pad_nd_image``).
        inner: spatial slices of the data inside ``P``.
        slicers: spatial slices of every tile (``_internal_get_sliding_window_slicers``), in the predictor's order.
        gauss: ``[*patch]`` importance map ``G`` (the float16 values of ``compute_gaussian``; ones without Gaussian).
        count: ``[*P]`` ``n = sum_w G_w``; both in the weight dtype (float32, float64 for a float64 network).

    All on the predictor's results device: the network's GPU with ``perform_everything_on_device`` (as
    :func:`load` sets it on CUDA), else the CPU; so are the output gradients and maps built on it.
    """

    padded: torch.Tensor
    inner: tuple[slice, ...]
    slicers: list[tuple[slice, ...]]
    gauss: torch.Tensor
    count: torch.Tensor

    @property
    def inner_shape(self) -> tuple[int, ...]:
        """``S'``: the data's spatial shape."""
        return tuple(len(range(*s.indices(n))) for s, n in zip(self.inner, self.padded.shape[1:]))

    @classmethod
    def of(cls, model: NnUNetModel, data: torch.Tensor, p0: torch.Tensor) -> _TileGrid:
        """The grid of ``data`` ``[Cin, *S']`` for ``model``'s patch size, tile step and Gaussian setting; ``p0``:
        a parameter of the network (its device and dtype)."""
        patch = model.patch_size
        wdtype = torch.float64 if p0.dtype == torch.float64 else torch.float32
        on_device = p0.device.type != "cpu" and bool(model.predictor.perform_everything_on_device)
        device = p0.device if on_device else torch.device("cpu")
        padded, revert = _nn().pad_nd_image(data.cpu(), patch, "constant", {"value": 0}, True, None)
        slicers = [tuple(s[1:]) for s in model.predictor._internal_get_sliding_window_slicers(padded.shape[1:])]
        gauss = _nnunet_gaussian(patch) if model.predictor.use_gaussian else torch.ones(patch)
        gauss = gauss.to(device=device, dtype=wdtype)
        count = torch.zeros(padded.shape[1:], dtype=wdtype, device=device)
        for s in slicers:
            count[s] += gauss
        return cls(padded.to(device), tuple(revert[1:]), slicers, gauss, count)


@dataclass
class _ExplainState:
    """What the passes of one explanation share; set up by :func:`explain`, filled by the passes."""

    cam: BaseSegCAM
    model: NnUNetModel
    hook: ActivationHook
    grid: _TileGrid
    mirrors: list[tuple[int, ...]]  # mirror combinations, identity first
    device: torch.device  # where the network runs
    dtype: torch.dtype  # the network's dtype
    progress: bool
    grads: list[torch.Tensor | None] = field(default_factory=list)  # dS/dY [C, *P] per target (None: empty ROI)
    active: list[list[int]] = field(default_factory=list)  # per tile: the targets with gradient in it
    acc: torch.Tensor | None = None  # [K, *P] float32 maps
    pooled: dict[int, Statistics] = field(default_factory=dict)  # gradient statistics per target
    act_stats: Statistics = field(default_factory=dict)  # activation statistics of the volume
    feat_shape: tuple[int, ...] = ()
    stats: dict[str, Any] = field(default_factory=dict)
    cache: dict[Pass, torch.Tensor] = field(default_factory=dict)  # hooked activations kept for pass 2
    cache_bytes: int = 0
    fold: int = -1  # the fold whose weights the network holds
    last_blend: tuple[int, torch.Tensor] | None = None

    @property
    def runner(self) -> ModelRunner:
        return self.cam.runner

    @property
    def formula(self) -> Formula:
        return self.cam.formula

    @property
    def patch(self) -> tuple[int, ...]:
        return self.model.patch_size

    @property
    def wdtype(self) -> torch.dtype:
        return self.grid.gauss.dtype

    def passes(self, active_only: bool = False) -> list[Pass]:
        """Every (fold, tile, mirror) in the predictor's order, or only those of tiles that touch an ROI."""
        tiles = [i for i in range(len(self.grid.slicers)) if self.active[i] or not active_only]
        return [(f, i, m) for f in range(len(self.model.parameters)) for i in tiles for m in self.mirrors]

    def tile(self, i: int, m: tuple[int, ...]) -> torch.Tensor:
        """Input of pass (tile ``i``, mirror ``m``): ``[1, Cin, *patch]`` on the network's device and dtype."""
        xw = self.grid.padded[(slice(None), *self.grid.slicers[i])][None]
        return _flip(xw, m).to(device=self.device, dtype=self.dtype)

    def load_fold(self, f: int) -> None:
        if self.fold != f:
            self.model.network.load_state_dict(self.model.parameters[f])
            self.fold = f

    def blend(self, i: int) -> torch.Tensor:
        """``G_w / n / (M F)`` of tile ``i``: ``[*patch]`` in the weight dtype. The last one is kept: a tile's
        mirrors, targets and maps follow each other."""
        if self.last_blend is None or self.last_blend[0] != i:
            n_passes = len(self.mirrors) * len(self.model.parameters)
            self.last_blend = (i, self.grid.gauss / self.grid.count[self.grid.slicers[i]] / n_passes)
        return self.last_blend[1]

    def keep(self, key: Pass, act: torch.Tensor) -> None:
        """Keep a pass's activation for pass 2 (host memory, up to :data:`CACHE_BYTES`): no second forward."""
        size = act.numel() * act.element_size()
        if key not in self.cache and self.cache_bytes + size <= CACHE_BYTES:
            self.cache[key] = act.detach().to("cpu", copy=True)
            self.cache_bytes += size

    def bar(self, items: list[Pass], desc: str) -> Iterator[Pass]:
        return iter(tqdm(items, desc=desc, disable=not self.progress))


class _PredictorLogits:
    """``Y`` accumulated from the passes of pass 1 as ``nnUNetPredictor.predict_logits_from_preprocessed_data``
    (nnunetv2 2.8) accumulates it on the CPU, operation by operation.

    Per fold: each tile's network outputs summed over the mirrors in their order (network dtype, identity first,
    the mirrored ones flipped back) and divided by ``M``; times the float16 Gaussian; added into a float16
    ``[C, *P]`` buffer and the Gaussian into a float16 count; buffer / count in float16, cropped. The folds' results
    summed in float16 and divided by ``F``; float32 at the end (as :meth:`NnUNetModel.predict_logits`).
    """

    def __init__(self, st: _ExplainState, n_out: int):
        self.st = st
        self.n_out = n_out
        self.gauss = _nnunet_gaussian(st.patch) if st.model.predictor.use_gaussian else None
        self.tile_sum: torch.Tensor | None = None
        self.logits = torch.zeros(0)
        self.count = torch.zeros(0)
        self.total: torch.Tensor | None = None

    def add(self, p: Pass, y: torch.Tensor) -> None:
        """The output ``y`` ``[1, C, *patch]`` of pass ``p`` (passes in the predictor's order)."""
        _, i, m = p
        st = self.st
        if not m:  # the identity comes first
            self.tile_sum = y.detach().clone()
        else:
            assert self.tile_sum is not None
            self.tile_sum += torch.flip(y.detach(), m)
        if m != st.mirrors[-1]:
            return
        if len(st.mirrors) > 1:  # the predictor divides only when it mirrors
            self.tile_sum /= len(st.mirrors)
        self._end_tile(i)

    def _end_tile(self, i: int) -> None:
        st = self.st
        assert self.tile_sum is not None
        pred, self.tile_sum = self.tile_sum[0].to("cpu"), None
        if i == 0:  # a new fold: the predictor's fresh float16 buffers
            self.logits = torch.zeros((self.n_out, *st.grid.padded.shape[1:]), dtype=torch.half)
            self.count = torch.zeros(st.grid.padded.shape[1:], dtype=torch.half)
        if self.gauss is not None:
            pred *= self.gauss
        self.logits[(slice(None), *st.grid.slicers[i])] += pred
        self.count[st.grid.slicers[i]] += self.gauss if self.gauss is not None else 1
        if i == len(st.grid.slicers) - 1:
            torch.div(self.logits, self.count, out=self.logits)
            if bool(torch.isinf(self.logits).any()):
                raise NnUNetError("nnU-Net's float16 accumulation of the logits overflowed (inf), as its predictor's")
            fold = self.logits[(slice(None), *st.grid.inner)]
            self.total = fold if self.total is None else self.total.add_(fold)

    def result(self) -> torch.Tensor:
        """``Y`` ``[C, *S']`` float32."""
        assert self.total is not None
        if len(self.st.model.parameters) > 1:
            self.total /= len(self.st.model.parameters)
        return self.total.float()


@contextlib.contextmanager
def _predictor_threads() -> Iterator[None]:
    """The predictor's thread count (at most nnU-Net's ``default_num_processes``) during the call, then restored."""
    from nnunetv2.configuration import default_num_processes

    n = torch.get_num_threads()
    torch.set_num_threads(min(default_num_processes, n))
    try:
        yield
    finally:
        torch.set_num_threads(n)


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
    """Explain nnU-Net's prediction of one preprocessed case, exactly as the predictor forms it (module docstring).

    ``Y`` (the logits ``[C_out, *S']``, float32 holding nnU-Net's float16 values) is ``logits`` when given (the
    output of :meth:`NnUNetModel.predict_logits` / ``predict_logits_from_preprocessed_data`` on this ``data``);
    else, on the CPU when no target depends on the prediction (box, mask, voxel, class targets) and the score is on
    logits (no amp), it is accumulated during the gradient pass operation by operation as the predictor does
    (bit-equal, tested); else nnU-Net's predictor is called first. ``S = sum W * Y`` (float32 sum).

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
        ``output`` = ``Y[None]`` ``[1, C_out, *S']``, scores ``[1, K]``, and ``stats`` (``prediction``: "given",
        "predictor" or "fused"; counts of tiles and passes); :meth:`NnUNetModel.to_original_grid` maps them back.
    """
    x = _check_explain_inputs(cam, model, data)
    tl = as_target_list(targets)
    runner = cam.runner
    p0 = next(model.network.parameters())
    runner.ensure_layer(_layer_example(model, p0))
    fused = logits is None and _can_fuse(cam, tl, p0)
    y_vol: torch.Tensor | None = None
    if logits is not None:
        y_vol = _check_logits(logits, x)
    elif not fused:
        y_vol = _check_logits(model.predict_logits(x[0].float() if p0.dtype == torch.float16 else x[0]), x)
    grid = _TileGrid.of(model, x[0], p0)
    original = {k: v.detach().clone() for k, v in model.network.state_dict().items()}
    try:
        with runner.session("grad") as hook:
            mirrors = _mirror_combinations(model.mirror_axes, len(model.patch_size))
            st = _ExplainState(cam, model, hook, grid, mirrors, p0.device, p0.dtype, progress)
            st.stats = {"prediction": "fused" if fused else ("given" if logits is not None else "predictor")}
            _output_gradients(st, tl, y_vol)
            st.acc = torch.zeros((len(tl), *grid.padded.shape[1:]), dtype=torch.float32, device=grid.count.device)
            if isinstance(st.formula, ActivationPooledFormula) and st.stats["backward_windows"]:
                _activation_statistics_pass(st)
            if fused:
                y_vol = _fused_gradient_pass(st)[None]
            else:
                _gradient_pass(st)
            if isinstance(st.formula, PooledFormula) and st.pooled:
                _map_pass(st, tuple(x.shape[2:]))
    finally:
        model.network.load_state_dict(original)
    assert y_vol is not None
    scores, voxels = _scores(runner, tl, y_vol)
    maps = st.acc[(slice(None), *grid.inner)][None]
    return CAMResult(
        maps=(torch.relu(maps) if relu else maps).contiguous().cpu(),
        scores=scores,
        roi_voxels=voxels,
        targets=tl,
        layer=str(runner.layer_name),
        feature_shape=st.feat_shape,
        output=y_vol,
        stats=st.stats,
    )


def check_method(cls: type[BaseSegCAM], name: str | None = None) -> None:
    """Refuse, before any work, a method whose explainer has an execution of its own (MI-CAM, MI-Grad-CAM: their
    histogram passes), which :func:`explain` does not run: it forms maps from ``cam.formula`` alone, which for
    these methods is not their definition (MI-Grad-CAM's class formula is plain Grad-CAM's).

    Raises:
        NnUNetError: such a method.
    """
    if cls._execute is not BaseSegCAM._execute:
        label = name or cls.__name__
        raise NnUNetError(
            f"method {label!r} is not available for nnU-Net models yet: its own passes (mutual-information "
            "histograms) do not run through nnU-Net's tiles, mirrors and folds, and its maps would not be its "
            "definition; choose gradcam, hirescam, xgradcam, gradcam++ or layercam"
        )


def _check_explain_inputs(cam: BaseSegCAM, model: NnUNetModel, data: torch.Tensor) -> torch.Tensor:
    """``data`` as ``[1, Cin, *S']``, or a clear error before any network pass."""
    check_method(type(cam))
    if cam.model is not model.network:
        raise MedcamError("the explainer must be built on model.network of this nnU-Net model")
    if cam.inferer is not None:
        raise MedcamError("nnU-Net has its own sliding window: build the explainer without inferer")
    if not isinstance(cam.formula, (ElementwiseFormula, PooledFormula)):
        raise MedcamError(f"nnU-Net explanations need an element-wise or pooled formula, got {cam.formula!r}")
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
    return x


def _layer_example(model: NnUNetModel, p0: torch.Tensor) -> torch.Tensor:
    """A zero input for resolving ``layer="auto"``: twice the network's total stride per axis (at most the patch),
    so that the coarsest stage has 2 voxels a side; its forward costs a fraction of a tile's."""
    patch = model.patch_size
    try:
        strides = [
            math.prod(int(s[d]) for s in model.predictor.configuration_manager.pool_op_kernel_sizes)
            for d in range(len(patch))
        ]
        size = [min(p, 2 * s) if p % s == 0 else p for p, s in zip(patch, strides)]
    except (KeyError, TypeError, IndexError):  # plans without strides: a whole tile
        size = list(patch)
    return torch.zeros((1, len(model.channel_names), *size), dtype=p0.dtype, device=p0.device)


def _check_logits(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Given logits ``[C_out, *S']`` as ``Y[None]`` (float32, CPU), checked against the data grid."""
    y = logits.detach()[None].float().cpu()
    if tuple(y.shape[2:]) != tuple(x.shape[2:]):
        raise MedcamError(f"logits {tuple(logits.shape)} are not on the data grid {tuple(x.shape[1:])}")
    return y


def _can_fuse(cam: BaseSegCAM, targets: list[Target], p0: torch.Tensor) -> bool:
    """Whether ``Y`` can be accumulated in pass 1: no ROI or score needs it first, and the passes run as the
    predictor runs them (the CPU, where it uses no autocast; the network's own dtype)."""
    runner = cam.runner
    return (
        p0.device.type == "cpu"
        and p0.dtype != torch.float16
        and not runner.amp
        and runner.score == "logits"
        and not any(t.needs_prediction for t in targets)
    )


def _output_gradients(st: _ExplainState, targets: list[Target], y: torch.Tensor | None) -> None:
    """``dS/dY`` per target on the padded grid and which targets have gradient in each tile (the others skip it).

    ``y``: ``Y[None]``, or None when no target depends on it (logits score): a zero stand-in of its shape."""
    n_out = int(st.model.label_manager.num_segmentation_heads)
    reference = torch.zeros(()).expand(1, n_out, *st.grid.inner_shape) if y is None else y
    for t in targets:
        g, _ = st.runner.output_gradient(reference, t.score_weights(reference))
        if not bool((g != 0).any()):
            logger.warning("target %r has an empty ROI: its map is all zero", t)
            st.grads.append(None)
            continue
        gp = torch.zeros((g.shape[1], *st.grid.padded.shape[1:]), dtype=st.wdtype, device=st.grid.count.device)
        gp[(slice(None), *st.grid.inner)] = g[0].to(device=gp.device, dtype=st.wdtype)
        st.grads.append(gp)
    st.active = [
        [k for k, g in enumerate(st.grads) if g is not None and bool(g[(slice(None), *s)].ne(0).any())]
        for s in st.grid.slicers
    ]
    st.stats.update(
        windows=len(st.grid.slicers),
        mirrors=len(st.mirrors),
        folds=len(st.model.parameters),
        backward_windows=sum(1 for a in st.active if a),
        passes=0,
    )


def _scores(runner: ModelRunner, targets: list[Target], y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S [1, K] float32, ROI voxels [1, K])`` on ``Y[None]``."""
    scores, voxels = [], []
    for t in targets:
        _, s = runner.output_gradient(y, t.score_weights(y))
        scores.append(s.float())
        voxels.append((t.roi(y) != 0).flatten(1).sum(1))
    return torch.stack(scores, 1), torch.stack(voxels, 1)


def _activation_statistics_pass(st: _ExplainState) -> None:
    """Pass A (XGrad-CAM, Grad-CAM++): forward up to the layer for every pass, summing the activation statistics
    of the volume with the blending weight ``flip_m(G_w / n) / (M F)`` area-pooled onto the feature grid."""
    formula = st.formula
    assert isinstance(formula, ActivationPooledFormula)
    with st.hook.mode_as("stop"):
        for p in st.bar(st.passes(), "medcam statistics"):
            f, i, m = p
            st.load_fold(f)
            aw = st.runner.activations(st.tile(i, m), st.hook)
            st.keep(p, aw)
            wgt = _flip(st.blend(i)[None, None], m).to(device=st.device, dtype=torch.float32)
            stats = formula.activation_statistics(aw, _area_pool(wgt, tuple(aw.shape[2:])))
            _add(st.act_stats, {n: v[0] for n, v in stats.items()})
            st.stats["passes"] += 1


def _gradient_pass(st: _ExplainState) -> None:
    """Pass 1: forward + one backward per target of every pass whose tile touches an ROI, with equation (1)."""
    for p in st.bar(st.passes(active_only=True), "medcam tiles"):
        st.load_fold(p[0])
        _pass_gradients(st, p)
        st.stats["passes"] += 1


def _fused_gradient_pass(st: _ExplainState) -> torch.Tensor:
    """Pass 1 with the prediction fused in: every pass runs forward (backward too where its tile touches an ROI)
    and its output is accumulated as the predictor does (:class:`_PredictorLogits`); returns ``Y`` ``[C, *S']``."""
    logits = _PredictorLogits(st, int(st.model.label_manager.num_segmentation_heads))
    with _predictor_threads():
        for p in st.bar(st.passes(), "medcam tiles"):
            st.load_fold(p[0])
            y = _pass_gradients(st, p) if st.active[p[1]] else _pass_output(st, p)
            logits.add(p, y)
            st.stats["passes"] += 1
    return logits.result()


def _pass_output(st: _ExplainState, p: Pass) -> torch.Tensor:
    """The network output ``[1, C, *patch]`` of a pass outside every ROI (no graph); its activation is kept."""
    with st.hook.mode_as("detach"), torch.no_grad():
        st.hook.reset()
        y = st.runner.predictor(st.tile(p[1], p[2]))
    if isinstance(st.formula, PooledFormula) and st.hook.activation is not None:
        st.keep(p, st.runner.to_feature_map(st.hook.activation, st.patch))
    return y


def _pass_gradients(st: _ExplainState, p: Pass) -> torch.Tensor:
    """Forward of one pass with the graph from the hooked layer on, then one backward per target active in its tile
    (output gradient (1)); element-wise maps are stitched, pooled statistics summed. Returns the output (detached)."""
    _, i, m = p
    y, a = st.runner.forward(st.tile(i, m), st.hook)
    if tuple(y.shape[2:]) != st.patch:
        raise MedcamError(f"the network output {tuple(y.shape)} is not on the tile grid {st.patch}")
    af = st.runner.to_feature_map(a.detach(), st.patch)
    st.feat_shape = tuple(af.shape[2:])
    if isinstance(st.formula, PooledFormula):
        st.keep(p, af)
    ks = st.active[i]
    for j, k in enumerate(ks):
        gk = st.grads[k]
        assert gk is not None
        go = _flip((gk[(slice(None), *st.grid.slicers[i])] * st.blend(i))[None], m).to(st.device)
        g = st.runner.activation_grad(y, a, go, retain_graph=j < len(ks) - 1)
        _use_gradient(st, k, i, m, af, st.runner.to_feature_map(g, st.patch))
    return y.detach()


def _use_gradient(st: _ExplainState, k: int, i: int, m: tuple[int, ...], af: torch.Tensor, g: torch.Tensor) -> None:
    """Target ``k``'s activation gradient ``g`` ``[1, K, *f]`` of a pass on tile ``i`` with mirror ``m``."""
    formula = st.formula
    if isinstance(formula, ElementwiseFormula):
        assert st.acc is not None
        mp = st.cam.upsampler(formula.map(af, g)[:, None], st.patch)
        mp = _flip(mp, m)[0, 0]  # flip back (the same dims of a [1, 1, *patch] tensor)
        st.acc[k][st.grid.slicers[i]] += mp.float().to(st.acc.device)
        return
    assert isinstance(formula, PooledFormula)
    volume = {n: v[None].to(st.device) for n, v in st.act_stats.items()} if st.act_stats else None
    stats = formula.gradient_statistics(af, g, volume)
    _add(st.pooled.setdefault(k, {}), {n: v[0] for n, v in stats.items()})


def _map_pass(st: _ExplainState, spatial: tuple[int, ...]) -> None:
    """Pass 2 (pooled formulas): global ``alpha`` per target, then every pass's ``sum_k alpha_k A_k`` upsampled,
    flipped back and blended with ``G_w / n / (M F)`` (activations from the cache, else a forward to the layer)."""
    formula = st.formula
    assert isinstance(formula, PooledFormula) and st.acc is not None
    n_pos = float(math.prod(s * fs / r for s, fs, r in zip(spatial, st.feat_shape, st.patch)))
    ks = sorted(st.pooled)
    alpha = torch.stack(
        [formula.weights({n: v[None] for n, v in {**st.pooled[k], **st.act_stats}.items()}, n_pos)[0] for k in ks]
    )
    with st.hook.mode_as("stop"):
        for p in st.bar(st.passes(), "medcam maps"):
            f, i, m = p
            aw = st.cache.get(p)
            if aw is None:
                st.load_fold(f)
                aw = st.runner.activations(st.tile(i, m), st.hook)
                st.stats["passes"] += 1
            aw = aw.to(st.device)
            mk = weighted_channel_sum(alpha.to(aw.device), aw.expand(len(ks), *aw.shape[1:]))
            mk = st.cam.upsampler(mk[None], st.patch)  # [1, k, *patch]
            mk = _flip(mk, m)[0].float().to(st.acc.device) * st.blend(i).float()
            for kk, k in enumerate(ks):
                st.acc[k][st.grid.slicers[i]] += mk[kk]


def _area_pool(weight: torch.Tensor, feat_shape: tuple[int, ...]) -> torch.Tensor:
    """Average a tile-grid weight ``[1, 1, *patch]`` down to the feature grid (as the MONAI path does)."""
    if tuple(weight.shape[2:]) == feat_shape:
        return weight
    pools: dict[int, Callable[..., torch.Tensor]] = {
        1: torch.nn.functional.adaptive_avg_pool1d,
        2: torch.nn.functional.adaptive_avg_pool2d,
        3: torch.nn.functional.adaptive_avg_pool3d,
    }
    return pools[weight.ndim - 2](weight, feat_shape)


def _add(slot: Statistics, st: Statistics) -> None:
    for n, v in st.items():
        slot[n] = slot[n] + v.detach() if n in slot else v.detach().clone()
