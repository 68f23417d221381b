"""Mutual information from joint histograms, in torch: the estimator behind MI-CAM (:mod:`medcam.micam`).

Plug-in (maximum-likelihood) estimator on a joint histogram of ``bins x bins`` equal-width bins:

    I(A; X) = sum_{i,j} p_ij log(p_ij / (p_i. p_.j)),   p_ij = n_ij / sum n     (nats)

Counts may be fractional (weighted): with sliding windows each voxel of a window counts with its normalised blending
weight ``omega_w(u) / sum_w' omega_w'(u)``, so that a voxel covered by several windows counts once in total. Counts are
additive, hence a histogram built window by window equals the histogram built at once whenever the values agree.

Bin ranges are fixed before counting (``[lo, hi]`` per channel; a value equal to ``hi`` falls in the last bin, values
outside are clipped to the first/last bin; a constant channel, ``hi <= lo``, puts everything in bin 0 and so has zero
information).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "bin_index",
    "JointHistogram",
    "mutual_information",
    "entropies",
    "normalized_mutual_information",
    "dilate",
]


def bin_index(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """Equal-width bin of each value: ``floor((v - lo) / (hi - lo) * bins)`` clipped to ``[0, bins - 1]`` (int64).

    ``values`` ``[C, n]``; ``lo``/``hi`` ``[C]`` (broadcast over ``n``). Computed in float64.
    """
    v = values.double()
    lo_, hi_ = lo.double()[:, None], hi.double()[:, None]
    width = hi_ - lo_
    safe = torch.where(width > 0, width, torch.ones_like(width))
    idx = torch.floor((v - lo_) / safe * bins)
    idx = torch.where(width > 0, idx, torch.zeros_like(idx))
    return idx.clamp_(0, bins - 1).long()


class JointHistogram:
    """Weighted joint histograms of ``K`` activation channels against ``C`` image channels, accumulated in pieces.

    ``counts``: float64 ``[C, K, bins, bins]`` (activation bin first, image bin second).

    Args:
        act_range: ``(lo [K], hi [K])`` bin range of each activation channel.
        img_range: ``(lo [C], hi [C])`` bin range of each image channel.
        bins: bins per axis.
    """

    def __init__(
        self, act_range: tuple[torch.Tensor, torch.Tensor], img_range: tuple[torch.Tensor, torch.Tensor], bins: int
    ):
        if bins < 2:
            raise ValueError(f"bins must be >= 2, got {bins}")
        self.bins = bins
        self.act_lo, self.act_hi = act_range
        self.img_lo, self.img_hi = img_range
        k, c = self.act_lo.numel(), self.img_lo.numel()
        self.counts = torch.zeros((c, k, bins, bins), dtype=torch.float64, device=self.act_lo.device)

    def add(self, act: torch.Tensor, img: torch.Tensor, weight: torch.Tensor | None = None, channels=None) -> None:
        """Count positions: ``act`` ``[k, n]`` (activation channels ``channels``, default all), ``img`` ``[C, n]``,
        ``weight`` ``[n]`` (None: 1 each)."""
        if act.shape[1] == 0:
            return
        dev = self.counts.device
        ch = (
            torch.arange(self.act_lo.numel(), device=dev) if channels is None else torch.as_tensor(channels, device=dev)
        )
        ia = bin_index(act.to(dev), self.act_lo[ch], self.act_hi[ch], self.bins)  # [k, n]
        ix = bin_index(img.to(dev), self.img_lo, self.img_hi, self.bins)  # [C, n]
        w = None if weight is None else weight.to(dev).double().expand(ia.shape[0], -1).reshape(-1)
        b2 = self.bins * self.bins
        for c in range(ix.shape[0]):
            flat = (ia * self.bins + ix[c][None]).reshape(-1) + (
                torch.arange(ia.shape[0], device=dev) * b2
            ).repeat_interleave(ia.shape[1])
            h = torch.bincount(flat, weights=w, minlength=ia.shape[0] * b2).double()
            self.counts[c, ch] += h.reshape(ia.shape[0], self.bins, self.bins)


def _probabilities(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    total = counts.sum(dim=(-2, -1), keepdim=True)
    p = counts / torch.where(total > 0, total, torch.ones_like(total))
    return p, p.sum(-1, keepdim=True), p.sum(-2, keepdim=True), total[..., 0, 0]


def _plogp(p: torch.Tensor) -> torch.Tensor:
    return torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))


def mutual_information(counts: torch.Tensor) -> torch.Tensor:
    """Plug-in mutual information (nats) of joint histograms ``[..., Ba, Bx]`` -> ``[...]`` (0 for empty histograms)."""
    p, pa, px, _ = _probabilities(counts.double())
    denom = pa * px
    ratio = torch.where(p > 0, p / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.ones_like(p))
    return (p * torch.log(ratio)).sum(dim=(-2, -1)).clamp_min(0.0)


def entropies(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Marginal entropies ``(H(A), H(X))`` (nats) of joint histograms ``[..., Ba, Bx]``."""
    _, pa, px, _ = _probabilities(counts.double())
    return -_plogp(pa).sum(dim=(-2, -1)), -_plogp(px).sum(dim=(-2, -1))


def normalized_mutual_information(counts: torch.Tensor) -> torch.Tensor:
    """Symmetric normalised MI ``2 I / (H(A) + H(X))`` in ``[0, 1]`` (0 where both entropies are 0)."""
    mi = mutual_information(counts)
    ha, hx = entropies(counts)
    s = ha + hx
    return torch.where(s > 0, 2 * mi / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Chebyshev dilation of a boolean mask ``[B, *S]`` by ``radius`` voxels (a cube of side ``2 r + 1``).

    Separable: a 1D max filter along each spatial axis in turn (exact for a box structuring element).
    """
    if radius <= 0:
        return mask.bool()
    x = mask.float()
    for d in range(1, x.ndim):
        moved = x.movedim(d, -1)
        shape = moved.shape
        pooled = F.max_pool1d(moved.reshape(-1, 1, shape[-1]), 2 * radius + 1, stride=1, padding=radius)
        x = pooled.reshape(shape).movedim(-1, d)
    return x > 0
