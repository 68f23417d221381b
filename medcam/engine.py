"""The engine every CAM method shares: hook a layer, score the targets, differentiate, form and upsample the map.

A method (see :mod:`medcam.methods`) only says how the map is formed from the activation ``A`` ``[B, K, *f]`` and
the score gradient ``g = dS/dA`` (same shape): either element-wise (:meth:`BaseSegCAM.elementwise_map`) or as a
weighted sum of channels with pooled weights (:meth:`BaseSegCAM.gradient_statistics`,
:meth:`BaseSegCAM.activation_statistics`, :meth:`BaseSegCAM.weights_from_statistics`: sums over the grid, so that the
sliding-window engine in :mod:`medcam.sliding` can accumulate them over windows exactly).

Order of operations (fixed): pre-ReLU map on the feature grid -> (bi/tri)linear upsampling (align_corners=False) to
the input size -> ReLU. Nothing is normalised; use :func:`medcam.normalize` explicitly.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LayerError, MedcamError, ModelError
from .hooks import ActivationHook, preserved_model_state
from .layers import auto_layer, check_hookable, resolve_layer
from .targets import Target, as_target_list

__all__ = ["BaseSegCAM", "CAMResult", "interpolate_upsampler", "Upsampler"]

logger = logging.getLogger(__name__)

#: ``upsampler(maps [B, K, *f], size tuple) -> [B, K, *size]``
Upsampler = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]
#: ``transform(layer output, input spatial size) -> [B, K, *f]`` (e.g. :class:`medcam.TokenGrid` for ViT tokens)
ReshapeTransform = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


def interpolate_upsampler(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Default upsampler: linear/bilinear/trilinear interpolation with ``align_corners=False``.

    Linear interpolation cannot overshoot (unlike the cubic spline resizing of some tools), so a non-negative map
    stays non-negative and the maximum is not exceeded.
    """
    nd = maps.ndim - 2
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}.get(nd)
    if mode is None:
        raise MedcamError(f"cannot upsample a map with {nd} spatial dims")
    if tuple(maps.shape[2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode=mode, align_corners=False)


@dataclass
class CAMResult:
    """What one explanation call produced.

    Attributes:
        maps: float32 ``[B, K, *S]`` (input grid) or ``[B, K, *f]`` (layer grid when ``upsample=False``), one map
            per target, ReLU applied unless ``relu=False``; on the input's device, or with a sliding-window
            inferer where MONAI puts its blended output (``inferer.device``, the CPU past ``cpu_thresh``).
        scores: float32 ``[B, K]`` explained score ``S = sum W * y`` per sample and target (logit units, or
            probability units with ``score="probability"``).
        roi_voxels: int64 ``[B, K]`` number of output voxels with non-zero ROI weight.
        targets: the targets, in map order.
        layer: dotted name of the hooked layer.
        feature_shape: spatial shape of the layer's output for one forward (one window with an inferer).
        output: the model output ``[B, C, *S]`` (detached; the blended output with an inferer, when it was
            computed), or None.
        stats: counters, e.g. ``windows``, ``backward_windows`` for the sliding-window engine.
    """

    maps: torch.Tensor
    scores: torch.Tensor
    roi_voxels: torch.Tensor
    targets: list[Target]
    layer: str
    feature_shape: tuple[int, ...]
    output: torch.Tensor | None = None
    stats: dict[str, Any] = field(default_factory=dict)


class BaseSegCAM:
    """Gradient-based CAM for a region of interest of a segmentation output (2D or 3D).

    Args:
        model: any PyTorch segmentation network ``[B, Cin, *S] -> [B, C, *S]`` (classifiers ``-> [B, C]`` work too).
            It is never modified: eval mode is used during the call, every module's mode and every parameter's
            ``requires_grad`` flag are restored afterwards, hooks are removed, no ``.grad`` is created.
        layer: dotted name from ``model.named_modules()``, the module itself, or ``"auto"`` (coarsest feature layer
            that is not the head, i.e. the U-Net bottleneck; chosen at the first call and logged).
        inferer: optional ``monai.inferers.SlidingWindowInferer``; whole volumes are then explained window by
            window with MONAI's grid and blending (see :mod:`medcam.sliding`).
        amp: run forward/backward under ``torch.autocast`` (bf16 where supported, else fp16); maps are formed in fp32.
        amp_dtype: override the autocast dtype.
        score: ``"logits"`` (default, as in the Seg-Grad-CAM paper) or ``"probability"`` (apply
            ``output_activation`` before summing over the ROI).
        output_activation: ``"sigmoid"`` or ``"softmax"``; required with ``score="probability"``. ``"none"``: the
            network ends in its own sigmoid/softmax, its outputs are probabilities (``score="probability"`` then
            sums them as they are; pass ``activation="none"`` to :class:`~medcam.targets.PredictedROI` too).
        upsampler: ``upsampler(maps [B, K, *f], size) -> [B, K, *size]``; default :func:`interpolate_upsampler`.
        output_index: which element to explain when the model returns a tuple/list (e.g. deep supervision).
        progress: show a tqdm bar over windows (sliding-window mode).
        batch_targets: differentiate several targets in one batched backward pass (``is_grads_batched``, vmap) rather
            than one pass each; falls back to one pass each if the network has an op vmap cannot batch. Off by
            default: on an H100 (SegResNet, 128^3 windows, sw_batch 4, 3 targets) it was no faster and raised peak
            memory from 2.6x to 4.5x inference.
        reshape_transform: for layers whose output is not a feature map ``[B, K, *f]``, e.g. ViT tokens
            ``[B, N, C]``: ``transform(output, input spatial size) -> [B, K, *f]``, applied alike to the activation
            and its gradient (use :class:`medcam.TokenGrid` for UNETR's ``vit.blocks.N``).
    """

    #: True for methods whose map is formed element-wise (HiResCAM, LayerCAM); False for pooled channel weights.
    elementwise: bool = True
    #: False for methods whose pooled weights are not additive over sliding windows.
    supports_sliding_window: bool = True
    #: True for pooled methods with :meth:`activation_statistics` (they cost one more forward-only pass per window).
    uses_activation_statistics: bool = False

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module = "auto",
        *,
        inferer: Any | None = None,
        amp: bool = False,
        amp_dtype: torch.dtype | None = None,
        score: Literal["logits", "probability"] = "logits",
        output_activation: Literal["sigmoid", "softmax"] | None = None,
        upsampler: Upsampler | None = None,
        output_index: int = 0,
        progress: bool = False,
        batch_targets: bool = False,
        reshape_transform: ReshapeTransform | None = None,
    ):
        self.model = check_hookable(model)
        if score not in ("logits", "probability"):
            raise MedcamError(f"score must be 'logits' or 'probability', got {score!r}")
        if score == "probability" and output_activation not in ("sigmoid", "softmax", "none"):
            raise MedcamError(
                "score='probability' needs output_activation='sigmoid' or 'softmax' (the model's own), or 'none' "
                "when the model outputs probabilities itself"
            )
        if output_activation not in (None, "sigmoid", "softmax", "none"):
            raise MedcamError(
                f"output_activation must be 'sigmoid', 'softmax', 'none' (outputs are probabilities) or None, "
                f"got {output_activation!r}"
            )
        self.score, self.output_activation = score, output_activation
        self.upsampler = upsampler or interpolate_upsampler
        self.output_index = output_index
        self.amp, self.amp_dtype, self.progress = amp, amp_dtype, progress
        self.batch_targets = batch_targets
        self.reshape_transform = reshape_transform
        self._output_channels: int | None = None  # learnt from one window by the sliding-window engine
        self._layer_spec = layer
        if layer == "auto":
            self.layer_name: str | None = None
            self.layer_module: nn.Module | None = None
        else:
            self.layer_name, self.layer_module = resolve_layer(self.model, layer)
        if inferer is not None:
            from .sliding import check_inferer

            check_inferer(inferer, self)
        self.inferer = inferer

    # ------------------------------------------------------------------ formulas (overridden by methods)
    def elementwise_map(self, activation: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Element-wise methods: pre-ReLU map ``[B, *f]`` from ``A`` and ``g`` (both ``[B, K, *f]``, float32)."""
        raise NotImplementedError

    def gradient_statistics(
        self, activation: torch.Tensor, grad: torch.Tensor, activation_stats: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Pooled methods: statistics ``{name: [B, K]}`` that involve the gradient, as sums over the feature grid.

        They are additive over sliding windows (each window's gradient already carries its blending weight) and
        zero for windows outside the ROI. ``activation_stats``: the :meth:`activation_statistics` of the whole
        image/volume (``{name: [B, K]}``), for methods whose per-position terms need them (Grad-CAM++); with an
        inferer they are gathered over every window before the gradient pass.
        """
        raise NotImplementedError

    def activation_statistics(self, activation: torch.Tensor, weight: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Pooled methods: statistics ``{name: [B, K]}`` of the activation alone (default: none).

        ``weight`` ``[B, 1, *f]`` is a window's normalised blending weight on the feature grid (None for a whole
        image, i.e. 1), so that overlapping windows count each feature position once. With an inferer they are
        taken over every window, not only the ROI windows.
        """
        return {}

    def weights_from_statistics(self, stats: dict[str, torch.Tensor], n_positions: float) -> torch.Tensor:
        """Pooled methods: channel weights ``alpha`` ``[B, K]`` from summed statistics; ``n_positions`` = N."""
        raise NotImplementedError

    def feature_map(self, activation: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Pre-ReLU map ``[B, *f]`` on the feature grid for a whole-image forward."""
        if self.elementwise:
            return self.elementwise_map(activation, grad)
        n = float(torch.tensor(activation.shape[2:]).prod())
        act_stats = self.activation_statistics(activation, None)
        stats = {**self.gradient_statistics(activation, grad, act_stats), **act_stats}
        alpha = self.weights_from_statistics(stats, n)
        return weighted_channel_sum(alpha, activation)

    # ------------------------------------------------------------------ public API
    def __call__(
        self,
        image: torch.Tensor,
        targets: Target | Sequence[Target],
        *,
        relu: bool = True,
        upsample: bool = True,
    ) -> torch.Tensor:
        """Maps ``[B, K, *S]`` (float32, on ``image.device``) for ``image`` ``[B, Cin, *S]`` and K targets."""
        return self.explain(image, targets, relu=relu, upsample=upsample).maps

    def explain(
        self,
        image: torch.Tensor,
        targets: Target | Sequence[Target],
        *,
        relu: bool = True,
        upsample: bool = True,
        output: torch.Tensor | None = None,
    ) -> CAMResult:
        """Like ``__call__`` but returns a :class:`CAMResult` with scores, ROI sizes and the model output.

        Args:
            output: sliding-window mode only: the blended output ``[B, C, *S]`` of ``sliding_window_inference`` with
                the same model and inferer settings, if you already ran inference. It spares the prediction pass
                that :class:`~medcam.targets.PredictedROI`/:class:`~medcam.targets.ComponentROI` or
                ``score="probability"`` otherwise need.
        """
        tl = as_target_list(targets)
        image = validate_image(image)
        check_spatial_dims(image, self.inferer)
        if output is not None and self.inferer is None:
            raise MedcamError("output= is for the sliding-window mode; without an inferer the forward pass gives it")
        self._ensure_layer(image)
        if self.inferer is not None:
            from .sliding import explain_sliding

            return explain_sliding(self, image, tl, relu=relu, upsample=upsample, output=output)
        return self._explain_whole(image, tl, relu=relu, upsample=upsample)

    # ------------------------------------------------------------------ internals
    def _ensure_layer(self, image: torch.Tensor) -> None:
        if self.layer_module is not None:
            return
        example = image[:1]
        if self.inferer is not None:
            from monai.utils import fall_back_tuple

            roi = fall_back_tuple(self.inferer.roi_size, image.shape[2:])
            example = torch.zeros((1, image.shape[1], *roi), dtype=image.dtype, device=image.device)
        self.layer_name, self.layer_module = resolve_layer(self.model, auto_layer(self.model, example))

    def autocast(self, device: torch.device):
        """Autocast context for forward passes (a no-op context when amp is off)."""
        if not self.amp:
            return contextlib.nullcontext()
        dtype = self.amp_dtype
        if dtype is None:
            bf16_ok = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
            dtype = torch.bfloat16 if bf16_ok else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)

    @contextlib.contextmanager
    def hooked(self, mode: Literal["grad", "detach", "stop"] = "grad") -> Iterator[ActivationHook]:
        """Model state preserved + the layer hooked; yields the :class:`ActivationHook` (both undone on exit)."""
        assert self.layer_module is not None and self.layer_name is not None
        with preserved_model_state(self.model), ActivationHook(self.layer_module, self.layer_name, mode) as hook:
            yield hook

    def forward(self, x: torch.Tensor, hook: ActivationHook) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward with the layer hooked in grad mode: ``(y [B, C, *S] with graph from A, A [B, K, *f] leaf)``."""
        hook.reset()
        with torch.enable_grad(), self.autocast(x.device):
            out = run_model(self.model, x)
        y = self.select_output(out)
        a = hook.activation
        if a is None:
            raise LayerError(
                f"layer {self.layer_name!r} never ran in the forward pass (it is defined but unused for this input); "
                "pick another layer (`medcam layers`, or medcam.list_layers in Python)"
            )
        self.to_feature_map(a.detach(), x.shape[2:])  # a layer that gives no feature map fails here, clearly

        if not y.requires_grad:
            raise LayerError(
                f"the model output does not depend on layer {self.layer_name!r} (no gradient path); "
                "choose a layer on the path to the output"
            )
        return y, a

    def to_feature_map(self, t: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
        """The hooked layer's output (or its gradient) as a float32 feature map ``[B, K, *f]``.

        ``spatial``: the spatial size of the input that produced it (the window with an inferer). Applies
        ``reshape_transform`` when one was given.
        """
        f = t if self.reshape_transform is None else self.reshape_transform(t, tuple(spatial))
        if f.ndim != len(spatial) + 2:
            hint = "choose a convolutional feature layer"
            if self.reshape_transform is None and t.ndim == 3:
                hint = (
                    "it looks like transformer tokens [B, N, C]: pass reshape_transform=medcam.TokenGrid(patch_size=...)"
                    " or choose a convolutional feature layer"
                )
            raise LayerError(
                f"layer {self.layer_name!r} outputs shape {tuple(f.shape)}, which is not a feature map with "
                f"{len(spatial)} spatial dims like the input; {hint}"
            )
        return f.float()

    def activation_grads(
        self, y: torch.Tensor, a: torch.Tensor, grad_outputs: list[torch.Tensor], retain_graph: bool = False
    ) -> list[torch.Tensor]:
        """``dS_t/dA`` (float32, shaped like the layer output ``A``) for output gradients ``dS_t/dy`` (``[B, C, *S]``).

        One batched backward pass for all targets when ``batch_targets`` (vmap over the backward graph), else one
        pass per target; the graph is freed after the last unless ``retain_graph``.
        """
        if not grad_outputs:
            return []
        if self.batch_targets and len(grad_outputs) > 1:
            try:
                (g,) = torch.autograd.grad(
                    y,
                    a,
                    grad_outputs=torch.stack(grad_outputs).to(y.dtype),
                    is_grads_batched=True,
                    retain_graph=True,  # kept so that the per-target fallback below can still run
                )
                return [check_finite_grad(gk, self.layer_name).float() for gk in g.unbind(0)]
            except RuntimeError as e:  # an op without a vmap batching rule: one pass per target from now on
                logger.info("batched backward unavailable for this network (%s); one pass per target", e)
                self.batch_targets = False
        out = []
        for n, go in enumerate(grad_outputs):
            keep = retain_graph or n < len(grad_outputs) - 1
            (g,) = torch.autograd.grad(y, a, grad_outputs=go.to(y.dtype), retain_graph=keep)
            out.append(check_finite_grad(g, self.layer_name).float())
        return out

    def select_output(self, out: Any) -> torch.Tensor:
        if isinstance(out, (tuple, list)):
            out = out[self.output_index]
        if not isinstance(out, torch.Tensor):
            raise ModelError(
                f"the model returned {type(out).__name__}; medcam needs a tensor [B, C, *spatial] "
                "(or a tuple/list of them: choose one with output_index)"
            )
        return out

    def output_gradient(self, output: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dS/dy [B, C, *S], S [B])`` for score weights ``W`` on the (detached, float32) output ``y``."""
        dims = tuple(range(1, output.ndim))
        if self.score == "logits":
            return weights, (weights * output).sum(dim=dims)
        if self.output_activation == "none":  # the outputs already are probabilities
            return weights, (weights * output).sum(dim=dims)
        with torch.enable_grad():
            yv = output.detach().float().requires_grad_(True)
            p = torch.sigmoid(yv) if self.output_activation == "sigmoid" else torch.softmax(yv, dim=1)
            score = (weights * p).sum(dim=dims)
            (grad,) = torch.autograd.grad(score.sum(), yv)
        return grad, score.detach()

    def _explain_whole(self, image: torch.Tensor, tl: list[Target], relu: bool, upsample: bool) -> CAMResult:
        with self.hooked("grad") as hook:
            y, a = self.forward(image, hook)
            y_det = y.detach().float()
            af = self.to_feature_map(a.detach(), image.shape[2:])
            maps, scores, voxels, g_outs = [], [], [], []
            for t in tl:
                w = t.score_weights(y_det)
                voxels.append((t.roi(y_det) != 0).reshape(y_det.shape[0], -1).sum(1))
                g_out, s = self.output_gradient(y_det, w)
                scores.append(s)
                if not bool((g_out != 0).any()):
                    logger.warning("target %r has an empty ROI: its map is all zero", t)
                    g_out = None
                g_outs.append(g_out)
            live = [g for g in g_outs if g is not None]
            grads = iter(self.activation_grads(y, a, live))
            for g_out in g_outs:
                if g_out is None:
                    maps.append(torch.zeros((af.shape[0], *af.shape[2:]), device=af.device))
                else:
                    maps.append(self.feature_map(af, self.to_feature_map(next(grads), image.shape[2:])))
            del y, a
        m = torch.stack(maps, dim=1)
        if upsample:
            m = self.upsampler(m, image.shape[2:])
        if relu:
            m = torch.relu(m)
        return CAMResult(
            maps=m.float().to(image.device),
            scores=torch.stack(scores, 1).float().cpu(),
            roi_voxels=torch.stack(voxels, 1).cpu(),
            targets=tl,
            layer=str(self.layer_name),
            feature_shape=tuple(af.shape[2:]),
            output=y_det,
        )


def run_model(model: nn.Module, x: torch.Tensor) -> Any:
    """``model(x)``, turning a failure inside the model into a :class:`ModelError` that says what it was given."""
    try:
        return model(x)
    except MedcamError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the input shape and what the model expects
        from .hooks import StopForward

        if isinstance(e, StopForward):
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if is_size_mismatch(e):  # the channels are fine: the spatial size does not suit the network's strides
            raise ModelError(
                f"the model failed on an input of shape {tuple(x.shape)} ({type(e).__name__}: {first}). The spatial "
                "size does not suit the network: pad the image to a multiple of its total downsampling factor "
                "(e.g. 16; monai.transforms.DivisiblePad(k=16)), or use a SlidingWindowInferer with such a roi_size"
            ) from e
        conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
        hint = ""
        if conv is not None:
            nd = conv.weight.ndim - 2
            hint = f"; its first convolution takes {conv.in_channels} channels and {nd} spatial dims"
        raise ModelError(
            f"the model failed on an input of shape {tuple(x.shape)} ({type(e).__name__}: {first}). "
            f"medcam passes the image as [B, Cin, *spatial]{hint}"
        ) from e


_SIZE_MISMATCH = ("must match the size of tensor", "sizes of tensors must match", "size of tensor a")


def is_size_mismatch(error: BaseException) -> bool:
    """True for torch's errors when two feature maps of different spatial sizes meet (a skip connection or a
    residual sum after an odd-sized down/upsampling): the input size is not divisible by the network's strides."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(k in text for k in _SIZE_MISMATCH)


def check_spatial_dims(image: torch.Tensor, inferer: Any = None) -> None:
    """Refuse an image whose number of dims does not fit the sliding window given per spatial dim.

    The usual mistake is an unbatched ``[C, *S]`` volume: MONAI would fail deep inside with an unrelated message
    ("Sequence must have length 2"). (Without an inferer, :func:`run_model` reports the model's failure with the
    shapes it expects.)
    """
    roi = getattr(inferer, "roi_size", None) if inferer is not None else None
    if not isinstance(roi, (tuple, list)) or not roi:
        return
    nd = len(roi)
    if image.ndim != nd + 2:
        raise MedcamError(
            f"image has shape {tuple(image.shape)} but the sliding window roi_size {tuple(roi)} has {nd} spatial "
            f"dims: give [B, C, {', '.join('XYZ'[:nd]) if nd <= 3 else '*spatial'}] ({nd + 2} dims; for a single "
            "[C, *spatial] volume use image[None])"
        )


def weighted_channel_sum(alpha: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """``sum_k alpha[b, k] * A[b, k, u]`` -> ``[B, *f]``."""
    shape = (*alpha.shape, *([1] * (activation.ndim - 2)))
    return (alpha.reshape(shape) * activation).sum(dim=1)


def check_finite_grad(grad: torch.Tensor, layer: str | None) -> torch.Tensor:
    if not bool(torch.isfinite(grad).all()):
        raise ModelError(
            f"the gradient at layer {layer!r} contains NaN/inf (overflow under fp16 autocast, or a non-finite "
            "model output); run without --amp (Python: amp=False or amp_dtype=torch.bfloat16), and check the input for NaN/inf"
        )
    return grad


def validate_image(image: Any) -> torch.Tensor:
    """Check the input is a finite float tensor ``[B, Cin, *S]``; return it (MetaTensor -> plain tensor)."""
    if not isinstance(image, torch.Tensor):
        raise MedcamError(f"image must be a torch tensor [B, C, *spatial], got {type(image).__name__}")
    if image.ndim < 3:
        raise MedcamError(
            f"image has shape {tuple(image.shape)}; expected [B, C, *spatial] (add batch/channel dims, e.g. "
            "image[None] for a single [C, X, Y, Z] volume)"
        )
    if hasattr(image, "as_tensor"):
        image = image.as_tensor()
    if not image.is_floating_point():
        image = image.float()
    if not bool(torch.isfinite(image).all()):
        raise MedcamError("image contains NaN or inf values; clean or normalise it first")
    return image
