"""Attention aggregation of several activation maps (AME-CAM, Chen et al. MICCAI 2023), 2D and 3D.

Definition followed: the authors' public code (``windstormer/AME-CAM``, ``Res_Scoring`` in
``src/attention_aggregation_network/models.py``, its training in ``cnet.py``), read, not copied. Given ``K`` raw maps
``m_k`` of one image on the image grid and the grey image ``g`` (mean over the image channels):

* input of the attention net: ``g * normalize(m_k)`` for every map (``K`` channels), with the authors' per-map
  normalisation ``(m - min + 1e-5) / (max - min + 1e-5)`` (:func:`authors_normalize`);
* net: three ``3x3(x3)`` convolutions ``K -> h -> h -> h`` without bias, each followed by BatchNorm and ReLU, then a
  ``h -> K`` convolution without bias, BatchNorm and ReLU; a softmax over the ``K`` channels gives the per-pixel weights
  ``a_k`` (they sum to 1);
* the attentive ("final") map is ``sum_k a_k * m_k`` on the **raw** maps;
* the returned AME-CAM is the mean of the ``K`` raw maps and the final map (:func:`ame_cam_from_maps`).

Training (:func:`fit_attention`): the classifier is frozen; the loss is the C2AM loss of :mod:`.contrastive` on the
pixel embeddings ``g * M`` / ``g * (1 - M)`` of the raw final map ``M``; Adam (lr 1e-4, weight decay 1e-5) with a
cosine schedule over the epochs (``eta_min`` 5e-6), on all training slices (tumour and normal).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import MedcamError
from ..normalize import normalize
from .contrastive import c2am_loss, grey, pixel_embeddings

__all__ = [
    "AttentionAggregator",
    "minmax_maps",
    "mean_aggregate",
    "authors_normalize",
    "ame_cam_from_maps",
    "contrastive_embeddings",
]

logger = logging.getLogger(__name__)


def minmax_maps(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Min-max normalise every map of ``maps`` ``[B, K, *S]`` over its spatial dims to [0, 1].

    A map whose range is <= ``eps`` becomes 0 everywhere. Differentiable. :func:`medcam.normalize` with eps 1e-8.
    """
    return normalize(maps, "minmax", eps)


def mean_aggregate(maps: torch.Tensor) -> torch.Tensor:
    """Plain mean over the map axis: ``[B, K, *S] -> [B, 1, *S]`` (ME-CAM without attention)."""
    if maps.ndim < 3:
        raise MedcamError(f"maps must be [B, K, *spatial], got shape {tuple(maps.shape)}")
    return maps.mean(dim=1, keepdim=True)


def authors_normalize(maps: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The authors' per-map normalisation ``(m - min + eps) / (max - min + eps)`` over the spatial dims.

    ``maps`` ``[B, K, *S]`` -> same shape; a constant map becomes 1 everywhere (as in their code). Differentiable.
    :func:`medcam.normalize` with ``offset=eps`` (the formula gives exactly 1 on a constant map: ``eps / eps``).
    """
    return normalize(maps, "minmax", 0.0, offset=eps, constant="one")


def ame_cam_from_maps(maps: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """AME-CAM as the authors return it: mean of the ``K`` raw maps ``[B, K, *S]`` and the final map ``[B, 1, *S]``."""
    if final.shape[1] != 1 or final.shape[0] != maps.shape[0] or final.shape[2:] != maps.shape[2:]:
        raise MedcamError(f"final map must be [B, 1, *S] for maps {tuple(maps.shape)}, got {tuple(final.shape)}")
    return torch.cat([maps.float(), final.float()], dim=1).mean(dim=1, keepdim=True)


class AttentionAggregator(nn.Module):
    """Per-pixel softmax attention over ``n_maps`` activation maps (the authors' ``Res_Scoring``, 2D or 3D).

    Args:
        n_maps: number of maps ``K`` aggregated (4 exits in the paper).
        spatial_dims: 2 (slices) or 3 (volumes).
        hidden: channels of the hidden conv layers (32 in the authors' code).
        image_channels: accepted for backward compatibility of saved configs; the image is always reduced to its
            channel mean (grey), so any channel count works.
    """

    def __init__(self, n_maps: int = 4, spatial_dims: int = 2, hidden: int = 32, image_channels: int | None = None):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise MedcamError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if n_maps < 1 or hidden < 1:
            raise MedcamError("n_maps and hidden must be >= 1")
        self.n_maps, self.spatial_dims, self.hidden = int(n_maps), int(spatial_dims), int(hidden)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        bn = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        layers: list[nn.Module] = []
        for c_in, c_out in ((n_maps, hidden), (hidden, hidden), (hidden, hidden), (hidden, n_maps)):
            layers += [conv(c_in, c_out, 3, padding=1, bias=False), bn(c_out), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def config(self) -> dict:
        """Constructor arguments (saved with the weights)."""
        return dict(n_maps=self.n_maps, spatial_dims=self.spatial_dims, hidden=self.hidden)

    def _check(self, image: torch.Tensor, maps: torch.Tensor) -> None:
        nd = self.spatial_dims + 2
        if image.ndim != nd or maps.ndim != nd:
            raise MedcamError(
                f"{self.spatial_dims}D aggregator needs image [B, C, *S] and maps [B, K, *S] with {nd} dims, got "
                f"{tuple(image.shape)} and {tuple(maps.shape)}"
            )
        if maps.shape[1] != self.n_maps:
            raise MedcamError(f"aggregator was built for {self.n_maps} maps, got {maps.shape[1]}")
        if image.shape[0] != maps.shape[0] or image.shape[2:] != maps.shape[2:]:
            raise MedcamError(
                f"image {tuple(image.shape)} and maps {tuple(maps.shape)} differ in batch or spatial size: upsample "
                "the maps to the image grid first"
            )

    def weights(self, image: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """Attention weights ``[B, K, *S]`` (softmax over ``K``: they sum to 1 at every pixel).

        Args:
            image: ``[B, C, *S]`` (reduced to its channel mean).
            maps: raw maps ``[B, K, *S]`` on the image grid.
        """
        self._check(image, maps)
        masked = grey(image) * authors_normalize(maps.float())  # [B, K, *S]
        return torch.softmax(self.net(masked), dim=1)

    def forward(self, image: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final map ``sum_k a_k m_k`` on the raw maps ``[B, 1, *S]`` and the weights ``a`` ``[B, K, *S]``."""
        a = self.weights(image, maps)
        return (a * maps.float()).sum(dim=1, keepdim=True), a


# ------------------------------------------------------------------------------------------- training / inference ---
Embedding = Literal["pixels"] | Callable[[torch.Tensor], torch.Tensor]


def contrastive_embeddings(
    embedding: Embedding, image: torch.Tensor, final: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground / background embeddings ``[n, D]`` of a batch for the C2AM loss.

    ``"pixels"`` (the authors'): flattened ``g * M`` and ``g * (1 - M)`` with the raw final map ``M``. A callable
    ``E`` (feature-space ablation): ``E(x * minmax(M))`` and ``E(x * (1 - minmax(M)))`` on the full image ``x``.
    """
    if isinstance(embedding, str):
        if embedding != "pixels":
            raise MedcamError(f"embedding must be 'pixels' or a callable encoder, got {embedding!r}")
        return pixel_embeddings(image, final)
    m = minmax_maps(final)
    return embedding(image * m), embedding(image * (1.0 - m))


def fit_attention(
    aggregator: AttentionAggregator,
    images: torch.Tensor,
    maps: torch.Tensor,
    embed: Embedding = "pixels",
    epochs: int = 10,
    lr: float = 1e-4,
    weight_decay: float = 1e-5,
    batch_size: int = 8,
    max_steps: int | None = None,
    generator: torch.Generator | None = None,
    attend: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    cosine: bool = True,
    progress: bool = False,
) -> list[float]:
    """Train an aggregator with the C2AM loss (the maps and any encoder stay frozen), as the authors do.

    For every batch: final map ``M = sum_k a_k m_k`` (raw), embeddings from :func:`contrastive_embeddings`, loss
    ``SimMax(f) + SimMin(f, b) + SimMax(b)``. Adam (``lr``, ``weight_decay``), cosine annealing of the learning rate
    over ``epochs`` down to 5e-6 (authors' settings: lr 1e-4, weight decay 1e-5). Only the aggregator's parameters
    receive gradients (``torch.autograd.grad``: an encoder's ``.grad`` is never touched).

    Args:
        aggregator: trained in place; left in eval mode.
        images: ``[N, C, *S]`` (on the aggregator's device or CPU); all training images, tumour and normal.
        maps: raw maps ``[N, K, *S]`` on the image grid (precomputed, no grad).
        embed: ``"pixels"`` (default, the authors') or a frozen encoder ``[n, C, *S] -> [n, D]``.
        batch_size: >= 2 for the SimMax terms to compare samples.
        attend: ``(x, maps) -> (final [n, 1, *S], weights)`` (default: ``aggregator`` itself).
        progress: show a tqdm bar over epochs.
    Returns:
        the loss of every step.
    """
    if images.shape[0] != maps.shape[0]:
        raise MedcamError(f"{images.shape[0]} images but {maps.shape[0]} map sets")
    if images.shape[0] < 2 or batch_size < 2:
        logger.warning("fit_attention: batches of one sample; SimMax only sees self pairs")
    dev = next(aggregator.parameters()).device
    params = [p for p in aggregator.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs), eta_min=min(5e-6, lr)) if cosine else None
    )
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    losses: list[float] = []
    aggregator.train()
    n = images.shape[0]
    for ep in tqdm(range(epochs), desc="AME-CAM attention", disable=not progress):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch_size):
            if max_steps is not None and len(losses) >= max_steps:
                break
            idx = perm[s : s + batch_size]
            if len(idx) < 2 and n >= 2:  # a last batch of one would break BatchNorm statistics
                continue
            x, m = images[idx].to(dev).float(), maps[idx].to(dev).float()
            final, _ = (attend or aggregator)(x, m)
            fg, bg = contrastive_embeddings(embed, x, final)
            loss = c2am_loss(fg, bg)
            grads = torch.autograd.grad(loss, params)
            for p, gr in zip(params, grads):
                p.grad = gr
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        if sched is not None:
            sched.step()
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
