"""Localisation of CAMs against a reference mask G (torch, batched).

Shapes: ``maps`` ``[..., *S]`` (``spatial_dims`` trailing dims, e.g. ``[B, K, D, H, W]``); ``masks`` broadcastable to
``maps`` (e.g. ``[B, 1, D, H, W]``); results have the leading shape (``[B, K]``). Distances are in mm, from the voxel
``spacing`` (one value per spatial dim, default 1 mm).

Empty-set conventions (explicit, also in each docstring):
- Dice / IoU: both sets empty -> 1; exactly one empty -> 0.
- HD95: both empty -> 0 mm; exactly one empty -> ``empty_value`` (default the volume diagonal in mm, the AME-CAM
  convention: 373.13 mm for 240 x 240 x 155 at 1 mm).

HD95 conventions (``hd95_convention=``, named in every output: ``hd95_monai_mm`` / ``hd95_pooled_mm``):
- ``"monai"`` (default): ``max(P95 of d(dP -> dG), P95 of d(dG -> dP))``, the larger of the two directed 95th
  percentiles (MONAI ``compute_hausdorff_distance(percentile=95)``).
- ``"pooled"``: the 95th percentile of both directed distance sets pooled together (medpy
  ``medpy.metric.binary.hd95``, used by most BraTS / WSSS papers); at most ``"monai"``'s value (a quantile of a pooled set lies
  between the sets' quantiles).
- Pointing games: empty reference mask -> NaN (the case is undefined; drop it when averaging, ``torch.nanmean``);
  energy pointing game of an all-zero map -> NaN; pointing game of a constant map -> 0 (no maximum to point with).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from ..errors import MedcamError
from .thresholds import ThresholdMethod, _flat, _lead, check_maps, normalize_maps, threshold_maps

__all__ = [
    "energy_pointing_game",
    "pointing_game",
    "dice_score",
    "iou_score",
    "hausdorff95",
    "HD95_CONVENTIONS",
    "hd95_key",
    "volume_diagonal_mm",
    "localisation_scores",
    "threshold_sweep",
]

logger = logging.getLogger(__name__)

HD95Convention = Literal["monai", "pooled"]
HD95_CONVENTIONS = ("monai", "pooled")


def hd95_key(convention: str) -> str:
    """The name of the HD95 column/metric for a convention: ``hd95_monai_mm`` or ``hd95_pooled_mm``."""
    _check_convention(convention)
    return f"hd95_{convention}_mm"


def _check_convention(convention: str) -> None:
    if convention not in HD95_CONVENTIONS:
        raise MedcamError(f"hd95_convention must be 'monai' or 'pooled', got {convention!r}")


def _spacing(spacing: float | Sequence[float] | None, spatial_dims: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * spatial_dims
    if isinstance(spacing, (int, float)):
        sp = (float(spacing),) * spatial_dims
    else:
        sp = tuple(float(s) for s in spacing)
    if len(sp) != spatial_dims or any(not (s > 0 and math.isfinite(s)) for s in sp):
        raise MedcamError(f"spacing must be {spatial_dims} positive finite values in mm, got {spacing!r}")
    return sp


def _pair(maps: torch.Tensor, masks: torch.Tensor, spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_maps(maps, spatial_dims)
    if not isinstance(masks, torch.Tensor):
        masks = torch.as_tensor(np.asarray(masks))
    masks = masks.to(maps.device)
    if tuple(masks.shape[masks.ndim - spatial_dims :]) != tuple(maps.shape[maps.ndim - spatial_dims :]):
        raise MedcamError(
            f"mask spatial shape {tuple(masks.shape)[-spatial_dims:]} differs from the map's "
            f"{tuple(maps.shape)[-spatial_dims:]}: resample the mask (nearest) or the maps to one grid"
        )
    try:
        maps_b, masks_b = torch.broadcast_tensors(maps, masks)
    except RuntimeError as e:
        raise MedcamError(
            f"mask shape {tuple(masks.shape)} does not broadcast to maps {tuple(maps.shape)}: use e.g. [B, 1, *S]"
        ) from e
    return maps_b, masks_b


def energy_pointing_game(maps: torch.Tensor, masks: torch.Tensor, spatial_dims: int = 3) -> torch.Tensor:
    """Energy-based pointing game (Wang et al. 2020, Score-CAM): ``E = sum_{u in G} L(u) / sum_u L(u)``.

    Args:
        maps: ``[..., *S]`` non-negative maps ``L`` (apply ReLU first).
        masks: reference ``G``, bool/0-1, broadcastable to ``maps``. Non-binary masks act as weights.
    Returns:
        ``[...]`` float in [0, 1]; NaN where ``G`` is empty or ``L`` is all zero.
    """
    maps, masks = _pair(maps, masks, spatial_dims)
    if (maps < 0).any():
        raise MedcamError("energy_pointing_game needs non-negative maps: apply ReLU (maps.clamp_min(0)) first")
    lf = _flat(maps.float(), spatial_dims)
    gf = _flat(masks.float(), spatial_dims)
    tot = lf.sum(1)
    inside = (lf * gf).sum(1)
    out = torch.where(tot > 0, inside / torch.where(tot > 0, tot, torch.ones_like(tot)), torch.full_like(tot, math.nan))
    out = torch.where(gf.sum(1) > 0, out, torch.full_like(out, math.nan))
    return out.reshape(_lead(maps, spatial_dims))


def _distance_to_mask_mm(mask: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(~mask, sampling=spacing)


def pointing_game(
    maps: torch.Tensor,
    masks: torch.Tensor,
    tolerance_mm: float = 0.0,
    spacing: float | Sequence[float] | None = None,
    spatial_dims: int = 3,
) -> torch.Tensor:
    """Pointing game (Zhang et al. 2016): a hit if the map's maximum lies in ``G`` or within ``tolerance_mm`` of it.

    ``hit = 1`` if some voxel ``u* in argmax L`` has ``dist_mm(u*, G) <= tolerance_mm``, else 0. Distances are
    Euclidean in mm between voxel centres (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``, CPU,
    only computed when ``tolerance_mm > 0``).

    Args:
        maps: ``[..., *S]``.
        masks: ``G`` broadcastable to ``maps`` (bool / 0-1).
        tolerance_mm: tolerance in mm (Zhang et al. use 15 px in 2D).
        spacing: voxel spacing in mm, one per spatial dim.
    Returns:
        ``[...]`` float 1.0 / 0.0; NaN where ``G`` is empty; 0 for a constant map.
    """
    if tolerance_mm < 0:
        raise MedcamError(f"tolerance_mm must be >= 0, got {tolerance_mm}")
    sp = _spacing(spacing, spatial_dims)
    maps, masks = _pair(maps, masks, spatial_dims)
    lf = _flat(maps.float(), spatial_dims)
    gf = _flat(masks, spatial_dims) > 0
    mx = lf.max(1, keepdim=True).values
    is_max = (lf == mx) & (lf.min(1, keepdim=True).values < mx)
    if tolerance_mm == 0:
        hit = (is_max & gf).any(1).float()
    else:
        spatial = tuple(maps.shape[maps.ndim - spatial_dims :])
        g_np = gf.cpu().numpy()
        hit_list = []
        for r in range(g_np.shape[0]):
            if not g_np[r].any():
                hit_list.append(0.0)
                continue
            d = torch.from_numpy(_distance_to_mask_mm(g_np[r].reshape(spatial), sp).ravel()).to(maps.device)
            hit_list.append(float((is_max[r] & (d <= tolerance_mm + 1e-9)).any()))
        hit = torch.tensor(hit_list, device=maps.device, dtype=torch.float32)
    hit = torch.where(gf.any(1), hit, torch.full_like(hit, math.nan))
    return hit.reshape(_lead(maps, spatial_dims))


def _overlap(
    pred: torch.Tensor, ref: torch.Tensor, spatial_dims: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """``(|P n G|, |P|, |G|)`` per map (float64 ``[M]``) and the leading shape of the maps."""
    pred, ref = _pair(pred, ref, spatial_dims)
    p = _flat(pred, spatial_dims) > 0
    g = _flat(ref, spatial_dims) > 0
    inter = (p & g).sum(1).double()
    return inter, p.sum(1).double(), g.sum(1).double(), _lead(pred, spatial_dims)


def dice_score(pred: torch.Tensor, ref: torch.Tensor, spatial_dims: int = 3) -> torch.Tensor:
    """Dice ``2 |P n G| / (|P| + |G|)``; both empty -> 1, one empty -> 0.

    Args:
        pred: binary ``[..., *S]`` (e.g. thresholded maps); ref: binary, broadcastable.
    Returns:
        ``[...]`` float32.
    """
    inter, sp, sg, lead = _overlap(pred, ref, spatial_dims)
    den = sp + sg
    d = torch.where(den > 0, 2 * inter / den.clamp_min(1), torch.ones_like(den))
    return d.float().reshape(lead)


def iou_score(pred: torch.Tensor, ref: torch.Tensor, spatial_dims: int = 3) -> torch.Tensor:
    """IoU (Jaccard) ``|P n G| / |P u G|``; both empty -> 1, one empty -> 0.

    Args:
        pred: binary ``[..., *S]``; ref: binary, broadcastable.
    Returns:
        ``[...]`` float32.
    """
    inter, sp, sg, lead = _overlap(pred, ref, spatial_dims)
    union = sp + sg - inter
    j = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return j.float().reshape(lead)


def volume_diagonal_mm(shape: Sequence[int], spacing: float | Sequence[float] | None = None) -> float:
    """Diagonal of a volume in mm, ``sqrt(sum_i (n_i s_i)^2)`` (373.13 for 240 x 240 x 155 at 1 mm)."""
    sp = _spacing(spacing, len(shape))
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, sp))))


def hausdorff95(
    pred: torch.Tensor,
    ref: torch.Tensor,
    spacing: float | Sequence[float] | None = None,
    empty_value: float | None = None,
    spatial_dims: int = 3,
    convention: HD95Convention = "monai",
) -> torch.Tensor:
    """95th-percentile symmetric Hausdorff distance in mm, MONAI's or medpy's convention.

    Surfaces ``dP``, ``dG`` are the boundary voxels (a voxel of the set with a face neighbour outside it, MONAI's
    ``get_mask_edges``), distances Euclidean between voxel centres with voxel ``spacing``.
    ``convention="monai"``: ``HD95 = max(P95_{p in dP} d(p, dG), P95_{g in dG} d(g, dP))`` (MONAI
    ``compute_hausdorff_distance(percentile=95)``); ``"pooled"``: ``P95`` of the union of both directed distance
    sets (medpy ``hd95``). Percentiles interpolate linearly (``torch.quantile``, as ``numpy.percentile``).
    Both empty -> 0; exactly one empty -> ``empty_value`` (default :func:`volume_diagonal_mm` of the grid,
    AME-CAM's convention).

    Args:
        pred, ref: binary ``[..., *S]``, broadcastable.
        spacing: voxel spacing in mm.
        empty_value: value in mm when exactly one set is empty.
        convention: ``"monai"`` or ``"pooled"``.
    Returns:
        ``[...]`` float32 in mm, on ``pred``'s device.
    """
    from monai.metrics import compute_hausdorff_distance

    _check_convention(convention)
    sp = _spacing(spacing, spatial_dims)
    pred, ref = _pair(pred, ref, spatial_dims)
    spatial = tuple(pred.shape[pred.ndim - spatial_dims :])
    if empty_value is None:
        empty_value = volume_diagonal_mm(spatial, sp)
    p = (pred > 0).reshape(-1, 1, *spatial)
    g = (ref > 0).reshape(-1, 1, *spatial)
    np_ = p.flatten(1).any(1)
    ng = g.flatten(1).any(1)
    out = torch.where(
        np_ | ng,
        torch.full(np_.shape, float(empty_value), device=pred.device),
        torch.zeros(np_.shape, device=pred.device),
    )
    both = np_ & ng
    if both.any() and convention == "monai":
        hd = compute_hausdorff_distance(
            p[both].float(), g[both].float(), include_background=True, percentile=95, spacing=list(sp)
        )
        out[both] = hd.reshape(-1).to(out.device, torch.float32)
    elif both.any():
        from monai.metrics.utils import get_edge_surface_distance

        for r in torch.nonzero(both).reshape(-1).tolist():
            _, dists, _ = get_edge_surface_distance(
                p[r, 0].float(), g[r, 0].float(), distance_metric="euclidean", spacing=list(sp), symmetric=True
            )
            pooled = torch.cat([d.reshape(-1).double() for d in dists])
            out[r] = torch.quantile(pooled, 0.95).to(out.device, torch.float32)
    return out.reshape(_lead(pred, spatial_dims))


def localisation_scores(
    maps: torch.Tensor,
    masks: torch.Tensor,
    method: ThresholdMethod = "otsu",
    value: float | None = None,
    normalize: Literal["minmax", "max"] | None = "minmax",
    spacing: float | Sequence[float] | None = None,
    tolerance_mm: float = 0.0,
    hd95: bool = True,
    spatial_dims: int = 3,
    hd95_convention: HD95Convention = "monai",
) -> dict[str, torch.Tensor]:
    """All localisation metrics of maps against ``G``: energy pointing game, pointing game, and Dice / IoU / HD95
    of ``threshold_maps(normalize_maps(maps), method, value)`` against ``G``.

    Returns:
        dict of ``[...]`` tensors: ``energy_pointing_game``, ``pointing_game``, ``dice``, ``iou``, the HD95 in mm
        under the key :func:`hd95_key` of ``hd95_convention`` (``hd95_monai_mm`` or ``hd95_pooled_mm``; if
        ``hd95``), ``threshold_fraction`` (fraction of voxels kept).
    """
    _check_convention(hd95_convention)
    maps, masks = _pair(maps, masks, spatial_dims)
    norm = normalize_maps(maps, normalize, spatial_dims)
    binm = threshold_maps(norm, method, value, spatial_dims)
    out = {
        "energy_pointing_game": energy_pointing_game(maps.clamp_min(0), masks, spatial_dims),
        "pointing_game": pointing_game(maps, masks, tolerance_mm, spacing, spatial_dims),
        "dice": dice_score(binm, masks, spatial_dims),
        "iou": iou_score(binm, masks, spatial_dims),
        "threshold_fraction": _flat(binm, spatial_dims).float().mean(1).reshape(_lead(maps, spatial_dims)),
    }
    if hd95:
        out[hd95_key(hd95_convention)] = hausdorff95(
            binm, masks, spacing, spatial_dims=spatial_dims, convention=hd95_convention
        )
    return out


def threshold_sweep(
    maps: torch.Tensor,
    masks: torch.Tensor,
    thresholds: Sequence[float] | torch.Tensor | None = None,
    normalize: Literal["minmax", "max"] | None = "minmax",
    spacing: float | Sequence[float] | None = None,
    hd95: bool = False,
    spatial_dims: int = 3,
    hd95_convention: HD95Convention = "monai",
) -> dict[str, torch.Tensor]:
    """Dice / IoU (and optionally HD95) of ``normalize_maps(maps) > t`` against ``G`` for each fixed ``t``.

    Args:
        thresholds: values in the normalised map's range (default ``0.0, 0.05, ..., 0.95``).
    Returns:
        dict: ``thresholds`` ``[T]``, ``dice`` / ``iou`` / HD95 (key :func:`hd95_key` of ``hd95_convention``)
        ``[T, ...]``.
    """
    maps, masks = _pair(maps, masks, spatial_dims)
    if thresholds is None:
        thresholds = torch.arange(20, dtype=torch.float32) * 0.05
    t = torch.as_tensor(thresholds, dtype=torch.float32).reshape(-1)
    if t.numel() == 0:
        raise MedcamError("threshold_sweep needs at least one threshold")
    norm = normalize_maps(maps, normalize, spatial_dims)
    hkey = hd95_key(hd95_convention)
    res: dict[str, list[torch.Tensor]] = {"dice": [], "iou": [], hkey: []}
    for tv in t.tolist():
        b = norm > tv
        res["dice"].append(dice_score(b, masks, spatial_dims))
        res["iou"].append(iou_score(b, masks, spatial_dims))
        if hd95:
            res[hkey].append(hausdorff95(b, masks, spacing, spatial_dims=spatial_dims, convention=hd95_convention))
    out = {"thresholds": t.to(maps.device)}
    for k, v in res.items():
        if v:
            out[k] = torch.stack(v)
    return out
