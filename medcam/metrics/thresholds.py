"""Normalising and binarising CAMs: fixed value, percentile and Otsu thresholds (torch, batched).

Shape convention of all of :mod:`medcam.metrics`: a map tensor has any number of leading (batch-like) dims followed by
``spatial_dims`` spatial dims, e.g. ``[B, K, D, H, W]`` with ``spatial_dims=3``; per-map results have the leading
shape (``[B, K]``). Everything stays on the input's device.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from ..errors import MedcamError
from ..normalize import normalize

__all__ = [
    "check_maps",
    "normalize_maps",
    "percentile_threshold",
    "otsu_threshold",
    "threshold_maps",
]

logger = logging.getLogger(__name__)

ThresholdMethod = Literal["value", "percentile", "otsu"]


def check_maps(maps: torch.Tensor, spatial_dims: int, name: str = "maps") -> None:
    """Raise a :class:`~medcam.errors.MedcamError` unless ``maps`` is a finite tensor with ``spatial_dims`` trailing dims."""
    if not isinstance(maps, torch.Tensor):
        raise MedcamError(f"{name} must be a torch.Tensor, got {type(maps).__name__}; use torch.as_tensor(...)")
    if spatial_dims < 1:
        raise MedcamError(f"spatial_dims must be >= 1, got {spatial_dims}")
    if maps.ndim < spatial_dims:
        raise MedcamError(
            f"{name} has shape {tuple(maps.shape)} but spatial_dims={spatial_dims}: pass [..., *S] with "
            f"{spatial_dims} spatial dims (or set spatial_dims)"
        )
    if maps.numel() == 0:
        raise MedcamError(f"{name} is empty (shape {tuple(maps.shape)})")
    if maps.is_floating_point() and not torch.isfinite(maps).all():
        raise MedcamError(f"{name} contains NaN or inf values; check the CAM computation")


def _flat(maps: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """``[..., *S] -> [R, prod(S)]`` (float)."""
    n = 1
    for s in maps.shape[maps.ndim - spatial_dims :]:
        n *= int(s)
    return maps.reshape(-1, n)


def _lead(maps: torch.Tensor, spatial_dims: int) -> tuple[int, ...]:
    return tuple(maps.shape[: maps.ndim - spatial_dims])


def normalize_maps(
    maps: torch.Tensor, mode: Literal["minmax", "max"] | None = "minmax", spatial_dims: int = 3, eps: float = 1e-12
) -> torch.Tensor:
    """Normalise each map to [0, 1].

    ``minmax``: ``(L - min L) / (max L - min L)``; ``max``: ``L / max L`` (keeps 0 at 0, for ReLU maps);
    ``None``: unchanged. A constant map (range <= eps) becomes all zeros.

    Args:
        maps: ``[..., *S]`` float tensor.
        mode: ``"minmax"``, ``"max"`` or None.
        spatial_dims: number of trailing spatial dims.
    Returns:
        float tensor of the same shape and device.
    """
    check_maps(maps, spatial_dims)
    if mode is None:
        return maps.float()
    if mode not in ("minmax", "max"):
        raise MedcamError(f"normalisation mode must be 'minmax', 'max' or None, got {mode!r}")
    return normalize(maps.float(), mode, eps, dims=tuple(range(maps.ndim - spatial_dims, maps.ndim)))


def percentile_threshold(maps: torch.Tensor, q: float, spatial_dims: int = 3) -> torch.Tensor:
    """The ``q``-th percentile of each map (linear interpolation, as ``numpy.percentile``'s default).

    ``t = v_(i) + f (v_(i+1) - v_(i))`` with ``v`` the sorted values, ``i + f = q/100 (n - 1)``.

    Args:
        maps: ``[..., *S]``.
        q: percentile in [0, 100]; ``maps > t`` then keeps the top ``(100 - q)`` % (fewer with ties).
    Returns:
        ``[...]`` thresholds (float32).
    """
    check_maps(maps, spatial_dims)
    if not 0.0 <= float(q) <= 100.0:
        raise MedcamError(f"percentile q must be in [0, 100], got {q}")
    flat = _flat(maps.float(), spatial_dims)
    v = flat.sort(dim=1).values
    n = v.shape[1]
    pos = float(q) / 100.0 * (n - 1)
    i = min(int(pos), n - 1)
    f = pos - i
    j = min(i + 1, n - 1)
    t = v[:, i] + f * (v[:, j] - v[:, i])
    return t.reshape(_lead(maps, spatial_dims))


def otsu_threshold(maps: torch.Tensor, spatial_dims: int = 3, bins: int = 256) -> torch.Tensor:
    """Otsu's threshold (Otsu 1979) of each map, as ``skimage.filters.threshold_otsu``.

    A histogram of ``bins`` equal bins over ``[min, max]`` with centres ``c_i``; for a split after bin ``i``,
    ``w_1 = sum_{j<=i} h_j``, ``w_2 = sum_{j>i} h_j``, ``m_1``, ``m_2`` the class means;
    ``t = c_{i*}``, ``i* = argmax_i w_1 w_2 (m_1 - m_2)^2``. Voxels ``> t`` are foreground.
    A constant map gets ``t = its value`` (empty foreground).

    Args:
        maps: ``[..., *S]``.
        bins: number of histogram bins.
    Returns:
        ``[...]`` thresholds (float32).
    """
    check_maps(maps, spatial_dims)
    if bins < 2:
        raise MedcamError(f"bins must be >= 2, got {bins}")
    flat = _flat(maps.float(), spatial_dims).double()
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    width = (hi - lo) / bins
    const = (hi - lo) <= 0
    safe_w = torch.where(const, torch.ones_like(width), width)
    idx = ((flat - lo) / safe_w).floor().clamp_(0, bins - 1).long()
    hist = torch.zeros(flat.shape[0], bins, dtype=torch.float64, device=flat.device)
    hist.scatter_add_(1, idx, torch.ones_like(flat))
    centres = lo + (torch.arange(bins, device=flat.device, dtype=torch.float64) + 0.5) * width
    w1 = hist.cumsum(1)
    w2 = hist.flip(1).cumsum(1).flip(1)
    m1 = (hist * centres).cumsum(1) / w1.clamp_min(1e-300)
    m2 = (hist * centres).flip(1).cumsum(1).flip(1) / w2.clamp_min(1e-300)
    var12 = w1[:, :-1] * w2[:, 1:] * (m1[:, :-1] - m2[:, 1:]) ** 2
    i_star = var12.argmax(dim=1, keepdim=True)
    t = centres.gather(1, i_star)
    t = torch.where(const, lo, t)
    return t.squeeze(1).float().reshape(_lead(maps, spatial_dims))


def threshold_maps(
    maps: torch.Tensor,
    method: ThresholdMethod = "value",
    value: float | None = None,
    spatial_dims: int = 3,
) -> torch.Tensor:
    """Binarise maps: ``mask = L > t`` per map.

    Args:
        maps: ``[..., *S]`` (normalise first with :func:`normalize_maps` for a fixed value to mean anything).
        method: ``"value"`` (t = ``value``), ``"percentile"`` (t = ``value``-th percentile of each map, see
            :func:`percentile_threshold`) or ``"otsu"`` (:func:`otsu_threshold`; ``value`` ignored).
        value: the fixed threshold or the percentile.
    Returns:
        bool tensor of the same shape.
    """
    check_maps(maps, spatial_dims)
    if method == "value":
        if value is None:
            raise MedcamError("threshold method 'value' needs value=<threshold>, e.g. value=0.5 on normalised maps")
        return maps > float(value)
    if method == "percentile":
        if value is None:
            raise MedcamError("threshold method 'percentile' needs value=<percentile in [0, 100]>, e.g. value=90")
        t = percentile_threshold(maps, value, spatial_dims)
    elif method == "otsu":
        t = otsu_threshold(maps, spatial_dims)
    else:
        raise MedcamError(f"threshold method must be 'value', 'percentile' or 'otsu', got {method!r}")
    return maps > t.reshape(*t.shape, *([1] * spatial_dims))
