"""Faithfulness of CAMs against the model: deletion / insertion curves (Petsiuk et al. 2018) and average drop /
increase in confidence (Chattopadhay et al. 2018), for 3D volumes, with batched perturbed forward passes.

The explained score is given as ``score_fn(images [N, Cin, *S]) -> scores [N]`` (batched), or built with
:func:`make_score_fn` from a model and fixed score weights ``W`` (the ROI, taken from the unperturbed image):
``score(x) = sum_{c,u} W[c, u] * act(model(x))[c, u]``.

A "removed" voxel has all its input channels replaced by the baseline value at that voxel: 0 (MRI background,
default), the channel mean, a Gaussian blur of the image, a constant or a user tensor.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import MedcamError
from .thresholds import normalize_maps

__all__ = [
    "ScoreFn",
    "make_score_fn",
    "make_baseline",
    "CurveResult",
    "perturbation_curve",
    "deletion_curve",
    "insertion_curve",
    "average_drop_increase",
    "voxel_ranks",
]

logger = logging.getLogger(__name__)

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
Baseline = Literal["zero", "mean", "blur"] | float | torch.Tensor


def make_score_fn(
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    weights: torch.Tensor,
    batch_size: int = 8,
    activation: Literal["sigmoid", "softmax"] | None = None,
) -> ScoreFn:
    """Batched ROI score of a segmentation model: ``S(x_n) = sum_{c,u} W[c,u] act(model(x))[n,c,u]``.

    Runs under ``torch.no_grad`` in chunks of ``batch_size`` volumes, on the device of the model's parameters (the
    input's device for a parameter-free model). The model's train/eval mode is left as it is (call ``model.eval()``).

    Args:
        model: maps ``[N, Cin, *S]`` to logits ``[N, C, *S]``: an ``nn.Module`` or any callable (e.g.
            ``lambda x: inferer(x, net)`` for sliding-window inference on whole volumes).
        weights: ``W`` ``[C, *S]`` or ``[1, C, *S]``, e.g. ``target.score_weights(output)`` of the unperturbed image.
        batch_size: volumes per forward pass.
        activation: None (score the logits), ``"sigmoid"`` or ``"softmax"`` (over dim 1), e.g. for average drop,
            which needs a positive score.
    Returns:
        ``score_fn(images [N, Cin, *S]) -> [N]`` float32 on ``images.device``.
    """
    if batch_size < 1:
        raise MedcamError(f"batch_size must be >= 1, got {batch_size}")
    if activation not in (None, "sigmoid", "softmax"):
        raise MedcamError(f"activation must be None, 'sigmoid' or 'softmax', got {activation!r}")
    if not isinstance(weights, torch.Tensor):
        raise MedcamError(f"weights must be a torch.Tensor [C, *S], got {type(weights).__name__}")
    w = weights.detach().float()
    if w.ndim >= 2 and w.shape[0] == 1:
        w = w[0]
    dev = None
    if isinstance(model, torch.nn.Module):
        if model.training:
            logger.warning("make_score_fn: the model is in training mode; call model.eval() for deterministic scores")
        dev = next(iter(model.parameters()), torch.empty(0)).device if any(True for _ in model.parameters()) else None
    elif not callable(model):
        raise MedcamError(f"model must be an nn.Module or a callable, got {type(model).__name__}")

    def score_fn(images: torch.Tensor) -> torch.Tensor:
        d = dev if dev is not None else images.device
        ww = w.to(d)
        out = []
        with torch.no_grad():
            for i in range(0, images.shape[0], batch_size):
                y = model(images[i : i + batch_size].to(d))
                if not isinstance(y, torch.Tensor):
                    raise MedcamError(f"model returned {type(y).__name__}; the score needs a tensor [N, C, *S]")
                if tuple(y.shape[1:]) != tuple(ww.shape):
                    raise MedcamError(
                        f"model output {tuple(y.shape)} does not match the score weights {tuple(ww.shape)}: build W "
                        "from this model's output on the same image size"
                    )
                y = y.float()
                if activation == "sigmoid":
                    y = torch.sigmoid(y)
                elif activation == "softmax":
                    y = torch.softmax(y, dim=1)
                out.append((y * ww).flatten(1).sum(1))
        return torch.cat(out).to(images.device)

    return score_fn


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[Cin, *S]`` (sigma in voxels, replicate padding)."""
    nd = image.ndim - 1
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float32, device=image.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    out = image.float()[:, None]  # [Cin, 1, *S]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    for a in range(nd):
        shape = [1, 1] + [1] * nd
        shape[2 + a] = 2 * r + 1
        pad = [0, 0] * nd
        pad[2 * (nd - 1 - a)] = r
        pad[2 * (nd - 1 - a) + 1] = r
        out = conv(F.pad(out, pad, mode="replicate"), k.reshape(shape))
    return out[:, 0]


def make_baseline(image: torch.Tensor, baseline: Baseline = "zero", blur_sigma: float = 5.0) -> torch.Tensor:
    """The value a removed voxel takes, ``[Cin, *S]`` like ``image``.

    Args:
        image: ``[Cin, *S]``.
        baseline: ``"zero"`` (0, MRI background), ``"mean"`` (channel mean), ``"blur"`` (Gaussian blur with
            ``blur_sigma`` voxels, as Petsiuk et al.'s insertion), a float, or a tensor broadcastable to ``image``.
    """
    if isinstance(baseline, torch.Tensor):
        try:
            return torch.broadcast_to(baseline.to(image.device, torch.float32), image.shape).clone()
        except RuntimeError as e:
            raise MedcamError(
                f"baseline tensor {tuple(baseline.shape)} does not broadcast to {tuple(image.shape)}"
            ) from e
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full(image.shape, float(baseline), device=image.device)
    if baseline == "zero":
        return torch.zeros(image.shape, device=image.device)
    if baseline == "mean":
        return image.float().flatten(1).mean(1).reshape(-1, *([1] * (image.ndim - 1))).expand(image.shape).clone()
    if baseline == "blur":
        if not blur_sigma > 0:
            raise MedcamError(f"blur_sigma must be > 0 voxels, got {blur_sigma}")
        return _gaussian_blur(image, blur_sigma)
    raise MedcamError(f"baseline must be 'zero', 'mean', 'blur', a float or a tensor, got {baseline!r}")


def _prepare(image: torch.Tensor, saliency: torch.Tensor, spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(image, torch.Tensor) or not isinstance(saliency, torch.Tensor):
        raise MedcamError("image and saliency must be torch tensors")
    if image.ndim == spatial_dims + 2:
        if image.shape[0] != 1:
            raise MedcamError(
                f"image has batch size {image.shape[0]}; perturbation metrics take one case [1, Cin, *S] (several "
                "maps of it as saliency [M, *S]); loop over cases"
            )
        image = image[0]
    if image.ndim != spatial_dims + 1:
        raise MedcamError(
            f"image must be [Cin, *S] or [1, Cin, *S] with {spatial_dims} spatial dims, got {tuple(image.shape)}"
        )
    spatial = tuple(image.shape[1:])
    if tuple(saliency.shape[saliency.ndim - spatial_dims :]) != spatial or saliency.ndim < spatial_dims:
        raise MedcamError(
            f"saliency {tuple(saliency.shape)} does not end with the image's spatial shape {spatial}: upsample the "
            "maps to the input grid (the explainers do) and pass [M, *S]"
        )
    sal = saliency.reshape(-1, *spatial).to(image.device).float()
    if not torch.isfinite(sal).all() or not torch.isfinite(image.float()).all():
        raise MedcamError("image or saliency contains NaN or inf")
    return image, sal


def voxel_ranks(saliency: torch.Tensor) -> torch.Tensor:
    """Rank of every voxel in map order, most relevant first: ``[M, V]`` long, ties broken by voxel index."""
    order = torch.argsort(-saliency.flatten(1), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order).contiguous())
    return ranks


@dataclass
class CurveResult:
    """A deletion or insertion curve.

    Attributes:
        fractions: ``[T+1]`` fraction of voxels removed (inserted), 0..1.
        scores: ``[M, T+1]`` score at each step, one row per map.
        auc: ``[M]`` area under the curve over the fraction (trapezoid rule), in score units.
        mode: ``"deletion"`` or ``"insertion"``.
    """

    fractions: torch.Tensor
    scores: torch.Tensor
    auc: torch.Tensor
    mode: str


def perturbation_curve(
    image: torch.Tensor,
    saliency: torch.Tensor,
    score_fn: ScoreFn,
    mode: Literal["deletion", "insertion"] = "deletion",
    steps: int = 20,
    baseline: Baseline = "zero",
    batch_size: int = 8,
    blur_sigma: float = 5.0,
    spatial_dims: int = 3,
) -> CurveResult:
    """Deletion / insertion curve (Petsiuk et al. 2018, RISE) of one or several maps of one case.

    Voxels are ranked by the map, most relevant first (ties by voxel index). At step ``k = 0..T`` the top
    ``n_k = round(k V / T)`` voxels are replaced by the baseline (deletion) or the baseline has them restored from
    the image (insertion); ``s_k = score_fn(x_k)``. ``AUC = sum_k (f_{k+1} - f_k)(s_k + s_{k+1}) / 2`` with
    ``f_k = n_k / V``. Deletion: lower is better; insertion: higher is better.

    Args:
        image: ``[Cin, *S]`` or ``[1, Cin, *S]``.
        saliency: ``[*S]`` or ``[M, *S]`` maps on the image grid.
        score_fn: batched score ``[N, Cin, *S] -> [N]`` (see :func:`make_score_fn`).
        mode: ``"deletion"`` or ``"insertion"``.
        steps: number of steps ``T``.
        baseline: see :func:`make_baseline`.
        batch_size: perturbed volumes per ``score_fn`` call.
    Returns:
        :class:`CurveResult` (``scores [M, T+1]``, ``auc [M]``).
    """
    if mode not in ("deletion", "insertion"):
        raise MedcamError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if steps < 1 or batch_size < 1:
        raise MedcamError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    image, sal = _prepare(image, saliency, spatial_dims)
    base = make_baseline(image, baseline, blur_sigma).flatten(1)
    img = image.float().flatten(1)
    m, v = sal.shape[0], img.shape[1]
    ranks = voxel_ranks(sal)
    n_k = torch.round(torch.arange(steps + 1, dtype=torch.float64) * v / steps).long()
    jobs = [(i, k) for i in range(m) for k in range(steps + 1)]
    scores = torch.empty(m, steps + 1, device=image.device)
    for j in range(0, len(jobs), batch_size):
        chunk = jobs[j : j + batch_size]
        vols = []
        for i, k in chunk:
            sel = (ranks[i] < n_k[k]).unsqueeze(0)
            x = torch.where(sel, base, img) if mode == "deletion" else torch.where(sel, img, base)
            vols.append(x.reshape(image.shape))
        s = score_fn(torch.stack(vols)).reshape(-1).float()
        if s.shape[0] != len(chunk):
            raise MedcamError(f"score_fn returned {s.shape[0]} scores for {len(chunk)} volumes; it must return [N]")
        for (i, k), sv in zip(chunk, s.to(image.device)):
            scores[i, k] = sv
    fr = (n_k.double() / v).to(image.device).float()
    auc = torch.trapezoid(scores, fr, dim=1)
    return CurveResult(fractions=fr, scores=scores, auc=auc, mode=mode)


def deletion_curve(image: torch.Tensor, saliency: torch.Tensor, score_fn: ScoreFn, **kwargs) -> CurveResult:
    """:func:`perturbation_curve` with ``mode="deletion"`` (lower AUC is better)."""
    return perturbation_curve(image, saliency, score_fn, mode="deletion", **kwargs)


def insertion_curve(image: torch.Tensor, saliency: torch.Tensor, score_fn: ScoreFn, **kwargs) -> CurveResult:
    """:func:`perturbation_curve` with ``mode="insertion"`` (higher AUC is better)."""
    return perturbation_curve(image, saliency, score_fn, mode="insertion", **kwargs)


def average_drop_increase(
    image: torch.Tensor,
    saliency: torch.Tensor,
    score_fn: ScoreFn,
    baseline: Baseline = "zero",
    normalize: Literal["minmax", "max"] = "max",
    spatial_dims: int = 3,
) -> dict[str, torch.Tensor]:
    """Average drop and increase in confidence (Chattopadhay et al. 2018, Grad-CAM++), per map.

    The explanation-masked input is ``x' = L x + (1 - L) b`` with ``L`` the map normalised to [0, 1] and ``b`` the
    baseline (0: ``L x``, as in the paper). With ``Y = S(x)``, ``O = S(x')``:
    ``drop = 100 max(0, Y - O) / Y`` (%), ``increase = 1[O > Y]``. Average both over cases. ``Y`` must be positive
    (use a probability score, ``make_score_fn(..., activation="sigmoid")``); ``Y <= 0`` gives NaN and a warning.

    Args:
        image: ``[Cin, *S]`` or ``[1, Cin, *S]``; saliency: ``[*S]`` or ``[M, *S]``.
    Returns:
        dict of ``[M]`` tensors: ``drop_percent``, ``increase``, ``score`` (Y, repeated), ``masked_score`` (O).
    """
    image, sal = _prepare(image, saliency, spatial_dims)
    lnorm = normalize_maps(sal, normalize, spatial_dims).clamp(0, 1)
    base = make_baseline(image, baseline)
    xs = [image.float()[None]] + [(w[None] * image.float() + (1 - w[None]) * base)[None] for w in lnorm]
    s = score_fn(torch.cat(xs)).reshape(-1).float().to(image.device)
    y, o = s[0], s[1:]
    if not y > 0:
        logger.warning("average drop: the unperturbed score %.4g is not positive; use a probability score", float(y))
        drop = torch.full_like(o, math.nan)
    else:
        drop = 100.0 * (y - o).clamp_min(0) / y
    return {"drop_percent": drop, "increase": (o > y).float(), "score": y.expand_as(o).clone(), "masked_score": o}
