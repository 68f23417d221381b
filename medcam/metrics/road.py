"""ROAD in 3D: RemOve And Debias (Rong et al. 2022) with noisy linear imputation on the 6-neighbourhood.

Imputation: the removed voxels ``R`` are filled so that each equals the mean of its in-volume face neighbours
(6 in 3D, ``2 d`` in d dims, equal weights 1/6; the paper's 2D weights 1/6 edge / 1/12 diagonal are for the
8-neighbourhood), kept voxels ``K`` acting as boundary values. For every channel this is one sparse linear system

    deg(u) x_u - sum_{v in N(u) n R} x_v = sum_{v in N(u) n K} x_v,     u in R,

i.e. ``L_RR x_R = -L_RK x_K`` with ``L`` the graph Laplacian of the voxel grid: symmetric positive definite on every
connected component of ``R`` that touches ``K``. Components of ``R`` without a kept neighbour (e.g. everything
removed) have no boundary data and are set to the channel mean of the kept voxels (0 if nothing is kept). At the
volume border the missing neighbours are simply absent (a zero-flux boundary): a linear field is reproduced exactly
on removed voxels whose neighbours are all inside the volume. Gaussian noise of std ``noise * std(channel)`` is then
added to the imputed voxels only (``noise = 0.01`` on standardised images is the paper's setting).

The system is built and solved on the CPU with scipy.sparse (direct LU factorisation shared by all channels for up to
``direct_max`` unknowns, conjugate gradients above); the result goes back to the input's device.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..errors import MedcamError
from .faithfulness import ScoreFn, _prepare, voxel_ranks

__all__ = ["noisy_linear_imputation", "RoadResult", "road"]

logger = logging.getLogger(__name__)


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
) -> torch.Tensor:
    """Fill the removed voxels of one volume by noisy linear imputation (see the module docstring for the system).

    Args:
        image: ``[Cin, *S]`` (any number of spatial dims >= 1).
        removed: bool ``[*S]``, True where the voxel is removed (all channels).
        noise: noise std as a fraction of each channel's standard deviation (0 for pure linear imputation).
        generator: torch generator for the noise (CPU), for reproducibility.
        solver: ``"direct"`` (sparse LU), ``"cg"`` (Jacobi-preconditioned conjugate gradients) or ``"auto"``.
    Returns:
        ``[Cin, *S]`` float32 on ``image.device``; kept voxels are bit-identical to ``image``.
    """
    from scipy import ndimage, sparse

    if not isinstance(image, torch.Tensor) or not isinstance(removed, torch.Tensor):
        raise MedcamError("image and removed must be torch tensors")
    if removed.ndim != image.ndim - 1 or tuple(removed.shape) != tuple(image.shape[1:]):
        raise MedcamError(
            f"removed {tuple(removed.shape)} must have the image's spatial shape {tuple(image.shape[1:])}"
        )
    if noise < 0:
        raise MedcamError(f"noise must be >= 0, got {noise}")
    if solver not in ("auto", "direct", "cg"):
        raise MedcamError(f"solver must be 'auto', 'direct' or 'cg', got {solver!r}")
    out = image.detach().float().clone()
    rem = removed.detach().cpu().numpy().astype(bool)
    if not rem.any():
        return out
    shape = rem.shape
    nd = rem.ndim
    x = image.detach().cpu().double().numpy().reshape(image.shape[0], -1)  # [Cin, V]
    remf = rem.ravel()
    keptf = ~remf
    struct = ndimage.generate_binary_structure(nd, 1)
    labels, _ = ndimage.label(rem, structure=struct)
    touching = ndimage.binary_dilation(~rem, structure=struct) & rem
    ok_labels = np.unique(labels[touching])
    solv = np.isin(labels.ravel(), ok_labels) & remf
    isolated = remf & ~solv
    filled = np.zeros((x.shape[0], remf.size))
    if isolated.any():
        fill = x[:, keptf].mean(1) if keptf.any() else np.zeros(x.shape[0])
        filled[:, isolated] = fill[:, None]
        logger.debug("ROAD imputation: %d removed voxels have no kept neighbour; set to the kept mean", isolated.sum())
    u_idx = np.flatnonzero(solv)
    n = u_idx.size
    if n:
        pos = np.full(remf.size, -1, dtype=np.int64)
        pos[u_idx] = np.arange(n)
        coords = np.unravel_index(u_idx, shape)
        strides = [int(np.prod(shape[a + 1 :])) for a in range(nd)]
        deg = np.zeros(n)
        rows, cols = [], []
        b = np.zeros((n, x.shape[0]))
        for a in range(nd):
            for d in (-1, 1):
                c = coords[a] + d
                valid = (c >= 0) & (c < shape[a])
                vi = np.flatnonzero(valid)
                nb = u_idx[vi] + d * strides[a]
                deg[vi] += 1
                p = pos[nb]
                unk = p >= 0
                rows.append(vi[unk])
                cols.append(p[unk])
                np.add.at(b, vi[~unk], x[:, nb[~unk]].T)
        r = np.concatenate(rows + [np.arange(n)])
        cc = np.concatenate(cols + [np.arange(n)])
        vals = np.concatenate([-np.ones(r.size - n), deg])
        a_mat = sparse.csr_matrix((vals, (r, cc)), shape=(n, n))
        sol = _solve(a_mat, b, solver, direct_max, rtol)  # [n, Cin]
        filled[:, u_idx] = sol.T
    vals_t = torch.from_numpy(filled[:, remf]).float()
    if noise > 0:
        std = torch.from_numpy(x.std(1)).float()
        eps = torch.randn(vals_t.shape, generator=generator, dtype=torch.float32)
        vals_t = vals_t + noise * std[:, None] * eps
    mask_t = torch.from_numpy(remf).to(out.device)
    flat = out.reshape(out.shape[0], -1)
    flat[:, mask_t] = vals_t.to(out.device)
    return flat.reshape(out.shape)


@dataclass
class RoadResult:
    """ROAD scores of ``M`` maps.

    Attributes:
        percentiles: ``[P]`` removed percentages.
        morf: ``[M, P]`` score after removing the most relevant p% (lower is better).
        lerf: ``[M, P]`` score after removing the least relevant p% (higher is better).
        score: unperturbed score (scalar tensor).
        combined: ``[M]`` ``mean_p (lerf - morf) / 2`` (higher is better; equal to the mean of
            ``(Delta_LeRF - Delta_MoRF) / 2`` with ``Delta = s_p - s_0``).
    """

    percentiles: torch.Tensor
    morf: torch.Tensor
    lerf: torch.Tensor
    score: torch.Tensor
    combined: torch.Tensor


def road(
    image: torch.Tensor,
    saliency: torch.Tensor,
    score_fn: ScoreFn,
    percentiles: Sequence[float] = (10, 20, 30, 40, 50, 60, 70, 80, 90),
    noise: float = 0.01,
    seed: int = 0,
    batch_size: int = 8,
    spatial_dims: int = 3,
    solver: Literal["auto", "direct", "cg"] = "auto",
) -> RoadResult:
    """ROAD (Rong et al. 2022) in 3D: MoRF / LeRF scores with noisy linear imputation and the combined score.

    For each percentage ``p``, remove the ``round(p V / 100)`` most (MoRF) or least (LeRF) relevant voxels (map
    order, ties by voxel index), impute them with :func:`noisy_linear_imputation`, score the batch with
    ``score_fn``. ``combined = mean_p (s_LeRF(p) - s_MoRF(p)) / 2``.

    Args:
        image: ``[Cin, *S]`` or ``[1, Cin, *S]``; saliency: ``[*S]`` or ``[M, *S]``.
        score_fn: batched score ``[N, Cin, *S] -> [N]``.
        percentiles: removed percentages in (0, 100).
        noise: imputation noise (fraction of the channel std); seed: noise seed.
    Returns:
        :class:`RoadResult`.
    """
    image, sal = _prepare(image, saliency, spatial_dims)
    pc = [float(p) for p in percentiles]
    if not pc or any(not 0 < p < 100 for p in pc):
        raise MedcamError(f"percentiles must be a non-empty list of values in (0, 100), got {list(percentiles)}")
    gen = torch.Generator().manual_seed(int(seed))
    ranks = voxel_ranks(sal)
    m, v = ranks.shape
    spatial = tuple(image.shape[1:])
    vols: list[torch.Tensor] = [image.float()]
    for i in range(m):
        for direction in ("morf", "lerf"):
            for p in pc:
                n = int(round(p * v / 100.0))
                rem = ranks[i] < n if direction == "morf" else ranks[i] >= v - n
                vols.append(noisy_linear_imputation(image, rem.reshape(spatial), noise, gen, solver))
    scores = []
    for j in range(0, len(vols), batch_size):
        scores.append(score_fn(torch.stack(vols[j : j + batch_size])).reshape(-1).float().to(image.device))
    s = torch.cat(scores)
    s0, rest = s[0], s[1:].reshape(m, 2, len(pc))
    morf, lerf = rest[:, 0], rest[:, 1]
    return RoadResult(
        percentiles=torch.tensor(pc, device=image.device),
        morf=morf,
        lerf=lerf,
        score=s0,
        combined=((lerf - morf) / 2).mean(1),
    )
