"""Choosing the layer to explain: by dotted name, by module, or automatically (the U-Net bottleneck)."""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass

import torch
from torch import nn

from .errors import LayerError, ModelError
from .hooks import preserved_model_state, run_model

__all__ = ["LayerInfo", "list_layers", "resolve_layer", "auto_layer", "check_hookable", "check_layer_runs_once"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerInfo:
    """One candidate layer.

    Attributes:
        name: dotted name from ``model.named_modules()``.
        type: the module's class name.
        shape: output shape ``(B, K, *f)`` for the example input.
        stride: input spatial size / output spatial size, per spatial dim (e.g. ``(8.0, 8.0, 8.0)``).
        order: position in the forward call order (0 = fires first).
        is_output: True if this module's output is the model output (the head).
        on_input: True if the module is applied to the model input itself (a stem, e.g. a ViT patch embedding):
            its output is a filter of the image, not a learnt representation, so ``auto`` passes it over.
        calls: how often the module ran in the forward pass. A module that runs more than once (a reused
            activation such as the ``act`` of a MONAI ``ResBlock``, applied twice) has no single activation to
            explain: medcam refuses it (see :func:`check_layer_runs_once`); ``shape`` is then its first call's.
    """

    name: str
    type: str
    shape: tuple[int, ...]
    stride: tuple[float, ...]
    order: int
    is_output: bool
    on_input: bool = False
    calls: int = 1

    @property
    def channels(self) -> int:
        return self.shape[1]


def check_hookable(model: nn.Module) -> nn.Module:
    """Return the eager module to hook; raise a clear error for TorchScript, unwrap ``torch.compile``."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError(
            "the model is a TorchScript module (torch.jit.script/trace/load); forward hooks cannot be attached to it. "
            "Build the eager network (e.g. monai.networks.nets.SegResNet(...)) and load the weights with "
            "net.load_state_dict(scripted.state_dict()), then explain that"
        )
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    orig = getattr(model, "_orig_mod", None)  # torch.compile wrapper: hooks need the eager module
    if isinstance(orig, nn.Module):
        logger.info("explaining the eager module behind torch.compile")
        return orig
    return model


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """Find ``layer`` (dotted name or module) in ``model``; return ``(name, module)``."""
    modules = dict(model.named_modules())
    if isinstance(layer, nn.Module):
        for name, m in modules.items():
            if m is layer:
                if isinstance(m, torch.jit.ScriptModule):
                    raise ModelError(
                        f"layer {name!r} is a TorchScript module and cannot be hooked; use an eager module"
                    )
                return name, m
        raise LayerError(f"the module {type(layer).__name__} given as layer is not part of the model")
    if not isinstance(layer, str):
        raise LayerError(f"layer must be a dotted module name, an nn.Module or 'auto', got {type(layer).__name__}")
    if layer not in modules:
        close = difflib.get_close_matches(layer, [n for n in modules if n], n=5, cutoff=0.5)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise LayerError(
            f"unknown layer {layer!r}.{hint} See medcam.list_layers(model, example_input) or "
            "`medcam layers` for the candidates with their shapes and strides"
        )
    module = modules[layer]
    if isinstance(module, torch.jit.ScriptModule):
        raise ModelError(f"layer {layer!r} is a TorchScript module and cannot be hooked; use an eager module")
    return layer, module


def list_layers(model: nn.Module, example_input: torch.Tensor) -> list[LayerInfo]:
    """Run one no-grad forward pass and list every module whose output is a spatial feature map.

    Args:
        model: the network (left unchanged: mode and flags restored).
        example_input: ``[B, Cin, *S]``; a small crop of a real input is enough (spatial sizes divisible by the
            network's total stride).
    Returns:
        LayerInfo per module whose output is a tensor ``[B, K, *f]`` with as many spatial dims as the input,
        once per module (``calls`` says how often it ran; only modules with ``calls == 1`` can be explained), in
        the order of their first call.
    """
    model = check_hookable(model)
    spatial = tuple(example_input.shape[2:])
    records: list[tuple[str, nn.Module, tuple[int, ...], int, bool]] = []
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    calls: dict[str, int] = {}

    def make_hook(name: str):
        def hook(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] > 1:
                return
            if isinstance(output, torch.Tensor) and output.ndim == example_input.ndim:
                on_input = any(i is example_input for i in inputs)
                records.append((name, module, tuple(output.shape), len(records), on_input))
                outputs[name] = output

        return hook

    with preserved_model_state(model):
        try:
            for name, m in model.named_modules():
                if name and not isinstance(m, torch.jit.ScriptModule):
                    handles.append(m.register_forward_hook(make_hook(name)))
            with torch.no_grad():
                out = run_model(model, example_input)
        finally:
            for h in handles:
                h.remove()
    if isinstance(out, (tuple, list)):
        out = out[0]
    infos = []
    for name, module, shape, order, on_input in records:
        stride = tuple(float(s) / float(f) for s, f in zip(spatial, shape[2:]))
        infos.append(
            LayerInfo(name, type(module).__name__, shape, stride, order, outputs[name] is out, on_input, calls[name])
        )
    return infos


def check_layer_runs_once(model: nn.Module, layer: str, example_input: torch.Tensor) -> None:
    """Raise :class:`LayerError` if ``layer`` runs more than once (or never) in a forward pass of ``example_input``.

    Meant to be called before any real data is loaded (the command line does): one no-grad forward of a small
    example input (e.g. zeros of the sliding-window size).
    """
    model = check_hookable(model)
    resolve_layer(model, layer)
    info = next((i for i in list_layers(model, example_input) if i.name == layer), None)
    if info is None:
        return  # not a feature-map layer, or it did not run for this input: the engine explains why on the case
    if info.calls > 1:
        raise LayerError(
            f"layer {layer!r} runs {info.calls} times per forward pass (a reused module, e.g. an activation "
            "applied twice in a residual block), so it has no single activation to explain; choose a layer that "
            "runs once, e.g. its parent block or a layer before it (`medcam layers` flags the reused ones)"
        )


def auto_layer(model: nn.Module, example_input: torch.Tensor) -> str:
    """The coarsest-resolution feature layer that is not the output head (the bottleneck of a U-Net).

    Among the layers with the largest total stride, take those with the most channels (decoder 1x1 convolutions at
    the same resolution reduce channels), then the last to fire (a container fires after its children, so the whole
    bottleneck block wins over its last sub-layer). MONAI ``SkipConnection`` modules (concatenation of a bypass and
    the deeper path) are not candidates, nor are stems applied to the input itself (UNETR's patch embedding is its
    coarsest feature map, but a linear filter of the image; its decoder's first stage is chosen instead).
    """
    # a MONAI SkipConnection outputs cat(bypass, submodule): not one path's features, so it is never the bottleneck
    infos = [
        i for i in list_layers(model, example_input) if not i.is_output and i.type != "SkipConnection" and i.calls == 1
    ]
    infos = [i for i in infos if not i.on_input] or infos
    if not infos:
        raise LayerError("no spatial feature layer found; pass layer=<dotted name> explicitly")

    def total_stride(i: LayerInfo) -> float:
        p = 1.0
        for s in i.stride:
            p *= s
        return p

    coarsest = max(total_stride(i) for i in infos)
    cands = [i for i in infos if abs(total_stride(i) - coarsest) < 1e-6]
    most = max(i.channels for i in cands)
    chosen = max((i for i in cands if i.channels == most), key=lambda i: i.order)
    logger.info(
        "layer='auto' chose %r (%s, output %s, stride %s)", chosen.name, chosen.type, chosen.shape, chosen.stride
    )
    return chosen.name
