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
from typing import Literal

import torch
from torch import nn

from .errors import LayerError

__all__ = ["preserved_model_state", "ActivationHook", "StopForward"]


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

    def __init__(self, module: nn.Module, name: str, mode: Literal["grad", "detach", "stop"] = "grad"):
        self.module, self.name, self.mode = module, name, mode
        self.activation: torch.Tensor | None = None
        self.calls = 0
        self._handle = None

    def reset(self) -> None:
        self.activation, self.calls = None, 0

    def _hook(self, module: nn.Module, inputs, output):
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

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
