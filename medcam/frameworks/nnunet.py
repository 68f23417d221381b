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

Deviation kept: nnU-Net accumulates ``Y`` and ``n`` in float16 (CUDA speed); medcam takes ``Y`` (prediction, ROI,
scores) from nnU-Net's own predictor, float16 rounding included, and differentiates the blending in float32/float64
arithmetic (the rounding has no derivative).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..engine import BaseSegCAM
from ..errors import MedcamError, ModelError
from ..formulas import ActivationPooledFormula, ElementwiseFormula, weighted_channel_sum
from ..result import CAMResult
from ..runner import validate_image
from ..targets import ClassROI, PredictedROI, Target, as_target_list

__all__ = ["NnUNetError", "NnUNetModel", "load", "explain", "SUPPORTED_VERSIONS"]

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
    def activation(self) -> str:
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
def _mirror_combinations(axes: Sequence[int], nd: int) -> list[tuple[int, ...]]:
    """nnU-Net's combinations (identity first), as dims of a ``[B, C, *S]`` tensor."""
    if axes and max(axes) > nd - 1:
        raise NnUNetError(f"mirror axes {tuple(axes)} do not fit {nd} spatial dims")
    dims = [a + 2 for a in axes]
    return [(), *[c for i in range(len(dims)) for c in itertools.combinations(dims, i + 1)]]


def _flip(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return torch.flip(t, dims) if dims else t


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

    Args:
        cam: an explainer built on ``model.network`` without an inferer (e.g. ``medcam.SegGradCAM(model.network)``).
        model: from :func:`load`.
        data: ``[C, *S']`` (or ``[1, C, *S']``) from :meth:`NnUNetModel.preprocess`.
        targets: targets on the logits ``[1, C_out, *S']`` (see :meth:`NnUNetModel.target` for names).
        logits: nnU-Net's logits ``[C_out, *S']`` if already predicted (else :meth:`NnUNetModel.predict_logits`).

    Returns:
        :class:`~medcam.engine.CAMResult` with maps ``[1, K, *S']`` on the preprocessed grid (float32, CPU) and
        ``output`` = the logits ``[1, C_out, *S']``; :meth:`NnUNetModel.to_original_grid` maps them back.
    """
    nn_ = _nn()
    if cam.model is not model.network:
        raise MedcamError("the explainer must be built on model.network of this nnU-Net model")
    if cam.inferer is not None:
        raise MedcamError("nnU-Net has its own sliding window: build the explainer without inferer")
    tl = as_target_list(targets)
    x = data if data.ndim == len(model.patch_size) + 2 else data[None]
    x = validate_image(x)
    if x.shape[0] != 1:
        raise MedcamError(f"nnU-Net explains one case at a time; got a batch of {x.shape[0]}")
    if x.shape[1] != len(model.channel_names):
        raise NnUNetError(
            f"the data has {x.shape[1]} channels; the model takes {len(model.channel_names)} {model.channel_names}"
        )
    net = model.network
    p0 = next(net.parameters())
    device, dtype = p0.device, p0.dtype
    patch = model.patch_size
    nd = len(patch)
    if len(x.shape) - 2 != nd:
        raise NnUNetError(f"data {tuple(x.shape[1:])} does not have the {nd} spatial dims of the patch size {patch}")
    runner, formula = cam.runner, cam.formula
    elementwise = isinstance(formula, ElementwiseFormula)
    runner.ensure_layer(torch.zeros((1, x.shape[1], *patch), dtype=dtype, device=device))  # auto: on one tile

    # ---- Y: nnU-Net's own prediction (tiles, Gaussian, mirroring, folds)
    if logits is None:
        logits = model.predict_logits(x[0].to(torch.float32) if dtype == torch.float16 else x[0])
    y_vol = logits.detach()[None].float().cpu()
    if tuple(y_vol.shape[2:]) != tuple(x.shape[2:]):
        raise MedcamError(f"logits {tuple(logits.shape)} are not on the data grid {tuple(x.shape[1:])}")

    # ---- nnU-Net's padding, tiles and Gaussian
    padded, revert = nn_.pad_nd_image(x[0].cpu(), patch, "constant", {"value": 0}, True, None)
    inner = tuple(revert[1:])
    slicers = [tuple(s[1:]) for s in model.predictor._internal_get_sliding_window_slicers(padded.shape[1:])]
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    if model.predictor.use_gaussian:
        gauss = nn_.compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu"))
        gauss = gauss.to(wdtype)
    else:
        gauss = torch.ones(patch, dtype=wdtype)
    count = torch.zeros(padded.shape[1:], dtype=wdtype)
    for s in slicers:
        count[s] += gauss
    mirrors = _mirror_combinations(model.mirror_axes, nd)
    n_passes = len(mirrors) * len(model.parameters)

    # ---- output gradients dS/dY per target on the padded grid, scores, ROI sizes
    grads: list[torch.Tensor | None] = []
    scores, voxels = [], []
    for t in tl:
        w = t.score_weights(y_vol)
        voxels.append((t.roi(y_vol) != 0).flatten(1).sum(1))
        g, s = runner.output_gradient(y_vol, w)
        scores.append(s.float())
        if not bool((g != 0).any()):
            logger.warning("target %r has an empty ROI: its map is all zero", t)
            grads.append(None)
            continue
        gp = torch.zeros((g.shape[1], *padded.shape[1:]), dtype=wdtype)
        gp[(slice(None), *inner)] = g[0].to(wdtype)
        grads.append(gp)
    active = [
        [k for k, g in enumerate(grads) if g is not None and bool(g[(slice(None), *s)].ne(0).any())] for s in slicers
    ]

    def blend(i: int) -> torch.Tensor:
        """``G_w / n / (M F)`` of tile i: ``[*patch]``."""
        return gauss / count[slicers[i]] / n_passes

    acc = torch.zeros((len(tl), *padded.shape[1:]), dtype=torch.float32)
    pooled: dict[int, dict[str, torch.Tensor]] = {}
    act_stats: dict[str, torch.Tensor] = {}
    feat_shape: tuple[int, ...] = ()
    stats: dict[str, Any] = {
        "windows": len(slicers),
        "mirrors": len(mirrors),
        "folds": len(model.parameters),
        "backward_windows": sum(1 for a in active if a),
        "passes": 0,
    }
    original = {k: v.detach().clone() for k, v in net.state_dict().items()}
    all_passes = [(f, i, m) for f in range(len(model.parameters)) for i in range(len(slicers)) for m in mirrors]
    grad_passes = [(f, i, m) for f, i, m in all_passes if active[i]]

    def tile(i: int, m: tuple[int, ...]) -> torch.Tensor:
        xw = padded[(slice(None), *slicers[i])][None]
        return _flip(xw, m).to(device=device, dtype=dtype)

    def load_fold(f: int, current: list[int]) -> None:
        if current[0] != f:
            net.load_state_dict(model.parameters[f])
            current[0] = f

    def layer_activation(hook, xm: torch.Tensor) -> torch.Tensor:
        return runner.activations(xm, hook)

    # pooled methods: the hooked layer's activation of each pass is kept (on the CPU, up to CACHE_BYTES) so that
    # forming the maps needs no second forward of the passes already run
    cached: dict[tuple[int, int, tuple[int, ...]], torch.Tensor] = {}
    cache_bytes = [0]

    def keep(key: tuple[int, int, tuple[int, ...]], act: torch.Tensor) -> None:
        size = act.numel() * act.element_size()
        if key not in cached and cache_bytes[0] + size <= CACHE_BYTES:
            cached[key] = act.detach().to("cpu", copy=True)
            cache_bytes[0] += size

    current = [-1]
    try:
        with runner.session("grad") as hook:
            # pass A: activation statistics of the whole volume (XGrad-CAM, Grad-CAM++), every pass
            if isinstance(formula, ActivationPooledFormula) and grad_passes:
                hook.mode = "stop"
                for f, i, m in tqdm(all_passes, desc="medcam statistics", disable=not progress):
                    load_fold(f, current)
                    aw = layer_activation(hook, tile(i, m))
                    keep((f, i, m), aw)
                    wgt = _flip(blend(i)[None, None], m).to(device=device, dtype=torch.float32)
                    st = formula.activation_statistics(aw, _area_pool(wgt, tuple(aw.shape[2:])))
                    _add(act_stats, {n: v[0] for n, v in st.items()})
                    stats["passes"] += 1
                hook.mode = "grad"

            # pass 1: forward + backward of every (fold, tile, mirror) that touches an ROI, with equation (1)
            for f, i, m in tqdm(grad_passes, desc="medcam tiles", disable=not progress):
                load_fold(f, current)
                xm = tile(i, m)
                y, a = runner.forward(xm, hook)
                if tuple(y.shape[2:]) != patch:
                    raise MedcamError(f"the network output {tuple(y.shape)} is not on the tile grid {patch}")
                af = runner.to_feature_map(a.detach(), patch)
                if not elementwise:
                    keep((f, i, m), af)
                feat_shape = tuple(af.shape[2:])
                ks = active[i]
                for j, k in enumerate(ks):
                    gk = grads[k]
                    assert gk is not None
                    go = _flip((gk[(slice(None), *slicers[i])] * blend(i))[None], m)
                    g = runner.activation_grad(y, a, go.to(device), retain_graph=j < len(ks) - 1)
                    g = runner.to_feature_map(g, patch)
                    if elementwise:
                        mp = cam.upsampler(formula.map(af, g)[:, None], patch)[:, 0]
                        mp = _flip(mp[:, None], m)[0, 0]  # flip back (the same dims of a [1, 1, *patch] tensor)
                        acc[(k, *slicers[i])] += mp.float().cpu()
                    else:
                        vs = {n: v[None].to(device) for n, v in act_stats.items()} if act_stats else None
                        st = formula.gradient_statistics(af, g, vs)
                        _add(pooled.setdefault(k, {}), {n: v[0] for n, v in st.items()})
                stats["passes"] += 1
                del y, a, af

            # pass 2 (pooled methods): every pass's sum_k alpha_k A_k, upsampled, flipped back and blended
            if not elementwise and pooled:
                hook.mode = "stop"
                n_pos = float(math.prod(s * fs / r for s, fs, r in zip(x.shape[2:], feat_shape, patch)))
                ks = sorted(pooled)
                alpha = torch.stack(
                    [formula.weights({n: v[None] for n, v in {**pooled[k], **act_stats}.items()}, n_pos)[0] for k in ks]
                )
                for f, i, m in tqdm(all_passes, desc="medcam maps", disable=not progress):
                    aw = cached.get((f, i, m))
                    if aw is None:
                        load_fold(f, current)
                        aw = layer_activation(hook, tile(i, m))
                        stats["passes"] += 1
                    else:
                        aw = aw.to(device)
                    mk = weighted_channel_sum(alpha.to(aw.device), aw.expand(len(ks), *aw.shape[1:]))
                    mk = cam.upsampler(mk[None], patch)  # [1, k, *patch]
                    mk = _flip(mk, m)[0].float().cpu() * blend(i).float()
                    for kk, k in enumerate(ks):
                        acc[(k, *slicers[i])] += mk[kk]
                hook.mode = "grad"
    finally:
        net.load_state_dict(original)

    maps = acc[(slice(None), *inner)][None]
    if relu:
        maps = torch.relu(maps)
    return CAMResult(
        maps=maps.contiguous(),
        scores=torch.stack(scores, 1).float(),
        roi_voxels=torch.stack(voxels, 1),
        targets=tl,
        layer=str(runner.layer_name),
        feature_shape=feat_shape,
        output=y_vol,
        stats=stats,
    )


def _area_pool(weight: torch.Tensor, feat_shape: tuple[int, ...]) -> torch.Tensor:
    """Average a tile-grid weight ``[1, 1, *patch]`` down to the feature grid (as the MONAI path does)."""
    if tuple(weight.shape[2:]) == feat_shape:
        return weight
    pool = {1: torch.nn.functional.adaptive_avg_pool1d, 2: torch.nn.functional.adaptive_avg_pool2d}.get(
        weight.ndim - 2, torch.nn.functional.adaptive_avg_pool3d
    )
    return pool(weight, feat_shape)


def _add(slot: dict[str, torch.Tensor], st: dict[str, torch.Tensor]) -> None:
    for n, v in st.items():
        slot[n] = slot[n] + v.detach() if n in slot else v.detach().clone()
