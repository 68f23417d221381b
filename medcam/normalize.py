"""Explicit normalisation of maps (medcam never normalises silently)."""

from __future__ import annotations

from typing import Literal

import torch

from .errors import MedcamError

__all__ = ["normalize"]


def normalize(maps: torch.Tensor, mode: Literal["minmax", "max"] = "minmax", eps: float = 1e-12) -> torch.Tensor:
    """Normalise each map ``[B, K, *S]`` independently (per sample and target).

    ``"minmax"``: ``(m - min) / (max - min)``; ``"max"``: ``m / max`` (for non-negative, ReLU'd maps; a map whose
    maximum is <= eps becomes zero). A constant map (e.g. the all-zero map of an empty ROI) becomes all zero rather
    than NaN.
    """
    if maps.ndim < 3:
        raise MedcamError(f"maps must be [B, K, *spatial], got shape {tuple(maps.shape)}")
    flat = maps.flatten(2)
    mx = flat.amax(-1, keepdim=True)
    if mode == "minmax":
        mn = flat.amin(-1, keepdim=True)
        rng = mx - mn
        out = torch.where(
            rng > eps, (flat - mn) / torch.where(rng > eps, rng, torch.ones_like(rng)), torch.zeros_like(flat)
        )
    elif mode == "max":
        out = torch.where(mx > eps, flat / torch.where(mx > eps, mx, torch.ones_like(mx)), torch.zeros_like(flat))
    else:
        raise MedcamError(f"mode must be 'minmax' or 'max', got {mode!r}")
    return out.reshape(maps.shape)
