"""Robustness of CAMs to input noise: consistency and responsiveness.

For each noise strength ``sigma`` and repeat, the image is corrupted (Gaussian: ``x + sigma_c n``; Rician:
``sqrt((x + sigma_c n_1)^2 + (sigma_c n_2)^2)``, the magnitude-MRI noise model, Gudbjartsson & Patz 1995), with
``sigma_c = sigma * mu_c`` relative to the mean intensity ``mu_c`` of channel ``c`` over its non-zero voxels (the
foreground signal level, so ``sigma = 1 / SNR``; MRI background is 0), or absolute (``relative=False``). The map and the segmentation are recomputed; with ``d = Dice(seg(x), seg(x'))``:

- consistency = mean similarity of the maps over the perturbations with ``d >= tau`` (the model's output barely
  changed, so the explanation should not either; higher is better);
- responsiveness = mean (1 - similarity) over the perturbations with ``d < tau`` (the output changed, so the
  explanation should too; higher is better).

A side with no perturbation is NaN. Similarity: Spearman (default), Pearson or SSIM (:mod:`medcam.metrics.sanity`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import MedcamError
from .sanity import Similarity, map_similarity

__all__ = ["add_noise", "RobustnessResult", "robustness"]

logger = logging.getLogger(__name__)


def _channel_level(image: torch.Tensor) -> torch.Tensor:
    """``[B, Cin, *S] -> [Cin]`` mean of ``|x|`` over the non-zero voxels of each channel (0 for an all-zero one)."""
    a = image.float().abs().transpose(0, 1).reshape(image.shape[1], -1)
    cnt = (a > 0).sum(1).clamp_min(1)
    return a.sum(1) / cnt


def add_noise(
    image: torch.Tensor,
    sigma: float,
    kind: Literal["gaussian", "rician"] = "gaussian",
    relative: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Corrupt ``image`` ``[B, Cin, *S]`` with Gaussian or Rician noise of strength ``sigma`` (see module docstring).

    Noise is drawn on the CPU from ``generator`` (reproducible on any device) and moved to ``image.device``.
    """
    if image.ndim < 3:
        raise MedcamError(f"image must be [B, Cin, *S], got {tuple(image.shape)}")
    if sigma < 0:
        raise MedcamError(f"noise sigma must be >= 0, got {sigma}")
    if kind not in ("gaussian", "rician"):
        raise MedcamError(f"noise kind must be 'gaussian' or 'rician', got {kind!r}")
    s = _channel_level(image) * sigma if relative else torch.full((image.shape[1],), float(sigma), device=image.device)
    s = s.reshape(1, -1, *([1] * (image.ndim - 2))).to(image.device)
    n1 = torch.randn(image.shape, generator=generator).to(image.device)
    x = image.float()
    if kind == "gaussian":
        return x + s * n1
    n2 = torch.randn(image.shape, generator=generator).to(image.device)
    return torch.sqrt((x + s * n1) ** 2 + (s * n2) ** 2)


@dataclass
class RobustnessResult:
    """Per-perturbation records and the two summary scores.

    Attributes:
        records: one dict per (sigma, repeat): ``sigma``, ``repeat``, ``dice`` (segmentation agreement),
            ``similarity`` (map similarity with the clean map), ``stable`` (dice >= tau).
        consistency, responsiveness: see the module docstring (NaN when no perturbation falls on that side).
        per_sigma: sigma -> dict with the same two scores and the mean dice for that strength.
    """

    records: list[dict]
    consistency: float
    responsiveness: float
    per_sigma: dict[float, dict[str, float]]


def _dice_all(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool().flatten(), b.bool().flatten().to(a.device)
    s = int(a.sum() + b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def _mean(v: list[float]) -> float:
    v = [x for x in v if not math.isnan(x)]
    return float(sum(v) / len(v)) if v else math.nan


def robustness(
    image: torch.Tensor,
    map_fn: Callable[[torch.Tensor], torch.Tensor],
    seg_fn: Callable[[torch.Tensor], torch.Tensor],
    sigmas: Sequence[float] = (0.02, 0.05, 0.1, 0.2),
    kind: Literal["gaussian", "rician"] = "gaussian",
    repeats: int = 2,
    tau: float = 0.9,
    similarity: Similarity = "spearman",
    relative: bool = True,
    seed: int = 0,
    spatial_dims: int = 3,
) -> RobustnessResult:
    """Consistency and responsiveness of maps under input noise (see the module docstring for the formulas).

    Args:
        image: ``[B, Cin, *S]``.
        map_fn: ``image -> maps [..., *S]`` (e.g. ``lambda x: cam(x, targets)``).
        seg_fn: ``image -> bool mask`` (any shape; compared by Dice over all its elements).
        sigmas: noise strengths (fractions of the channel std if ``relative``).
        kind: ``"gaussian"`` or ``"rician"``.
        repeats: noise draws per strength.
        tau: Dice threshold separating "barely changed" from "changed" segmentations.
        similarity: ``"spearman"``, ``"pearson"`` or ``"ssim"``; averaged over the maps' leading dims.
    Returns:
        :class:`RobustnessResult`.
    """
    if not 0.0 <= tau <= 1.0:
        raise MedcamError(f"tau must be a Dice value in [0, 1], got {tau}")
    if repeats < 1 or not sigmas:
        raise MedcamError("robustness needs at least one sigma and repeats >= 1")
    if any(s < 0 for s in sigmas):
        raise MedcamError(f"sigmas must be >= 0, got {list(sigmas)}")
    if similarity not in ("spearman", "pearson", "ssim"):
        raise MedcamError(f"similarity must be 'spearman', 'pearson' or 'ssim', got {similarity!r}")
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        seg0 = seg_fn(image)
    map0 = map_fn(image).detach()
    records = []
    for sigma in sigmas:
        for r in range(repeats):
            xn = add_noise(image, float(sigma), kind, relative, gen)
            with torch.no_grad():
                seg = seg_fn(xn)
            m = map_fn(xn).detach()
            if m.shape != map0.shape:
                raise MedcamError(
                    f"map_fn returned {tuple(m.shape)} on the noisy image, {tuple(map0.shape)} on the clean one"
                )
            d = _dice_all(seg0, seg)
            sim = float(torch.nanmean(map_similarity(map0, m, similarity, spatial_dims).float()))
            records.append({"sigma": float(sigma), "repeat": r, "dice": d, "similarity": sim, "stable": d >= tau})

    def summary(recs: list[dict]) -> dict[str, float]:
        return {
            "consistency": _mean([x["similarity"] for x in recs if x["stable"]]),
            "responsiveness": _mean([1.0 - x["similarity"] for x in recs if not x["stable"]]),
            "dice": _mean([x["dice"] for x in recs]),
        }

    tot = summary(records)
    per = {float(s): summary([x for x in records if x["sigma"] == float(s)]) for s in sigmas}
    return RobustnessResult(records, tot["consistency"], tot["responsiveness"], per)
