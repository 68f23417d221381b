"""Running the user's model once: the only place that hooks, forwards, selects the output and differentiates.

:class:`ModelRunner` is what every path that runs the model uses (the whole-image and sliding-window executors,
``medcam.pipeline``'s prediction, :func:`medcam.evaluate`), and what a framework's own predictor (nnU-Net, MONAI
bundles) would use too:

* the layer: chosen by name/module, or ``"auto"`` on the first example (:meth:`ModelRunner.ensure_layer`);
* :meth:`ModelRunner.session`: model state preserved (eval mode, parameters frozen, all restored on exit) and the
  layer hooked (hook removed on exit), in the try/finally of context managers;
* forward passes under autocast with output selection (:meth:`ModelRunner.forward`, :meth:`ModelRunner.activations`,
  :meth:`ModelRunner.predict`);
* gradients with respect to the activation only (:meth:`ModelRunner.activation_grads`): no parameter ``.grad``;
* the explained score's output gradient ``dS/dy`` (:meth:`ModelRunner.output_gradient`): logits or probabilities.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from .errors import LayerError, MedcamError, ModelError
from .hooks import ActivationHook, HookMode, StopForward, preserved_model_state, run_model
from .layers import auto_layer, check_hookable, resolve_layer

__all__ = ["ModelRunner", "ReshapeTransform", "ScoreKind", "OutputActivation", "validate_image", "check_finite_grad"]

logger = logging.getLogger(__name__)

#: ``transform(layer output, input spatial size) -> [B, K, *f]`` (e.g. :class:`medcam.TokenGrid` for ViT tokens)
ReshapeTransform = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]
ScoreKind = Literal["logits", "probability"]
#: the model's own output activation; ``"none"``: the network ends in it, its outputs already are probabilities
OutputActivation = Literal["sigmoid", "softmax", "none"]


class ModelRunner:
    """Runs one model with one hooked layer; holds no per-call state.

    Args:
        model: any PyTorch network ``[B, Cin, *S] -> [B, C, *S]`` (or a tuple/list of outputs); never modified.
        layer: dotted name, the module itself, or ``"auto"`` (resolved by :meth:`ensure_layer`).
        amp: forward under ``torch.autocast`` (bf16 where supported, else fp16); gradients returned in fp32.
        amp_dtype: override the autocast dtype.
        output_index: which element to use when the model returns a tuple/list (deep supervision).
        reshape_transform: for layers whose output is not a feature map (ViT tokens ``[B, N, C]``).
        score: ``"logits"`` (``S = sum W y``) or ``"probability"`` (``S = sum W act(y)``).
        output_activation: ``"sigmoid"``/``"softmax"`` (the model's own); required with ``score="probability"``.
            ``"none"``: the outputs already are probabilities (``score="probability"`` sums them as they are).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module = "auto",
        *,
        amp: bool = False,
        amp_dtype: torch.dtype | None = None,
        output_index: int = 0,
        reshape_transform: ReshapeTransform | None = None,
        score: ScoreKind = "logits",
        output_activation: OutputActivation | None = None,
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
        self.amp, self.amp_dtype = amp, amp_dtype
        self.output_index = output_index
        self.reshape_transform = reshape_transform
        self.score, self.output_activation = score, output_activation
        self.layer_name: str | None = None
        self.layer_module: nn.Module | None = None
        self._output_channels: int | None = None  # learnt from one input by output_channels()
        if layer != "auto":
            self.layer_name, self.layer_module = resolve_layer(self.model, layer)

    # ------------------------------------------------------------------ layer and hooking
    def ensure_layer(self, example: torch.Tensor) -> str:
        """Resolve ``layer="auto"`` on ``example`` ``[1, Cin, *S]`` (a no-op once resolved); return the name."""
        if self.layer_module is None:
            self.layer_name, self.layer_module = resolve_layer(self.model, auto_layer(self.model, example))
        assert self.layer_name is not None
        return self.layer_name

    @contextlib.contextmanager
    def session(self, mode: HookMode = "grad") -> Iterator[ActivationHook]:
        """Model state preserved + the layer hooked; yields the :class:`ActivationHook` (both undone on exit)."""
        if self.layer_module is None or self.layer_name is None:
            raise LayerError("the layer is not resolved yet: call ensure_layer(example) first")
        with preserved_model_state(self.model), ActivationHook(self.layer_module, self.layer_name, mode) as hook:
            yield hook

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """Autocast context for forward passes (a no-op context when amp is off)."""
        if not self.amp:
            return contextlib.nullcontext()
        dtype = self.amp_dtype
        if dtype is None:
            bf16_ok = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
            dtype = torch.bfloat16 if bf16_ok else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)

    # ------------------------------------------------------------------ forward passes
    def select_output(self, out: Any) -> torch.Tensor:
        """The explained tensor of a model output (element ``output_index`` of a tuple/list)."""
        if isinstance(out, (tuple, list)):
            out = out[self.output_index]
        if not isinstance(out, torch.Tensor):
            raise ModelError(
                f"the model returned {type(out).__name__}; medcam needs a tensor [B, C, *spatial] "
                "(or a tuple/list of them: choose one with output_index)"
            )
        return out.as_tensor() if hasattr(out, "as_tensor") else out

    def predictor(self, x: torch.Tensor) -> torch.Tensor:
        """``select_output(model(x))`` under autocast; gradients as the caller's context says (a MONAI predictor)."""
        with self.autocast(x.device):
            return self.select_output(run_model(self.model, x))

    def hooked_predictor(self, hook: ActivationHook) -> Callable[[torch.Tensor], torch.Tensor]:
        """:meth:`predictor` for a model whose layer is hooked: the hook is reset before each call (one per window)."""

        def predict(x: torch.Tensor) -> torch.Tensor:
            hook.reset()
            return self.predictor(x)

        return predict

    def predict(self, image: torch.Tensor, inferer: Any = None) -> torch.Tensor:
        """Model output ``[B, C, *S]`` (float32, detached): ``inferer(image, predictor)`` or ``predictor(image)``.

        No gradient, model state preserved (eval mode during the call, all restored after); no hook needed.
        """
        with preserved_model_state(self.model), torch.no_grad(), self.autocast(image.device):
            out = self.predictor(image) if inferer is None else inferer(image, self.predictor)
        out = out.as_tensor() if hasattr(out, "as_tensor") else out
        return out.detach().float()

    def forward(self, x: torch.Tensor, hook: ActivationHook) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward with the layer hooked in grad mode: ``(y [B, C, *S] with graph from A, A [B, K, *f] leaf)``."""
        hook.reset()
        with torch.enable_grad():
            y = self.predictor(x)
        a = self._captured(hook)
        self.to_feature_map(a.detach(), x.shape[2:])  # a layer that gives no feature map fails here, clearly
        if not y.requires_grad:
            raise LayerError(
                f"the model output does not depend on layer {self.layer_name!r} (no gradient path); "
                "choose a layer on the path to the output"
            )
        return y, a

    def activations(self, x: torch.Tensor, hook: ActivationHook) -> torch.Tensor:
        """The layer's activation ``[B, K, *f]`` (float32) for ``x``, without gradient.

        In ``"stop"`` mode the forward pass ends at the layer; in ``"detach"`` mode it runs to the end.
        """
        hook.reset()
        try:
            with torch.no_grad():
                self.predictor(x)
        except StopForward:
            pass
        return self.to_feature_map(self._captured(hook), x.shape[2:])

    def output_channels(self, x: torch.Tensor, hook: ActivationHook) -> int:
        """Number of output channels ``C`` of the model: one no-grad forward of ``x`` the first time, then cached."""
        if self._output_channels is None:
            with hook.mode_as("detach"), torch.no_grad():
                hook.reset()
                self._output_channels = int(self.predictor(x).shape[1])
        return self._output_channels

    def _captured(self, hook: ActivationHook) -> torch.Tensor:
        if hook.activation is None:
            raise LayerError(
                f"layer {self.layer_name!r} never ran in the forward pass (it is defined but unused for this input); "
                "pick another layer (`medcam layers`, or medcam.list_layers in Python)"
            )
        return hook.activation

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

    # ------------------------------------------------------------------ gradients
    def activation_grad(
        self, y: torch.Tensor, a: torch.Tensor, grad_output: torch.Tensor, retain_graph: bool = False
    ) -> torch.Tensor:
        """``dS/dA`` (float32, shaped like the layer output ``A``) for the output gradient ``dS/dy`` ``[B, C, *S]``.

        One backward pass from ``y`` to ``A`` (the activation only: no parameter gradient); the graph is freed
        unless ``retain_graph``.
        """
        (g,) = torch.autograd.grad(y, a, grad_outputs=grad_output.to(y.dtype), retain_graph=retain_graph)
        return check_finite_grad(g, self.layer_name).float()

    def activation_grads(
        self, y: torch.Tensor, a: torch.Tensor, grad_outputs: Sequence[torch.Tensor], retain_graph: bool = False
    ) -> list[torch.Tensor]:
        """:meth:`activation_grad` for several output gradients, one backward pass each (graph kept until the last)."""
        last = len(grad_outputs) - 1
        return [self.activation_grad(y, a, go, retain_graph or n < last) for n, go in enumerate(grad_outputs)]

    def output_gradient(self, output: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dS/dy [B, C, *S], S [B])`` for score weights ``W`` on the (detached, float32) output ``y``."""
        dims = tuple(range(1, output.ndim))
        if self.score == "logits" or self.output_activation == "none":  # "none": the outputs are probabilities
            return weights, (weights * output).sum(dim=dims)
        with torch.enable_grad():
            yv = output.detach().float().requires_grad_(True)
            p = torch.sigmoid(yv) if self.output_activation == "sigmoid" else torch.softmax(yv, dim=1)
            score = (weights * p).sum(dim=dims)
            (grad,) = torch.autograd.grad(score.sum(), yv)
        return grad, score.detach()


def check_finite_grad(grad: torch.Tensor, layer: str | None) -> torch.Tensor:
    """``grad`` itself, or a :class:`ModelError` if it holds NaN/inf."""
    if not bool(torch.isfinite(grad).all()):
        raise ModelError(
            f"the gradient at layer {layer!r} contains NaN/inf (overflow under fp16 autocast, or a non-finite "
            "model output); run without --amp (Python: amp=False or amp_dtype=torch.bfloat16), and check the input "
            "for NaN/inf"
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
