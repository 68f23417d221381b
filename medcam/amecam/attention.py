"""Attention aggregation of several activation maps (AME-CAM, Chen et al. MICCAI 2023), 2D and 3D.

Given ``K`` maps ``m_i`` of one image (upsampled to the image grid) the aggregator computes per-pixel (per-voxel)
weights ``a_i(u)`` with ``sum_i a_i(u) = 1`` (softmax over the ``K`` maps) and returns ``sum_i a_i(u) m_i(u)``.
The weights come from a small conv net whose input is the image masked by each min-max normalised map:
``norm(m_i) * x`` for every map ``i`` and image channel (``K * C`` input channels), followed by
four 3x3(x3) convolutions ``K*C -> 32 -> 32 -> 32 -> K`` (BatchNorm + ReLU after the first three) and a softmax over
the ``K`` output channels.

Implemented from the paper's description.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn as nn

from ..errors import MedcamError
from .contrastive import c2am_loss

__all__ = ["AttentionAggregator", "minmax_maps", "mean_aggregate"]

logger = logging.getLogger(__name__)


def minmax_maps(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Min-max normalise every map of ``maps`` ``[B, K, *S]`` over its spatial dims to [0, 1].

    A constant map becomes 0 everywhere. Differentiable.
    """
    if maps.ndim < 3:
        raise MedcamError(f"maps must be [B, K, *spatial], got shape {tuple(maps.shape)}")
    flat = maps.flatten(2)
    lo = flat.min(dim=2, keepdim=True).values
    hi = flat.max(dim=2, keepdim=True).values
    out = (flat - lo) / (hi - lo).clamp_min(eps)
    out = torch.where((hi - lo) > eps, out, torch.zeros_like(out))
    return out.reshape(maps.shape)


def mean_aggregate(maps: torch.Tensor) -> torch.Tensor:
    """Plain mean over the map axis: ``[B, K, *S] -> [B, 1, *S]`` (ME-CAM without attention)."""
    if maps.ndim < 3:
        raise MedcamError(f"maps must be [B, K, *spatial], got shape {tuple(maps.shape)}")
    return maps.mean(dim=1, keepdim=True)


class AttentionAggregator(nn.Module):
    """Per-pixel softmax attention over ``n_maps`` activation maps.

    Args:
        n_maps: number of maps ``K`` aggregated (4 exits in the paper).
        image_channels: channels ``C`` of the image the maps are multiplied with (1 = grey slice).
        spatial_dims: 2 (slices) or 3 (volumes).
        hidden: channels of the hidden conv layers (32 in the paper).
    """

    def __init__(self, n_maps: int = 4, image_channels: int = 1, spatial_dims: int = 2, hidden: int = 32):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise MedcamError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if n_maps < 1 or image_channels < 1 or hidden < 1:
            raise MedcamError("n_maps, image_channels and hidden must be >= 1")
        self.n_maps, self.image_channels = int(n_maps), int(image_channels)
        self.spatial_dims, self.hidden = int(spatial_dims), int(hidden)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        bn = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        cin = n_maps * image_channels
        layers: list[nn.Module] = []
        for c_in, c_out in ((cin, hidden), (hidden, hidden), (hidden, hidden)):
            layers += [conv(c_in, c_out, 3, padding=1), bn(c_out), nn.ReLU(inplace=True)]
        layers.append(conv(hidden, n_maps, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def config(self) -> dict:
        """Constructor arguments (saved with the weights)."""
        return dict(
            n_maps=self.n_maps, image_channels=self.image_channels, spatial_dims=self.spatial_dims, hidden=self.hidden
        )

    def _check(self, image: torch.Tensor, maps: torch.Tensor) -> None:
        nd = self.spatial_dims + 2
        if image.ndim != nd or maps.ndim != nd:
            raise MedcamError(
                f"{self.spatial_dims}D aggregator needs image [B, C, *S] and maps [B, K, *S] with {nd} dims, got "
                f"{tuple(image.shape)} and {tuple(maps.shape)}"
            )
        if maps.shape[1] != self.n_maps:
            raise MedcamError(f"aggregator was built for {self.n_maps} maps, got {maps.shape[1]}")
        if image.shape[1] != self.image_channels:
            raise MedcamError(f"aggregator was built for {self.image_channels} image channels, got {image.shape[1]}")
        if image.shape[0] != maps.shape[0] or image.shape[2:] != maps.shape[2:]:
            raise MedcamError(
                f"image {tuple(image.shape)} and maps {tuple(maps.shape)} differ in batch or spatial size: upsample "
                "the maps to the image grid first"
            )

    def weights(self, image: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """Attention weights ``[B, K, *S]`` (softmax over ``K``: they sum to 1 at every pixel).

        Args:
            image: ``[B, C, *S]``.
            maps: raw maps ``[B, K, *S]`` on the image grid.
        """
        self._check(image, maps)
        masked = minmax_maps(maps.float())[:, :, None] * image.float()[:, None]  # [B, K, C, *S]
        logits = self.net(masked.flatten(1, 2))
        return torch.softmax(logits, dim=1)

    def forward(self, image: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attentive map ``sum_i a_i m_i`` ``[B, 1, *S]`` and the weights ``a`` ``[B, K, *S]``."""
        a = self.weights(image, maps)
        return (a * maps.float()).sum(dim=1, keepdim=True), a


# ------------------------------------------------------------------------------------------- training / inference ---
def fit_attention(
    aggregator: AttentionAggregator,
    images: torch.Tensor,
    maps: torch.Tensor,
    embed: Callable[[torch.Tensor], torch.Tensor],
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 8,
    max_steps: int | None = None,
    generator: torch.Generator | None = None,
    attend: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> list[float]:
    """Train an aggregator with the C2AM-style contrastive loss (the maps and the encoder stay frozen).

    For every batch: ``M = minmax(sum_i a_i m_i)`` (per sample), ``f = x * M``, ``b = x * (1 - M)`` and
    ``L = SimMax(E(f)) + SimMin(E(f), E(b)) + SimMax(E(b))`` with the frozen encoder ``E = embed``. Only the
    aggregator's parameters receive gradients (``torch.autograd.grad``: the encoder's ``.grad`` is never touched).

    Args:
        aggregator: trained in place; left in eval mode.
        images: ``[N, C, *S]`` (on the aggregator's device or CPU).
        maps: raw maps ``[N, K, *S]`` on the image grid (precomputed, no grad).
        embed: frozen encoder, ``[n, C, *S] -> [n, D]``.
        batch_size: >= 2 for the SimMax terms to act (with 1 they are 0).
        attend: ``(x, maps) -> (attentive [n, 1, *S], weights)`` (default: ``aggregator`` itself).
    Returns:
        the loss of every step.
    """
    if images.shape[0] != maps.shape[0]:
        raise MedcamError(f"{images.shape[0]} images but {maps.shape[0]} map sets")
    if images.shape[0] < 2 or batch_size < 2:
        logger.warning("fit_attention: batches of one sample; the SimMax terms are 0 (only SimMin trains)")
    dev = next(aggregator.parameters()).device
    params = [p for p in aggregator.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    losses: list[float] = []
    aggregator.train()
    n = images.shape[0]
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch_size):
            if max_steps is not None and len(losses) >= max_steps:
                break
            idx = perm[s : s + batch_size]
            if len(idx) < 2 and n >= 2:  # a last batch of one would break BatchNorm statistics and SimMax
                continue
            x, m = images[idx].to(dev).float(), maps[idx].to(dev).float()
            att, _ = (attend or aggregator)(x, m)
            mask = minmax_maps(att)
            fg, bg = embed(x * mask), embed(x * (1.0 - mask))
            loss = c2am_loss(fg, bg)
            grads = torch.autograd.grad(loss, params)
            for p, gr in zip(params, grads):
                p.grad = gr
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        logger.info("attention epoch %d: last loss %.4f", ep, losses[-1] if losses else float("nan"))
    aggregator.eval()
    return losses


@torch.no_grad()
def region_logit_polarity(
    score: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    maps01: torch.Tensor,
    threshold: float = 0.5,
    batch_size: int = 32,
) -> tuple[int, dict]:
    """Decide from the data (no pixel labels) whether high map values mark the tumour (+1) or the opposite (-1).

    For each slice, ``R = maps01 > threshold``; the classifier's tumour logit of ``x * R`` is compared with that of
    ``x * (1 - R)``. If the region above the threshold carries the tumour evidence, ``score(x * R)`` is the larger.
    The majority vote over slices decides.

    Args:
        score: tumour logit, ``[n, C, H, W] -> [n]`` (or ``[n, 1]``).
        images: tumour slices ``[N, C, H, W]``.
        maps01: normalised maps ``[N, 1, H, W]`` in [0, 1].
    Returns:
        ``(polarity, evidence)`` with ``evidence = {"votes_for_map": int, "n": int, "mean_logit_inside": float,
        "mean_logit_outside": float}``.
    """
    ins, outs = [], []
    for s in range(0, images.shape[0], batch_size):
        x, m = images[s : s + batch_size], (maps01[s : s + batch_size] > threshold).to(images.dtype)
        ins.append(score(x * m).reshape(-1).float().cpu())
        outs.append(score(x * (1 - m)).reshape(-1).float().cpu())
    li, lo = torch.cat(ins), torch.cat(outs)
    votes = int((li > lo).sum())
    pol = 1 if votes * 2 >= len(li) else -1
    ev = {
        "votes_for_map": votes,
        "n": int(len(li)),
        "mean_logit_inside": float(li.mean()),
        "mean_logit_outside": float(lo.mean()),
    }
    logger.info("polarity %+d (%d of %d slices favour the map as is)", pol, votes, len(li))
    return pol, ev


def apply_polarity(maps01: torch.Tensor, polarity: int) -> torch.Tensor:
    """``maps01`` for polarity +1, ``1 - maps01`` for -1."""
    if polarity not in (1, -1):
        raise MedcamError(f"polarity must be +1 or -1, got {polarity}")
    return maps01 if polarity == 1 else 1.0 - maps01


__all__ += ["fit_attention", "region_logit_polarity", "apply_polarity"]
