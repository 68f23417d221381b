"""Explicit normalisation of maps (medcam never normalises silently): the one min-max / max normaliser.

Every other normalisation in medcam (``metrics.normalize_maps``, the AME-CAM helpers ``amecam.minmax_maps``,
``amecam.authors_normalize``, ``amecam.authors_minmax`` and ``amecam.minmax_volume``) is a call of
:func:`normalize` with its own options, so that the formulas live in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from .errors import MedcamError

__all__ = ["normalize"]

#: what a map whose range (``max - min``, or ``max`` for mode "max") is <= ``eps`` becomes
ConstantMaps = Literal["zero", "one", "keep"]


def normalize(
    maps: torch.Tensor,
    mode: Literal["minmax", "max"] = "minmax",
    eps: float = 1e-12,
    *,
    dims: int | Sequence[int] | None = None,
    offset: float = 0.0,
    constant: ConstantMaps = "zero",
    check_finite: bool = False,
) -> torch.Tensor:
    """Normalise each map independently.

    ``"minmax"``: ``(m - min + offset) / (max - min + offset)``; ``"max"``: ``m / max`` (for non-negative, ReLU'd
    maps). A map whose range (``max - min``; for ``"max"``: ``max``) is <= ``eps`` is constant (e.g. the all-zero
    map of an empty ROI) and becomes ``constant``: all zero (default, never NaN), all one, or kept as it is.

    Args:
        maps: ``[B, K, *S]`` (one map per sample and target) when ``dims`` is None; any shape otherwise.
        mode: ``"minmax"`` or ``"max"``.
        eps: range threshold below which (inclusive) a map counts as constant; 0 treats only exactly constant
            maps so.
        dims: the dims one map spans (min and max are taken over them); default all dims after the first two.
        offset: added to numerator and denominator of ``"minmax"`` (the AME-CAM authors' ``1e-5``); 0 = plain.
        constant: what a constant map becomes: ``"zero"``, ``"one"`` or ``"keep"`` (unchanged).
        check_finite: raise :class:`~medcam.MedcamError` on NaN/inf values (by default a map holding NaN has a
            NaN range and becomes ``constant``).
    Returns:
        Tensor of the shape, dtype and device of ``maps``. Differentiable (min/max ties share the gradient).
    """
    if mode not in ("minmax", "max"):
        raise MedcamError(f"mode must be 'minmax' or 'max', got {mode!r}")
    if constant not in ("zero", "one", "keep"):
        raise MedcamError(f"constant must be 'zero', 'one' or 'keep', got {constant!r}")
    if offset != 0.0 and mode != "minmax":
        raise MedcamError(f"offset applies to mode 'minmax' only, got offset={offset} with mode {mode!r}")
    if dims is None:
        if maps.ndim < 3:
            raise MedcamError(f"maps must be [B, K, *spatial], got shape {tuple(maps.shape)}")
        dims = tuple(range(2, maps.ndim))
    elif isinstance(dims, int):
        dims = (dims,)
    dims = tuple(dims)
    if check_finite and not bool(torch.isfinite(maps).all()):
        raise MedcamError("input holds NaN or inf values; clean it (e.g. torch.nan_to_num) before normalising")
    mx = maps.amax(dim=dims, keepdim=True)
    if mode == "minmax":
        mn = maps.amin(dim=dims, keepdim=True)
        shifted, rng = maps - mn, mx - mn
    else:
        shifted, rng = maps, mx
    varying = rng > eps
    if offset != 0.0:
        shifted, denom = shifted + offset, rng + offset
    else:  # no "+ 0.0": keeps the plain formula bit for bit
        denom = torch.where(varying, rng, torch.ones_like(rng))
    if constant == "zero":
        fallback = torch.zeros_like(maps)
    elif constant == "one":
        fallback = torch.ones_like(maps)
    else:
        fallback = maps
    return torch.where(varying, shifted / denom, fallback)
