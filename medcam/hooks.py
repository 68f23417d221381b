"""Context managers that hook one layer and leave the user's model exactly as it was.

Why a leaf activation: the hooked layer's output is replaced by ``A.clone()`` where ``A`` is a fresh leaf tensor that
requires grad. With every parameter's ``requires_grad`` switched off for the duration of the call, nothing before the
hook builds an autograd graph (the encoder up to a U-Net bottleneck costs no graph memory), and
``torch.autograd.grad(y, A, ...)`` differentiates with respect to the activation only, so no parameter ``.grad`` is
ever created. The clone keeps in-place operations after the layer (e.g. ``ReLU(inplace=True)`` in MONAI nets) from
touching the leaf.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from .errors import LayerError, MedcamError, ModelError

__all__ = ["preserved_model_state", "ActivationHook", "StopForward", "HookMode", "run_model", "is_size_mismatch"]

#: what the hook does with the layer's output (see :class:`ActivationHook`)
HookMode = Literal["grad", "detach", "stop"]


class StopForward(Exception):
    """Raised by a hook in ``"stop"`` mode to end a forward pass once the activation is captured."""


@contextlib.contextmanager
def preserved_model_state(model: nn.Module, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and freeze its parameters; restore every module's mode and every flag on exit.

    Restores, even on error: ``training`` of each submodule (a model may mix train/eval submodules) and
    ``requires_grad`` of each parameter.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if eval_mode:
            model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, req in flags:
            p.requires_grad_(req)


class ActivationHook:
    """Forward hook on one layer, removed on exit of the ``with`` block (also on error).

    Modes:
        ``"grad"``: capture the output as a leaf ``A`` that requires grad and pass ``A.clone()`` downstream.
        ``"detach"``: capture the detached output, pass the output on unchanged.
        ``"stop"``: capture the detached output and raise :class:`StopForward` (the rest of the net does not run).

    Attributes:
        activation: the captured tensor ``[B, K, *f]`` of the last forward (None until the layer fires).
        calls: how often the layer fired since the last :meth:`reset`.
    """

    def __init__(self, module: nn.Module, name: str, mode: HookMode = "grad"):
        self.module, self.name, self.mode = module, name, mode
        self.activation: torch.Tensor | None = None
        self.calls = 0
        self._handle: Any = None

    def reset(self) -> None:
        self.activation, self.calls = None, 0

    @contextlib.contextmanager
    def mode_as(self, mode: HookMode) -> Iterator[ActivationHook]:
        """Switch the hook to ``mode`` for the ``with`` block; the previous mode is restored on exit (also on error)."""
        previous, self.mode = self.mode, mode
        try:
            yield self
        finally:
            self.mode = previous

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> torch.Tensor | None:
        self.calls += 1
        if self.calls > 1:
            raise LayerError(
                f"layer {self.name!r} runs more than once in one forward pass (a shared/reused module); "
                "hook a module that is called once, e.g. a child or parent of it (`medcam layers` or medcam.list_layers)"
            )
        if not isinstance(output, torch.Tensor):
            raise LayerError(
                f"layer {self.name!r} returns {type(output).__name__}, not a tensor; hook one of its submodules "
                "that returns a feature tensor [B, K, *spatial]"
            )
        if self.mode == "grad":
            leaf = output.detach().requires_grad_(True)
            self.activation = leaf
            return leaf.clone()
        self.activation = output.detach()
        if self.mode == "stop":
            raise StopForward
        return None

    def __enter__(self) -> ActivationHook:
        self.reset()
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def run_model(model: nn.Module, x: torch.Tensor) -> Any:
    """``model(x)``, turning a failure inside the model into a :class:`ModelError` that says what it was given.

    :class:`StopForward` (a hook ending the pass on purpose) and medcam's own errors pass through unchanged.
    """
    try:
        return model(x)
    except (MedcamError, StopForward):
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the input shape and what the model expects
        first_line = (str(e).splitlines() or [""])[0]
        if is_size_mismatch(e):  # the channels are fine: the spatial size does not suit the network's strides
            raise ModelError(
                f"the model failed on an input of shape {tuple(x.shape)} ({type(e).__name__}: {first_line}). The "
                "spatial size does not suit the network: pad the image to a multiple of its total downsampling "
                "factor (e.g. 16; monai.transforms.DivisiblePad(k=16)), or use a SlidingWindowInferer with such a "
                "roi_size"
            ) from e
        conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
        hint = ""
        if conv is not None:
            nd = conv.weight.ndim - 2
            hint = f"; its first convolution takes {conv.in_channels} channels and {nd} spatial dims"
        raise ModelError(
            f"the model failed on an input of shape {tuple(x.shape)} ({type(e).__name__}: {first_line}). "
            f"medcam passes the image as [B, Cin, *spatial]{hint}"
        ) from e


_SIZE_MISMATCH = ("must match the size of tensor", "sizes of tensors must match", "size of tensor a")


def is_size_mismatch(error: BaseException) -> bool:
    """True for torch's errors when two feature maps of different spatial sizes meet (a skip connection or a
    residual sum after an odd-sized down/upsampling): the input size is not divisible by the network's strides."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(k in text for k in _SIZE_MISMATCH)
