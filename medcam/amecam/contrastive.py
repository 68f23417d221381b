"""Contrastive foreground/background losses in the style of C2AM (Xie et al., CVPR 2022), as used by AME-CAM.

Given an activation map ``M`` in [0, 1] and an image ``x``, the foreground is ``f = x * M`` and the background
``b = x * (1 - M)``. An encoder (frozen; here the classifier's or the segmentation network's own encoder, global-average
pooled) embeds both; the loss pulls foregrounds together, backgrounds together, and pushes each foreground away from
each background:

    L = SimMax(f) + SimMin(f, b) + SimMax(b)

* cosine similarities are clamped to ``[0.0005, 0.9995]`` so that the logs stay finite;
* ``SimMin(f, b) = mean_{i,j} -log(1 - cos(f_i, b_j))`` over all foreground/background pairs of the batch;
* ``SimMax(e) = sum_{i != j} w_ij (-log cos(e_i, e_j)) / sum_{i != j} w_ij`` with ``w_ij = exp(-0.25 * rank_i(j))``,
  where ``rank_i(j)`` is 0 for the most similar *other* embedding of row ``i``, 1 for the next, ... . The self-pair is
  excluded (its cosine is 1 by construction). This is a weighted mean: the most similar pairs count most, so
  the loss does not force dissimilar outliers together.

Implemented from the papers' descriptions.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..errors import MedcamError

__all__ = ["cosine_matrix", "sim_min_loss", "sim_max_loss", "c2am_loss", "nt_xent_loss", "COS_CLAMP"]

logger = logging.getLogger(__name__)

COS_CLAMP = (0.0005, 0.9995)


def _check_emb(e: torch.Tensor, name: str) -> None:
    if e.ndim != 2:
        raise MedcamError(f"{name} embeddings must be [N, D], got shape {tuple(e.shape)}")
    if e.shape[0] < 1:
        raise MedcamError(f"{name} embeddings are empty")


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Clamped cosine similarity ``[N, M]`` between rows of ``a`` ``[N, D]`` and ``b`` ``[M, D]``."""
    _check_emb(a, "first")
    _check_emb(b, "second")
    if a.shape[1] != b.shape[1]:
        raise MedcamError(f"embedding sizes differ: {a.shape[1]} vs {b.shape[1]}")
    cos = F.normalize(a.float(), dim=1, eps=1e-8) @ F.normalize(b.float(), dim=1, eps=1e-8).T
    return cos.clamp(*COS_CLAMP)


def sim_min_loss(fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """``mean_{i,j} -log(1 - cos(fg_i, bg_j))``; ``fg`` ``[N, D]``, ``bg`` ``[M, D]``; scalar."""
    return -torch.log(1.0 - cosine_matrix(fg, bg)).mean()


def sim_max_loss(emb: torch.Tensor, alpha: float = 0.25) -> torch.Tensor:
    """Rank-weighted mean of ``-log cos(e_i, e_j)`` over pairs ``i != j`` (weights ``exp(-alpha * rank)``).

    Args:
        emb: embeddings ``[N, D]``; with ``N = 1`` there is no pair and the loss is 0.
    Returns:
        scalar tensor.
    """
    _check_emb(emb, "SimMax")
    n = emb.shape[0]
    if n < 2:
        return emb.sum() * 0.0
    cos = cosine_matrix(emb, emb)
    off = ~torch.eye(n, dtype=torch.bool, device=emb.device)
    cos_off = cos[off].reshape(n, n - 1)
    # rank within each row: 0 = most similar other embedding
    order = torch.argsort(cos_off.detach(), dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n - 1, device=emb.device).expand(n, n - 1).contiguous())
    w = torch.exp(-alpha * rank.float())
    return (w * -torch.log(cos_off)).sum() / w.sum()


def c2am_loss(fg: torch.Tensor, bg: torch.Tensor, alpha: float = 0.25) -> torch.Tensor:
    """``SimMax(fg) + SimMin(fg, bg) + SimMax(bg)`` for embeddings ``fg`` ``[N, D]`` and ``bg`` ``[N, D]``."""
    return sim_max_loss(fg, alpha) + sim_min_loss(fg, bg) + sim_max_loss(bg, alpha)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR NT-Xent loss between two views ``z1``, ``z2`` ``[N, D]`` (positives: same row); scalar."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise MedcamError(f"views must both be [N, D], got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)
