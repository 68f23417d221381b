"""ROAD in 3D: RemOve And Debias (Rong et al., ICML 2022) with noisy linear imputation.

Imputation (the authors' ``NoisyLinearImputer``, github.com/tleemann/road_evaluation, ``road/imputations.py``): every
removed voxel ``u in R`` equals the weighted mean of its in-volume neighbours, kept voxels ``K`` acting as boundary
values. For every channel this is one sparse linear system

    (sum_{v in N(u)} w_{v-u}) x_u - sum_{v in N(u) n R} w_{v-u} x_v = sum_{v in N(u) n K} w_{v-u} x_v,   u in R,

solved jointly for all removed voxels (``L_RR x_R = -L_RK x_K`` with ``L`` the weighted graph Laplacian of the grid:
symmetric positive definite on every connected component of ``R`` that touches ``K``). Neighbours outside the volume
are absent and the voxel's weights are renormalised over those present, as in the authors' code.

Weights (``stencil=``):

* ``"rong"`` (default). 2D: the authors' 8-neighbourhood, 1/6 for the 4 edge neighbours and 1/12 for the 4 diagonal
  ones. These are the inverse squared distances (1 and 1/2) normalised to sum 1, and that rule is the one used in
  every dimension: in 3D the 26-neighbourhood with weights proportional to ``1 / |o|^2``: faces ``3/44`` (6),
  edges ``3/88`` (12), corners ``1/44`` (8), summing to 1. Why this extension: it is the rule that gives the paper's
  2D weights, it gives plain linear interpolation (1/2, 1/2) in 1D, every axis plane through the voxel carries the
  2D stencil's 2:1 ratio between its edge and diagonal neighbours, and it is symmetric (``w(o) = w(-o)``), so
  ``sum_o w(o) o = 0``: a linear field satisfies every equation and is reproduced exactly on removed voxels whose
  whole neighbourhood lies inside the volume (at the border the one-sided renormalised mean is not exact, as in 2D).
* ``"faces"``: the 2d face neighbours with equal weights (the former medcam stencil), for comparison.

Components of ``R`` without a kept neighbour (e.g. everything removed) have no boundary data (the authors' system is
singular there) and are set to the channel mean of the kept voxels (0 if nothing is kept). Gaussian noise is then
added to the imputed voxels only: ``noise`` times the channel's standard deviation (``noise_scale="std"``, default)
or absolute (``"absolute"``, the authors' code: ``0.01 * randn`` on CIFAR images scaled to [0, 1]). Deviation kept:
MRI intensities have no fixed unit, so the default scales the noise by the channel std (the same as absolute on the
z-scored inputs medcam's models usually take).

The ROAD score (:func:`road`): remove the ``p`` % most (MoRF) or least (LeRF) relevant voxels for ``p`` in 10, 20,
..., 90 (the paper's grid), impute, score; ``combined = mean_p (s_LeRF(p) - s_MoRF(p)) / 2``. Ties of the map are
broken at random and averaged over ``tie_draws`` draws (the authors add one fixed ``1e-4 * randn`` perturbation to
the min-max normalised map, i.e. one random draw); a constant map or an empty ROI gives NaN with a warning.

The system is built and solved on the CPU with scipy.sparse (direct LU factorisation shared by all channels for up to
``direct_max`` unknowns, conjugate gradients above); the result goes back to the input's device.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ..errors import MedcamError
from .faithfulness import (
    ScoreFn,
    Ties,
    _check_orderable,
    _check_ties,
    _cuts_in_ties,
    _empty_roi,
    _prepare,
    tied_fraction,
    voxel_ranks,
)

__all__ = ["noisy_linear_imputation", "stencil_weights", "RoadResult", "road", "DEFAULT_PERCENTILES"]

logger = logging.getLogger(__name__)

Stencil = Literal["rong", "faces"]

#: the paper's removal percentages
DEFAULT_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def stencil_weights(spatial_dims: int, stencil: Stencil = "rong") -> list[tuple[tuple[int, ...], float]]:
    """Neighbour offsets and weights of the imputation (see the module docstring), weights summing to 1.

    ``stencil_weights(2)`` gives Rong et al.'s 8 neighbours (1/6 edge, 1/12 diagonal); ``stencil_weights(3)`` the 26
    neighbours with weights proportional to ``1 / |o|^2`` (faces 3/44, edges 3/88, corners 1/44).
    """
    if spatial_dims < 1:
        raise MedcamError(f"spatial_dims must be >= 1, got {spatial_dims}")
    if stencil == "rong":
        offs = [o for o in itertools.product((-1, 0, 1), repeat=spatial_dims) if any(o)]
        raw = [1.0 / sum(c * c for c in o) for o in offs]
    elif stencil == "faces":
        offs = [tuple(d if a == b else 0 for b in range(spatial_dims)) for a in range(spatial_dims) for d in (-1, 1)]
        raw = [1.0] * len(offs)
    else:
        raise MedcamError(f"stencil must be 'rong' or 'faces', got {stencil!r}")
    tot = sum(raw)
    return [(o, w / tot) for o, w in zip(offs, raw)]


def _solve(a, b: np.ndarray, solver: str, direct_max: int, rtol: float) -> np.ndarray:
    import scipy.sparse.linalg as spla

    n = a.shape[0]
    if solver == "direct" or (solver == "auto" and n <= direct_max):
        lu = spla.splu(a.tocsc())
        return lu.solve(b)
    x = np.empty_like(b)
    dinv = 1.0 / a.diagonal()
    prec = spla.LinearOperator(a.shape, matvec=lambda r: dinv * r)
    for c in range(b.shape[1]):
        sol, info = spla.cg(a, b[:, c], rtol=rtol, atol=0.0, maxiter=10 * n, M=prec)
        if info != 0:
            logger.warning("ROAD imputation: CG did not converge (info=%d) for channel %d", info, c)
        x[:, c] = sol
    return x


def noisy_linear_imputation(
    image: torch.Tensor,
    removed: torch.Tensor,
    noise: float = 0.01,
    generator: torch.Generator | None = None,
    solver: Literal["auto", "direct", "cg"] = "auto",
    direct_max: int = 5_000,
    rtol: float = 1e-10,
    stencil: Stencil = "rong",
    noise_scale: Literal["std", "absolute"] = "std",
) -> torch.Tensor:
    """Fill the removed voxels of one volume by noisy linear imputation (see the module docstring for the system).

    Args:
        image: ``[Cin, *S]`` (any number of spatial dims >= 1).
        removed: bool ``[*S]``, True where the voxel is removed (all channels).
        noise: noise std, a fraction of each channel's standard deviation (``noise_scale="std"``) or absolute
            (``"absolute"``); 0 for pure linear imputation.
        generator: torch generator for the noise (CPU), for reproducibility.
        solver: ``"direct"`` (sparse LU), ``"cg"`` (Jacobi-preconditioned conjugate gradients) or ``"auto"``.
        stencil: ``"rong"`` (Rong et al.'s weights, extended to 3D by inverse squared distance) or ``"faces"``.
    Returns:
        ``[Cin, *S]`` float32 on ``image.device``; kept voxels are bit-identical to ``image``.
    """
    _check_imputation(image, removed, noise, noise_scale, solver)
    nd = removed.ndim
    weights = stencil_weights(nd, stencil)
    out = image.detach().float().clone()
    rem = removed.detach().cpu().numpy().astype(bool)
    if not rem.any():
        return out
    x = image.detach().cpu().double().numpy().reshape(image.shape[0], -1)  # [Cin, V]
    remf = rem.ravel()
    solv, isolated = _solvable(rem, stencil)
    filled = np.zeros((x.shape[0], remf.size))
    if isolated.any():
        keptf = ~remf
        fill = x[:, keptf].mean(1) if keptf.any() else np.zeros(x.shape[0])
        filled[:, isolated] = fill[:, None]
        logger.debug("ROAD imputation: %d removed voxels have no kept neighbour; set to the kept mean", isolated.sum())
    u_idx = np.flatnonzero(solv)
    if u_idx.size:
        a_mat, b = _imputation_system(x, rem.shape, u_idx, weights)
        sol = _solve(a_mat, b, solver, direct_max, rtol)  # [n, Cin]
        filled[:, u_idx] = sol.T
    vals_t = torch.from_numpy(filled[:, remf]).float()
    if noise > 0:
        scale = torch.from_numpy(x.std(1)).float() if noise_scale == "std" else torch.ones(x.shape[0])
        eps = torch.randn(vals_t.shape, generator=generator, dtype=torch.float32)
        vals_t = vals_t + noise * scale[:, None] * eps
    mask_t = torch.from_numpy(remf).to(out.device)
    flat = out.reshape(out.shape[0], -1)
    flat[:, mask_t] = vals_t.to(out.device)
    return flat.reshape(out.shape)


def _check_imputation(image: Any, removed: Any, noise: float, noise_scale: str, solver: str) -> None:
    if not isinstance(image, torch.Tensor) or not isinstance(removed, torch.Tensor):
        raise MedcamError("image and removed must be torch tensors")
    if removed.ndim != image.ndim - 1 or tuple(removed.shape) != tuple(image.shape[1:]):
        raise MedcamError(
            f"removed {tuple(removed.shape)} must have the image's spatial shape {tuple(image.shape[1:])}"
        )
    if noise < 0:
        raise MedcamError(f"noise must be >= 0, got {noise}")
    if noise_scale not in ("std", "absolute"):
        raise MedcamError(f"noise_scale must be 'std' or 'absolute', got {noise_scale!r}")
    if solver not in ("auto", "direct", "cg"):
        raise MedcamError(f"solver must be 'auto', 'direct' or 'cg', got {solver!r}")


def _solvable(rem: np.ndarray, stencil: Stencil) -> tuple[np.ndarray, np.ndarray]:
    """Flat masks ``[V]`` of the removed voxels in a connected group (stencil connectivity) that touches a kept
    voxel (solved for) and of the others (isolated: no kept value reaches them)."""
    from scipy import ndimage

    nd = rem.ndim
    remf = rem.ravel()
    struct = ndimage.generate_binary_structure(nd, nd if stencil == "rong" else 1)
    labels, _ = ndimage.label(rem, structure=struct)
    touching = ndimage.binary_dilation(~rem, structure=struct) & rem
    ok_labels = np.unique(labels[touching])
    solv = np.isin(labels.ravel(), ok_labels) & remf
    return solv, remf & ~solv


def _imputation_system(
    x: np.ndarray, shape: tuple[int, ...], u_idx: np.ndarray, weights: Sequence[tuple[tuple[int, ...], float]]
) -> tuple[Any, np.ndarray]:
    """The sparse system ``A u = b`` of the unknown voxels ``u_idx`` (flat indices): each unknown equals the
    weighted mean of its stencil neighbours; kept neighbours (values from ``x [Cin, V]``) move to ``b [n, Cin]``."""
    from scipy import sparse

    nd, n = len(shape), u_idx.size
    pos = np.full(x.shape[1], -1, dtype=np.int64)
    pos[u_idx] = np.arange(n)
    coords = np.unravel_index(u_idx, shape)
    strides = [int(np.prod(shape[a + 1 :])) for a in range(nd)]
    deg = np.zeros(n)
    rows, cols, vals = [], [], []
    b = np.zeros((n, x.shape[0]))
    for off, w in weights:
        valid = np.ones(n, dtype=bool)
        for a, d in enumerate(off):
            if d:
                c = coords[a] + d
                valid &= (c >= 0) & (c < shape[a])
        vi = np.flatnonzero(valid)
        nb = u_idx[vi] + sum(d * st for d, st in zip(off, strides))
        deg[vi] += w
        p = pos[nb]
        unk = p >= 0
        rows.append(vi[unk])
        cols.append(p[unk])
        vals.append(np.full(int(unk.sum()), -w))
        np.add.at(b, vi[~unk], w * x[:, nb[~unk]].T)
    r = np.concatenate(rows + [np.arange(n)])
    cc = np.concatenate(cols + [np.arange(n)])
    vv = np.concatenate(vals + [deg])
    return sparse.csr_matrix((vv, (r, cc)), shape=(n, n)), b


@dataclass
class RoadResult:
    """ROAD scores of ``M`` maps.

    Attributes:
        percentiles: ``[P]`` removed percentages.
        morf: ``[M, P]`` score after removing the most relevant p% (lower is better), mean over the tie draws.
        lerf: ``[M, P]`` score after removing the least relevant p% (higher is better), mean over the tie draws.
        score: unperturbed score (scalar tensor).
        combined: ``[M]`` ``mean_p (lerf - morf) / 2`` (higher is better; equal to the mean of
            ``(Delta_LeRF - Delta_MoRF) / 2`` with ``Delta = s_p - s_0``). NaN for a constant map or an empty ROI.
        tied_fraction: ``[M]`` fraction of voxels sharing their value with another voxel.
        ties, tie_draws, stencil: tie-breaking rule, number of draws averaged, imputation stencil.
    """

    percentiles: torch.Tensor
    morf: torch.Tensor
    lerf: torch.Tensor
    score: torch.Tensor
    combined: torch.Tensor
    tied_fraction: torch.Tensor | None = None
    ties: str = "random"
    tie_draws: int = 1
    stencil: str = "rong"


def road(
    image: torch.Tensor,
    saliency: torch.Tensor,
    score_fn: ScoreFn,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    noise: float = 0.01,
    seed: int = 0,
    batch_size: int = 8,
    spatial_dims: int = 3,
    solver: Literal["auto", "direct", "cg"] = "auto",
    stencil: Stencil = "rong",
    noise_scale: Literal["std", "absolute"] = "std",
    ties: Ties = "random",
    tie_draws: int = 3,
) -> RoadResult:
    """ROAD (Rong et al. 2022) in 3D: MoRF / LeRF scores with noisy linear imputation and the combined score.

    For each percentage ``p``, remove the ``round(p V / 100)`` most (MoRF) or least (LeRF) relevant voxels (map
    order; ties broken at random and averaged over ``tie_draws`` draws, or by voxel index with ``ties="index"``),
    impute them with :func:`noisy_linear_imputation`, score the batch with ``score_fn``.
    ``combined = mean_p (s_LeRF(p) - s_MoRF(p)) / 2``. Removal sets that no tie order changes are imputed once.

    Args:
        image: ``[Cin, *S]`` or ``[1, Cin, *S]``; saliency: ``[*S]`` or ``[M, *S]``.
        score_fn: batched score ``[N, Cin, *S] -> [N]``.
        percentiles: removed percentages in (0, 100); default 10, 20, ..., 90 (the paper's).
        noise, noise_scale, stencil, solver: imputation settings (see :func:`noisy_linear_imputation`).
        seed: seed of the noise and of the tie-breaking permutations.
    Returns:
        :class:`RoadResult`.
    """
    image, sal = _prepare(image, saliency, spatial_dims)
    pc = [float(p) for p in percentiles]
    if not pc or any(not 0 < p < 100 for p in pc):
        raise MedcamError(f"percentiles must be a non-empty list of values in (0, 100), got {list(percentiles)}")
    _check_ties(ties, tie_draws)
    stencil_weights(spatial_dims, stencil)  # validates the stencil before any work
    draws = int(tie_draws) if ties == "random" else 1
    m, v = sal.shape[0], sal[0].numel()
    tf = tied_fraction(sal)
    meta = dict(tied_fraction=tf, ties=ties, tie_draws=draws, stencil=stencil)
    pct = torch.tensor(pc, device=image.device)
    const = _check_orderable(sal, "ROAD")
    nan = torch.full((m, len(pc)), math.nan, device=image.device)
    if _empty_roi(score_fn, "ROAD"):
        s0 = torch.tensor(math.nan, device=image.device)
        return RoadResult(pct, nan.clone(), nan.clone(), s0, nan[:, 0].clone(), **meta)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(int(seed))
    tie_gen = torch.Generator().manual_seed(int(seed) + 1)
    ranks = [voxel_ranks(sal, ties, tie_gen) for _ in range(draws)]
    counts = torch.tensor([int(round(p * v / 100.0)) for p in pc])
    split_morf = _cuts_in_ties(sal, counts) if draws > 1 else torch.zeros(m, len(pc), dtype=torch.bool)
    split_lerf = _cuts_in_ties(sal, v - counts) if draws > 1 else torch.zeros(m, len(pc), dtype=torch.bool)
    spatial = tuple(image.shape[1:])
    vols: list[torch.Tensor] = [image.float()]
    keys: list[tuple[int, int, int]] = []  # (map, direction 0 = MoRF / 1 = LeRF, percentile index)
    for i in range(m):
        if bool(const[i]):
            continue
        for di, split in enumerate((split_morf, split_lerf)):
            for j, n in enumerate(counts.tolist()):
                for d in range(draws if bool(split[i, j]) else 1):
                    rem = ranks[d][i] < n if di == 0 else ranks[d][i] >= v - n
                    vols.append(noisy_linear_imputation(image, rem.reshape(spatial), noise, gen, solver, stencil=stencil, noise_scale=noise_scale))  # fmt: skip
                    keys.append((i, di, j))
    scores = []
    for j in range(0, len(vols), batch_size):
        scores.append(score_fn(torch.stack(vols[j : j + batch_size])).reshape(-1).float().to(image.device))
    s = torch.cat(scores)
    total = torch.zeros(m, 2, len(pc), device=image.device)
    cnt = torch.zeros(m, 2, len(pc), device=image.device)
    for (i, di, j), sv in zip(keys, s[1:]):
        total[i, di, j] += sv
        cnt[i, di, j] += 1
    rest = torch.where(cnt > 0, total / cnt.clamp_min(1), torch.full_like(total, math.nan))
    morf, lerf = rest[:, 0], rest[:, 1]
    return RoadResult(pct, morf, lerf, s[0], ((lerf - morf) / 2).mean(1), **meta)  # type: ignore[arg-type]
