"""MetaCAM-style consensus of several CAM methods (Kaczmarek et al. 2023, "MetaCAM: ensemble-based class activation
map"): each method votes for the voxels in its top-k %; voxels with at least ``min_votes`` votes form the consensus,
and the meta map is the mean of the min-max normalised maps restricted to the consensus.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import MedcamError
from .thresholds import _flat, check_maps, normalize_maps

__all__ = ["top_k_masks", "ConsensusResult", "consensus"]

logger = logging.getLogger(__name__)


def top_k_masks(maps: torch.Tensor, top_percent: float, spatial_dims: int = 3) -> torch.Tensor:
    """Boolean masks of the ``round(top_percent/100 * V)`` highest voxels of each map (ties by voxel index).

    Args:
        maps: ``[..., *S]``; top_percent in (0, 100].
    Returns:
        bool ``[..., *S]``.
    """
    check_maps(maps, spatial_dims)
    if not 0 < top_percent <= 100:
        raise MedcamError(f"top_percent must be in (0, 100], got {top_percent}")
    flat = _flat(maps.float(), spatial_dims)
    k = max(1, int(round(top_percent / 100.0 * flat.shape[1])))
    order = torch.argsort(-flat, dim=1, stable=True)[:, :k]
    out = torch.zeros_like(flat, dtype=torch.bool)
    out.scatter_(1, order, True)
    return out.reshape(maps.shape)


@dataclass
class ConsensusResult:
    """Attributes: ``votes`` ``[..., *S]`` number of methods voting each voxel (0..M); ``mask`` bool consensus
    (``votes >= min_votes``); ``meta_map`` float ``mean_m normalize(L_m) * mask``."""

    votes: torch.Tensor
    mask: torch.Tensor
    meta_map: torch.Tensor


def consensus(
    maps: torch.Tensor,
    top_percent: float = 10.0,
    min_votes: int | None = None,
    spatial_dims: int = 3,
) -> ConsensusResult:
    """Consensus of ``M`` methods' maps (dim 0): ``votes(u) = sum_m 1[u in top-k%(L_m)]``,
    ``mask = votes >= min_votes``, ``meta = (1/M) sum_m minmax(L_m) * mask``.

    Args:
        maps: ``[M, ..., *S]`` one map per method along dim 0.
        top_percent: k, the percentage of voxels each method votes for.
        min_votes: votes needed (default: a strict majority, ``M // 2 + 1``).
    Returns:
        :class:`ConsensusResult` with tensors ``[..., *S]``.
    """
    check_maps(maps, spatial_dims)
    if maps.ndim < spatial_dims + 1 or maps.shape[0] < 2:
        raise MedcamError(f"consensus needs maps [M >= 2, ..., *S] from several methods, got {tuple(maps.shape)}")
    m = maps.shape[0]
    if min_votes is None:
        min_votes = m // 2 + 1
    if not 1 <= min_votes <= m:
        raise MedcamError(f"min_votes must be in 1..{m}, got {min_votes}")
    votes = top_k_masks(maps, top_percent, spatial_dims).sum(0)
    mask = votes >= min_votes
    meta = normalize_maps(maps, "minmax", spatial_dims).mean(0) * mask
    return ConsensusResult(votes=votes, mask=mask, meta_map=meta)
