"""Faithfulness of CAMs against the model: deletion / insertion curves (Petsiuk et al. 2018) and average drop /
increase in confidence (Chattopadhay et al. 2018), for 3D volumes, with batched perturbed forward passes.

The explained score is given as ``score_fn(images [N, Cin, *S]) -> scores [N]`` (batched), or built with
:func:`make_score_fn` from a model and fixed score weights ``W`` (the ROI, taken from the unperturbed image):
``score(x) = sum_{c,u} W[c, u] * act(model(x))[c, u]`` (optionally divided by ``sum W``: the mean over the ROI).

A "removed" voxel has all its input channels replaced by the baseline value at that voxel: 0 (MRI background,
default), the channel mean, a Gaussian blur of the image, a constant or a user tensor.

Protocols of the curves (``protocol=``, named in :class:`CurveResult` and in the tables of :mod:`medcam.evaluation`):

* ``"rise"`` (default of insertion; Petsiuk et al.'s code ``eclique/RISE``, ``evaluation.py``): insertion starts
  from a Gaussian blur of the image and restores voxels in map order; deletion replaces voxels by 0. Both score the
  model's *probability*: pass a probability score (``make_score_fn(..., activation="sigmoid"|"softmax",
  reduction="mean")``, the mean probability over the ROI, in [0, 1]). Deviations kept from RISE's code: the blur is
  a Gaussian of ``blur_sigma`` (default 5) voxels truncated at 3 sigma with replicate padding (RISE: an 11-tap kernel
  of sigma 5, i.e. truncated at 1 sigma, with zero padding, which darkens the border); the segmentation score is the
  mean probability over the ROI (RISE: the probability of the top class); ties are broken at random (below).
* ``"baseline"`` (default of deletion; the former insertion): both ends use ``baseline``; any score (e.g. logits).

Ties. After a ReLU most voxels of a map are often exactly 0; ranking them by voxel index would make most of the
curve measure the scan order. With ``ties="random"`` (default) the order within a group of equal values is a random
permutation (seeded), and the curve is averaged over ``tie_draws`` permutations (the steps whose removed set does not
cut a tied group are identical in every draw and computed once); ``ties="index"`` keeps the raster order.
:func:`tied_fraction` reports the fraction of voxels that share their value with another voxel (in every result).
A constant map (max == min, e.g. all zero) has no order at all and an empty ROI has no score: both give NaN and a
warning instead of a number.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..errors import MedcamError
from .thresholds import normalize_maps

__all__ = [
    "Activation",
    "ScoreFn",
    "ScoreFunction",
    "make_score_fn",
    "make_baseline",
    "CurveResult",
    "perturbation_curve",
    "deletion_curve",
    "insertion_curve",
    "average_drop_increase",
    "voxel_ranks",
    "tied_fraction",
]

logger = logging.getLogger(__name__)

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
Baseline = Literal["zero", "mean", "blur"] | float | torch.Tensor
Protocol = Literal["rise", "baseline"]
Ties = Literal["random", "index"]
#: the probability a score takes from the model's output: ``"none"`` = the output is a probability already (the
#: network ends in its own sigmoid/softmax) and is scored as it is
Activation = Literal["sigmoid", "softmax", "none"]


class ScoreFunction:
    """Batched ROI score of a segmentation model, built by :func:`make_score_fn` (callable like any ``score_fn``).

    Attributes:
        weights: ``W`` ``[C, *S]`` float32.
        activation: None (logits), ``"sigmoid"``, ``"softmax"`` or ``"none"`` (outputs already probabilities).
        reduction: ``"sum"`` or ``"mean"`` (divided by ``sum max(W, 0)``, the ROI's size for a 0/1 mask).
    """

    def __init__(
        self,
        model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
        weights: torch.Tensor,
        batch_size: int,
        activation: Activation | None,
        reduction: Literal["sum", "mean"],
        device: torch.device | None,
    ):
        self.model = model
        self.weights = weights
        self.batch_size = batch_size
        self.activation = activation
        self.reduction = reduction
        self._device = device
        self._norm = float(weights.clamp_min(0).sum()) if reduction == "mean" else 1.0

    @property
    def empty_roi(self) -> bool:
        """True when the score has no voxel to score (``W`` all zero, or no positive weight with ``"mean"``)."""
        return not bool(self.weights.any()) or (self.reduction == "mean" and not self._norm > 0)

    @property
    def kind(self) -> str:
        """``"logit"`` or ``"probability"`` (with an activation), followed by ``" mean"`` for the ROI mean."""
        k = "logit" if self.activation is None else "probability"
        return k + (" mean" if self.reduction == "mean" else " sum")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        d = self._device if self._device is not None else images.device
        ww = self.weights.to(d)
        out = []
        with torch.no_grad():
            for i in range(0, images.shape[0], self.batch_size):
                y = self.model(images[i : i + self.batch_size].to(d))
                if not isinstance(y, torch.Tensor):
                    raise MedcamError(f"model returned {type(y).__name__}; the score needs a tensor [N, C, *S]")
                if tuple(y.shape[1:]) != tuple(ww.shape):
                    raise MedcamError(
                        f"model output {tuple(y.shape)} does not match the score weights {tuple(ww.shape)}: build W "
                        "from this model's output on the same image size"
                    )
                y = y.float()
                if self.activation == "sigmoid":
                    y = torch.sigmoid(y)
                elif self.activation == "softmax":
                    y = torch.softmax(y, dim=1)
                out.append((y * ww).flatten(1).sum(1))
        s = torch.cat(out).to(images.device)
        if self.reduction == "mean":
            s = s / self._norm if self._norm > 0 else torch.full_like(s, math.nan)
        return s


def make_score_fn(
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    weights: torch.Tensor,
    batch_size: int = 8,
    activation: Activation | None = None,
    reduction: Literal["sum", "mean"] = "sum",
) -> ScoreFunction:
    """Batched ROI score of a segmentation model: ``S(x_n) = sum_{c,u} W[c,u] act(model(x))[n,c,u]``.

    Runs under ``torch.no_grad`` in chunks of ``batch_size`` volumes, on the device of the model's parameters (the
    input's device for a parameter-free model). The model's train/eval mode is left as it is (call ``model.eval()``).

    Args:
        model: maps ``[N, Cin, *S]`` to logits ``[N, C, *S]``: an ``nn.Module`` or any callable (e.g.
            ``lambda x: inferer(x, net)`` for sliding-window inference on whole volumes).
        weights: ``W`` ``[C, *S]`` or ``[1, C, *S]``, e.g. ``target.score_weights(output)`` of the unperturbed image.
        batch_size: volumes per forward pass.
        activation: None (score the logits), ``"sigmoid"`` or ``"softmax"`` (over dim 1), e.g. for average drop,
            which needs a positive score, and RISE's protocol, which scores the probability; ``"none"``: the model
            outputs probabilities already (it ends in its own sigmoid/softmax), scored as they are.
        reduction: ``"sum"`` (default) or ``"mean"``: divided by ``sum max(W, 0)`` (the ROI's voxel count for a 0/1
            mask), so a probability score is the mean probability over the ROI, in [0, 1]. NaN for an empty ROI.
    Returns:
        a :class:`ScoreFunction`: ``score_fn(images [N, Cin, *S]) -> [N]`` float32 on ``images.device``.
    """
    if batch_size < 1:
        raise MedcamError(f"batch_size must be >= 1, got {batch_size}")
    if activation not in (None, "sigmoid", "softmax", "none"):
        raise MedcamError(f"activation must be None, 'sigmoid', 'softmax' or 'none', got {activation!r}")
    if reduction not in ("sum", "mean"):
        raise MedcamError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
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
    return ScoreFunction(model, w, batch_size, activation, reduction, dev)


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


def voxel_ranks(
    saliency: torch.Tensor, ties: Ties = "random", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Rank of every voxel in map order, most relevant first: ``[M, *S]`` (or ``[M, V]``) -> ``[M, V]`` long.

    Args:
        saliency: maps, flattened from dim 1.
        ties: ``"random"``: voxels of equal value are ordered by a random permutation drawn from ``generator``
            (CPU; default seed 0); ``"index"``: by voxel index (raster order).
    """
    flat = saliency.flatten(1)
    if ties == "index":
        order = torch.argsort(-flat, dim=1, stable=True)
    elif ties == "random":
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        perm = torch.argsort(torch.rand(flat.shape, generator=gen), dim=1).to(flat.device)
        o = torch.argsort(-torch.gather(flat, 1, perm), dim=1, stable=True)
        order = torch.gather(perm, 1, o)
    else:
        raise MedcamError(f"ties must be 'random' or 'index', got {ties!r}")
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order).contiguous())
    return ranks


def tied_fraction(saliency: torch.Tensor) -> torch.Tensor:
    """Fraction of voxels whose value is shared with at least one other voxel of the same map.

    Args:
        saliency: ``[M, *S]`` (flattened from dim 1).
    Returns:
        ``[M]`` float32 in [0, 1] (1 for a constant map; 0 when all values are distinct).
    """
    v = torch.sort(saliency.flatten(1).float(), dim=1).values
    eq = v[:, 1:] == v[:, :-1]
    tied = torch.zeros_like(v, dtype=torch.bool)
    tied[:, 1:] |= eq
    tied[:, :-1] |= eq
    return tied.float().mean(1)


def _cuts_in_ties(sal: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``[M, K]`` bool: does removing the top ``counts[k]`` voxels of map ``m`` split a group of equal values?

    Only then does the removed set depend on the tie order (else every tie-breaking gives the same set)."""
    v = torch.sort(sal.flatten(1), dim=1, descending=True).values  # [M, V]
    n = v.shape[1]
    c = counts.to(v.device).long()
    if n < 2:
        return torch.zeros(v.shape[0], c.numel(), dtype=torch.bool, device=v.device)
    inner = (c > 0) & (c < n)
    ci = c.clamp(1, max(n - 1, 1))
    split = v[:, ci - 1] == v[:, ci]
    return split & inner[None]


def _check_orderable(sal: torch.Tensor, what: str) -> torch.Tensor:
    """``[M]`` bool: True for a constant map (no order): warn once."""
    flat = sal.flatten(1)
    const = flat.amax(1) == flat.amin(1)
    if bool(const.any()):
        logger.warning(
            "%s: %d of %d maps are constant (e.g. all zero after the ReLU): they rank no voxel above another, so "
            "their result is NaN (not a number from the scan order)",
            what,
            int(const.sum()),
            const.numel(),
        )
    return const


def _empty_roi(score_fn: ScoreFn, what: str) -> bool:
    if bool(getattr(score_fn, "empty_roi", False)):
        logger.warning("%s: the ROI of the score is empty (nothing to explain): result is NaN", what)
        return True
    return False


def _check_ties(ties: str, tie_draws: int) -> None:
    if ties not in ("random", "index"):
        raise MedcamError(f"ties must be 'random' or 'index', got {ties!r}")
    if int(tie_draws) < 1:
        raise MedcamError(f"tie_draws must be >= 1, got {tie_draws}")


@dataclass
class CurveResult:
    """A deletion or insertion curve.

    Attributes:
        fractions: ``[T+1]`` fraction of voxels removed (inserted), 0..1.
        scores: ``[M, T+1]`` score at each step, one row per map (mean over the tie-breaking draws; NaN rows for a
            constant map or an empty ROI).
        auc: ``[M]`` area under the curve over the fraction (trapezoid rule), in score units.
        mode: ``"deletion"`` or ``"insertion"``.
        protocol: ``"rise"`` or ``"baseline"`` (see the module docstring).
        substrate: what removed voxels become (``"zero"``, ``"blur(sigma=5)"``, ...).
        score: the score's kind when known (``"probability mean"``, ``"logit sum"``, ...), else ``"user"``.
        tied_fraction: ``[M]`` fraction of voxels sharing their value with another voxel (:func:`tied_fraction`).
        ties, tie_draws: tie-breaking rule and number of random draws averaged.
    """

    fractions: torch.Tensor
    scores: torch.Tensor
    auc: torch.Tensor
    mode: str
    protocol: str = "baseline"
    substrate: str = "zero"
    score: str = "user"
    tied_fraction: torch.Tensor | None = None
    ties: str = "index"
    tie_draws: int = 1


def _substrate_name(baseline: Baseline, blur_sigma: float) -> str:
    if isinstance(baseline, torch.Tensor):
        return "tensor"
    if baseline == "blur":
        return f"blur(sigma={blur_sigma:g})"
    return str(baseline)


def perturbation_curve(
    image: torch.Tensor,
    saliency: torch.Tensor,
    score_fn: ScoreFn,
    mode: Literal["deletion", "insertion"] = "deletion",
    steps: int = 20,
    baseline: Baseline | None = None,
    batch_size: int = 8,
    blur_sigma: float = 5.0,
    spatial_dims: int = 3,
    protocol: Protocol | None = None,
    ties: Ties = "random",
    tie_draws: int = 3,
    seed: int = 0,
) -> CurveResult:
    """Deletion / insertion curve (Petsiuk et al. 2018, RISE) of one or several maps of one case.

    Voxels are ranked by the map, most relevant first (ties: see ``ties``). At step ``k = 0..T`` the top
    ``n_k = round(k V / T)`` voxels are replaced by the substrate (deletion) or the substrate has them restored from
    the image (insertion); ``s_k = score_fn(x_k)``. ``AUC = sum_k (f_{k+1} - f_k)(s_k + s_{k+1}) / 2`` with
    ``f_k = n_k / V`` (RISE's ``auc``). Deletion: lower is better; insertion: higher is better.

    Args:
        image: ``[Cin, *S]`` or ``[1, Cin, *S]``.
        saliency: ``[*S]`` or ``[M, *S]`` maps on the image grid.
        score_fn: batched score ``[N, Cin, *S] -> [N]`` (see :func:`make_score_fn`).
        mode: ``"deletion"`` or ``"insertion"``.
        steps: number of steps ``T``.
        baseline: the substrate with ``protocol="baseline"`` (see :func:`make_baseline`; default ``"zero"``).
        protocol: ``"rise"`` (substrate 0 for deletion, ``blur(blur_sigma)`` for insertion; a probability score is
            required when ``score_fn`` is a :class:`ScoreFunction`) or ``"baseline"``. None: ``"rise"`` for
            insertion, ``"baseline"`` for deletion.
        batch_size: perturbed volumes per ``score_fn`` call.
        ties: ``"random"`` (average over ``tie_draws`` seeded permutations of tied voxels) or ``"index"``.
        seed: seed of the tie-breaking permutations.
    Returns:
        :class:`CurveResult` (``scores [M, T+1]``, ``auc [M]``, the protocol, ``tied_fraction [M]``).
    """
    if mode not in ("deletion", "insertion"):
        raise MedcamError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if steps < 1 or batch_size < 1:
        raise MedcamError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    _check_ties(ties, tie_draws)
    protocol, substrate = _curve_protocol(mode, protocol, baseline, score_fn, blur_sigma)
    image, sal = _prepare(image, saliency, spatial_dims)
    base = make_baseline(image, substrate, blur_sigma).flatten(1)
    m, v = sal.shape[0], image[0].numel()
    n_k = torch.round(torch.arange(steps + 1, dtype=torch.float64) * v / steps).long()
    fr = (n_k.double() / v).to(image.device).float()
    draws = int(tie_draws) if ties == "random" else 1
    meta: dict[str, Any] = dict(
        protocol=protocol,
        substrate=_substrate_name(substrate, blur_sigma),
        score=score_fn.kind if isinstance(score_fn, ScoreFunction) else "user",
        tied_fraction=tied_fraction(sal),
        ties=ties,
        tie_draws=draws,
    )
    const = _check_orderable(sal, f"{mode} curve")
    nan = torch.full((m, steps + 1), math.nan, device=image.device)
    if _empty_roi(score_fn, f"{mode} curve"):
        return CurveResult(fractions=fr, scores=nan, auc=nan[:, 0].clone(), mode=mode, **meta)
    gen = torch.Generator().manual_seed(int(seed))
    ranks = [voxel_ranks(sal, ties, gen) for _ in range(draws)]  # draws x [M, V]
    jobs = _curve_jobs(sal, const, n_k, draws)
    total, count = _score_curve_jobs(jobs, ranks, n_k, image, base, score_fn, mode, batch_size, m)
    scores = torch.where(count > 0, total / count.clamp_min(1), nan)
    auc = torch.trapezoid(scores, fr, dim=1)
    return CurveResult(fractions=fr, scores=scores, auc=auc, mode=mode, **meta)


def _curve_protocol(
    mode: str, protocol: Protocol | None, baseline: Baseline | None, score_fn: ScoreFn, blur_sigma: float
) -> tuple[Protocol, Baseline]:
    """The protocol (default by mode) and the substrate it implies; RISE's needs a probability score."""
    if protocol is None:
        protocol = "rise" if mode == "insertion" else "baseline"
    if protocol not in ("rise", "baseline"):
        raise MedcamError(f"protocol must be 'rise' or 'baseline', got {protocol!r}")
    if protocol == "baseline":
        return protocol, "zero" if baseline is None else baseline
    if baseline is not None:
        raise MedcamError(
            f"protocol='rise' fixes the substrate (0 for deletion, a blur for insertion); to use baseline="
            f"{_substrate_name(baseline, blur_sigma)!r} pass protocol='baseline'"
        )
    if isinstance(score_fn, ScoreFunction) and score_fn.activation is None:
        raise MedcamError(
            "RISE's protocol scores the probability, but this score_fn scores logits: build it with "
            "make_score_fn(model, W, activation='sigmoid' or 'softmax', reduction='mean'), or pass "
            "protocol='baseline'"
        )
    return protocol, "blur" if mode == "insertion" else "zero"


def _curve_jobs(sal: torch.Tensor, const: torch.Tensor, n_k: torch.Tensor, draws: int) -> list[tuple[int, int, int]]:
    """``(map, step, draw)`` of every perturbed volume to score: constant maps are skipped, and a step gets all
    ``draws`` tie orders only where its removed set cuts a group of tied voxels (else every order is the same)."""
    m, n_steps = sal.shape[0], n_k.numel()
    split = _cuts_in_ties(sal, n_k) if draws > 1 else torch.zeros(m, n_steps, dtype=torch.bool)
    return [
        (i, k, d)
        for i in range(m)
        if not bool(const[i])
        for k in range(n_steps)
        for d in range(draws if bool(split[i, k]) else 1)
    ]


def _score_curve_jobs(
    jobs: list[tuple[int, int, int]],
    ranks: list[torch.Tensor],
    n_k: torch.Tensor,
    image: torch.Tensor,
    base: torch.Tensor,
    score_fn: ScoreFn,
    mode: str,
    batch_size: int,
    m: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score the perturbed volumes in batches: ``(sum of scores, number of draws)``, both ``[M, T+1]``."""
    img = image.float().flatten(1)
    total = torch.zeros(m, n_k.numel(), device=image.device)
    count = torch.zeros(m, n_k.numel(), device=image.device)
    for j in range(0, len(jobs), batch_size):
        chunk = jobs[j : j + batch_size]
        vols = []
        for i, k, d in chunk:
            sel = (ranks[d][i] < n_k[k]).unsqueeze(0)
            x = torch.where(sel, base, img) if mode == "deletion" else torch.where(sel, img, base)
            vols.append(x.reshape(image.shape))
        s = score_fn(torch.stack(vols)).reshape(-1).float()
        if s.shape[0] != len(chunk):
            raise MedcamError(f"score_fn returned {s.shape[0]} scores for {len(chunk)} volumes; it must return [N]")
        for (i, k, _), sv in zip(chunk, s.to(image.device)):
            total[i, k] += sv
            count[i, k] += 1
    return total, count


def deletion_curve(image: torch.Tensor, saliency: torch.Tensor, score_fn: ScoreFn, **kwargs) -> CurveResult:
    """:func:`perturbation_curve` with ``mode="deletion"`` (lower AUC is better; default protocol ``"baseline"``
    with substrate 0)."""
    return perturbation_curve(image, saliency, score_fn, mode="deletion", **kwargs)


def insertion_curve(image: torch.Tensor, saliency: torch.Tensor, score_fn: ScoreFn, **kwargs) -> CurveResult:
    """:func:`perturbation_curve` with ``mode="insertion"`` (higher AUC is better; default protocol ``"rise"``:
    start from the blurred image, score a probability; ``protocol="baseline"`` for the former behaviour)."""
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
