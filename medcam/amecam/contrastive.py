"""Contrastive foreground/background losses of C2AM (Xie et al., CVPR 2022) as AME-CAM's authors use them.

Definition followed: the authors' public code (GitHub ``windstormer/AME-CAM``,
``src/attention_aggregation_network/loss.py`` and ``models.py``), read, not copied. With a map ``M`` (the attentive
map, **raw**, not normalised) and the grey image ``g`` (mean over the image channels), the embeddings are the
flattened masked pixels (no encoder):

    f_i = flatten(g_i * M_i),   b_i = flatten(g_i * (1 - M_i))            (:func:`pixel_embeddings`)

and the loss is ``L = SimMax(f) + SimMin(f, b) + SimMax(b)`` with, for the clamped cosine similarity
``s_ij = clamp(cos(e_i, e_j), 0.0005, 0.9995)``:

* ``SimMin(f, b) = mean over all N*M pairs (i, j) of -log(1 - cos(f_i, b_j))``;
* ``SimMax(e) = mean over all N^2 pairs (i, j), self pairs included, of w_ij * max(0, -log s_ij)``, with
  ``w_ij = exp(-0.25 * (rank_i(j) - 1))`` where ``rank_i(j)`` is the 0-based position of ``j`` when row ``i`` is sorted
  by decreasing ``s_ij`` (so the self pair, normally first, gets rank -1 and weight ``exp(0.25)``). Ties are ranked
  in index order (stable sort). The rank is a constant of the backward pass, as in the authors' code.

Because SimMax averages over ``N^2`` terms (``N`` of them self pairs with a constant loss ``-log 0.9995``), it is
weighed against SimMin as the authors weigh it.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..errors import MedcamError

__all__ = [
    "cosine_matrix",
    "sim_min_loss",
    "sim_max_loss",
    "c2am_loss",
    "nt_xent_loss",
    "pixel_embeddings",
    "grey",
    "COS_CLAMP",
]

logger = logging.getLogger(__name__)

COS_CLAMP = (0.0005, 0.9995)


def _check_emb(e: torch.Tensor, name: str) -> None:
    if e.ndim != 2:
        raise MedcamError(f"{name} embeddings must be [N, D], got shape {tuple(e.shape)}")
    if e.shape[0] < 1:
        raise MedcamError(f"{name} embeddings are empty")


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Clamped cosine similarity ``[N, M]`` between rows of ``a`` ``[N, D]`` and ``b`` ``[M, D]``.

    Rows are L2-normalised (``F.normalize``: a zero row stays zero, its cosine is 0, clamped to 0.0005).
    """
    _check_emb(a, "first")
    _check_emb(b, "second")
    if a.shape[1] != b.shape[1]:
        raise MedcamError(f"embedding sizes differ: {a.shape[1]} vs {b.shape[1]}")
    dt = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)  # float64 stays float64
    cos = F.normalize(a.to(dt), dim=1) @ F.normalize(b.to(dt), dim=1).T
    return cos.clamp(*COS_CLAMP)


def sim_min_loss(fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """``mean_{i,j} -log(1 - cos(fg_i, bg_j))`` over all ``N*M`` pairs; ``fg`` ``[N, D]``, ``bg`` ``[M, D]``; scalar."""
    return -torch.log(1.0 - cosine_matrix(fg, bg)).mean()


def sim_max_loss(emb: torch.Tensor, alpha: float = 0.25) -> torch.Tensor:
    """Rank-weighted ``-log cos`` averaged over all ``N^2`` pairs, self pairs included (the authors' reduction).

    Args:
        emb: embeddings ``[N, D]``.
        alpha: rank decay (0.25 in C2AM and AME-CAM).
    Returns:
        scalar tensor ``mean_{i,j} exp(-alpha (rank_i(j) - 1)) * max(0, -log s_ij)`` (see the module docstring).
    """
    _check_emb(emb, "SimMax")
    n = emb.shape[0]
    sim = cosine_matrix(emb, emb)
    loss = (-torch.log(sim)).clamp_min(0.0)
    order = torch.sort(sim.detach(), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=emb.device).expand(n, n).contiguous())
    w = torch.exp(-alpha * (rank - 1).to(loss.dtype))
    return (loss * w).mean()


def c2am_loss(fg: torch.Tensor, bg: torch.Tensor, alpha: float = 0.25) -> torch.Tensor:
    """``SimMax(fg) + SimMin(fg, bg) + SimMax(bg)`` for embeddings ``fg`` ``[N, D]`` and ``bg`` ``[N, D]``."""
    return sim_max_loss(fg, alpha) + sim_min_loss(fg, bg) + sim_max_loss(bg, alpha)


def grey(image: torch.Tensor) -> torch.Tensor:
    """Channel mean ``[B, C, *S] -> [B, 1, *S]`` (the authors' ``input_gray``)."""
    if image.ndim < 3:
        raise MedcamError(f"image must be [B, C, *spatial], got shape {tuple(image.shape)}")
    return image.float().mean(dim=1, keepdim=True)


def pixel_embeddings(image: torch.Tensor, attentive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' contrastive embeddings: flattened ``g * M`` and ``g * (1 - M)``.

    Args:
        image: ``[B, C, *S]`` (``g`` = channel mean).
        attentive: the raw attentive map ``M`` ``[B, 1, *S]`` (not normalised).
    Returns:
        ``(fg [B, prod(S)], bg [B, prod(S)])``.
    """
    g = grey(image)
    if attentive.shape[0] != g.shape[0] or attentive.shape[2:] != g.shape[2:] or attentive.shape[1] != 1:
        raise MedcamError(
            f"attentive map must be [B, 1, *S] for image {tuple(image.shape)}, got {tuple(attentive.shape)}"
        )
    m = attentive.float()
    return (g * m).flatten(1), (g * (1.0 - m)).flatten(1)


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
