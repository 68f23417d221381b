"""nnU-Net v2 model folders as a framework adapter: explained exactly as ``nnUNetPredictor`` runs them.

Everything nnU-Net defines is taken from the installed ``nnunetv2`` (2.8), never re-implemented: the network and fold
checkpoints (``nnUNetPredictor.initialize_from_trained_model_folder``), preprocessing (the configuration's
``preprocessor_class.run_case``), padding (``pad_nd_image``), tiles (``_internal_get_sliding_window_slicers``), the
Gaussian (``compute_gaussian``), the checkpoint's mirror axes, the logits (``predict_logits_from_preprocessed_data``)
and the export (``convert_predicted_logits_to_segmentation_with_correct_shape``; maps: ``resampling_fn_probabilities``,
``insert_crop_into_image``, ``transpose_backward``).

No pass logic lives here: :func:`pass_plan` states nnU-Net's prediction as a :class:`~medcam.plan.PassPlan`,
``Y = (1/F) sum_f sum_w G_w y_fw / sum_w G_w`` with ``y_fw = (1/M) sum_m flip_m(net_f(flip_m(x_w)))`` (folds x
tiles x mirrors), and the explainer's own execution explains it (:meth:`medcam.BaseSegCAM.explain_plan`), for every
method of ``medcam.METHODS``. ``Y`` is the predictor's float16-accumulated tensor (as float32): the segmentation,
predicted regions and the score use it; the passes are differentiated exactly (the rounding has no derivative). It
is ``logits=`` when given, else fused into the gradient pass on the CPU when nothing needs it first
(:class:`~medcam.plan.PredictorAccumulation`, bit-equal), else the predictor's own run.
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
from typing import Any, Literal

import numpy as np
import torch

from ..engine import BaseSegCAM
from ..errors import MedcamError, ModelError
from ..hooks import ActivationHook
from ..plan import Accumulation, PassPlan, PredictorAccumulation
from ..result import CAMResult
from ..runner import ModelRunner, validate_image
from ..targets import ClassROI, PredictedROI, Target

__all__ = ["NnUNetError", "NnUNetModel", "load", "explain", "pass_plan", "SUPPORTED_VERSIONS"]

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


# ---------------------------------------------------------------------------------------------------- the plan
def _mirror_combinations(axes: Sequence[int], nd: int) -> list[tuple[int, ...]]:
    """nnU-Net's combinations (identity first), as dims of a ``[B, C, *S]`` tensor."""
    if axes and max(axes) > nd - 1:
        raise NnUNetError(f"mirror axes {tuple(axes)} do not fit {nd} spatial dims")
    dims = [a + 2 for a in axes]
    return [(), *[c for i in range(len(dims)) for c in itertools.combinations(dims, i + 1)]]


def _nnunet_gaussian(patch: tuple[int, ...]) -> torch.Tensor:
    """The predictor's importance map ``[*patch]`` (float16, CPU): ``compute_gaussian`` with its arguments."""
    return _nn().compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu"))


def pass_plan(model: NnUNetModel, data: torch.Tensor) -> PassPlan:
    """nnU-Net's prediction of ``data`` ``[Cin, *S']`` (or ``[1, Cin, *S']``, preprocessed) as a pass plan: folds x
    tiles x mirrors.

    Padding (``pad_nd_image``), tiles (``_internal_get_sliding_window_slicers``), the Gaussian (``compute_gaussian``,
    ones without it), mirror combinations, fold weights; the prediction is the predictor's
    (:meth:`NnUNetModel.predict_logits`) and, on the CPU in the network's dtype (not float16), it can be fused into
    the gradient pass (:class:`~medcam.plan.PredictorAccumulation`). Weights and maps are float32 (float64 for a
    float64 network) on the predictor's results device (the network's GPU with ``perform_everything_on_device``, as
    :func:`load` sets it on CUDA; else the CPU).

    Raises:
        NnUNetError: data that is not one case of the model's channels and spatial dims.
    """
    data = _check_data(model, data)
    p0 = next(model.network.parameters())
    patch = model.patch_size
    wdtype = torch.float64 if p0.dtype == torch.float64 else torch.float32
    on_device = p0.device.type != "cpu" and bool(model.predictor.perform_everything_on_device)
    device = p0.device if on_device else torch.device("cpu")
    padded, revert = _nn().pad_nd_image(data.cpu(), patch, "constant", {"value": 0}, True, None)
    windows = [tuple(s[1:]) for s in model.predictor._internal_get_sliding_window_slicers(padded.shape[1:])]
    half = _nnunet_gaussian(patch) if model.predictor.use_gaussian else None
    gauss = (half if half is not None else torch.ones(patch)).to(device=device, dtype=wdtype)
    n_out = int(model.label_manager.num_segmentation_heads)
    fusable = p0.device.type == "cpu" and p0.dtype != torch.float16

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
        image=padded[None].to(device),
        crop=tuple(revert[1:]),
        windows=windows,
        importance=gauss,
        count=None,  # n = sum G over the tiles: built when many tiles run (PassPlan.count_for)
        device=device,
        net_device=p0.device,
        mirrors=_mirror_combinations(model.mirror_axes, len(patch)),
        folds=list(model.parameters),
        input_dtype=p0.dtype,
        predict=predict,
        accumulation=accumulate if fusable else None,
        prediction_always=True,
        n_out=n_out,
        example=_layer_example(model, p0),
        cache_bytes=CACHE_BYTES,
        description={"plan": "nnunet"},
    )


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
        "given", "predictor" or "fused"; counts of tiles and passes); :meth:`NnUNetModel.to_original_grid` maps them
        back.
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
        strides = [
            math.prod(int(s[d]) for s in model.predictor.configuration_manager.pool_op_kernel_sizes)
            for d in range(len(patch))
        ]
        size = [min(p, 2 * s) if p % s == 0 else p for p, s in zip(patch, strides)]
    except (KeyError, TypeError, IndexError):  # plans without strides: a whole tile
        size = list(patch)
    return torch.zeros((1, len(model.channel_names), *size), dtype=p0.dtype, device=p0.device)
