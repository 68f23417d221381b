"""Noisy linear imputation (Rong et al.'s weights, 3D extension) and the ROAD score, against literal references."""

import itertools
import math

import numpy as np
import pytest
import torch

from medcam.errors import MedcamError
from medcam.metrics import make_score_fn, noisy_linear_imputation, road, stencil_weights, tied_fraction

# Rong et al. (ICML 2022), Sec. 4 / road_evaluation/road/imputations.py: 8 neighbours, 1/6 edge, 1/12 diagonal
RONG_2D = {(1, 1): 1 / 12, (0, 1): 1 / 6, (-1, 1): 1 / 12, (1, -1): 1 / 12, (0, -1): 1 / 6, (-1, -1): 1 / 12,
           (1, 0): 1 / 6, (-1, 0): 1 / 6}  # fmt: skip


def _literal_imputation(img: np.ndarray, removed: np.ndarray, weights: dict) -> np.ndarray:
    """The paper's system written out voxel by voxel with a dense solve: for each removed voxel u,
    sum_{valid o} w_o x_u - sum_{o: u+o removed} w_o x_{u+o} = sum_{o: u+o kept} w_o x_{u+o}."""
    shape = removed.shape
    idx = [tuple(c) for c in np.argwhere(removed)]
    var = {u: i for i, u in enumerate(idx)}
    a = np.zeros((len(idx), len(idx)))
    b = np.zeros((len(idx), img.shape[0]))
    for u in idx:
        i = var[u]
        for off, w in weights.items():
            v = tuple(c + o for c, o in zip(u, off))
            if not all(0 <= c < s for c, s in zip(v, shape)):
                continue  # outside the image: this weight is dropped from the voxel's total
            a[i, i] += w
            if removed[v]:
                a[i, var[v]] -= w
            else:
                b[i] += w * img[(slice(None), *v)]
    sol = np.linalg.solve(a, b)
    out = img.copy()
    for u, i in var.items():
        out[(slice(None), *u)] = sol[i]
    return out


def _linear_field(shape):
    z, y, x = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in shape), indexing="ij")
    f = torch.stack([1 + 2 * z - 3 * y + 0.5 * x, -4 + 0.25 * z + y - 2 * x])
    return f


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_imputation_reproduces_linear_field_and_keeps_voxels(solver):
    f = _linear_field((9, 10, 11))
    rem = torch.rand(9, 10, 11, generator=torch.Generator().manual_seed(0)) < 0.6
    rem[0] = rem[-1] = False
    rem[:, 0] = rem[:, -1] = False
    rem[:, :, 0] = rem[:, :, -1] = False  # removed voxels have all 6 neighbours inside the volume
    out = noisy_linear_imputation(f, rem, noise=0.0, solver=solver)
    assert torch.allclose(out, f, atol=1e-4)
    assert torch.equal(out[:, ~rem], f[:, ~rem])


def test_imputation_hand_values_border_and_isolated():
    # 1-D line [0, ?, ?, 3]: linear interpolation
    out = noisy_linear_imputation(torch.tensor([[0.0, 9.0, 9.0, 3.0]]), torch.tensor([False, True, True, False]), 0.0)
    assert torch.allclose(out, torch.tensor([[0.0, 1.0, 2.0, 3.0]]))
    # 2-D 3x3, centre removed: 1/6 of each edge neighbour + 1/12 of each diagonal one (Rong et al.)
    img = torch.arange(9.0).reshape(1, 3, 3)
    img[0, 1, 1] = 100.0
    rem = torch.zeros(3, 3, dtype=torch.bool)
    rem[1, 1] = True
    out = noisy_linear_imputation(img, rem, 0.0)
    assert out[0, 1, 1].item() == pytest.approx((1 + 3 + 5 + 7) / 6 + (0 + 2 + 6 + 8) / 12)
    assert noisy_linear_imputation(img, rem, 0.0, stencil="faces")[0, 1, 1].item() == pytest.approx(4.0)
    # border voxel: the weights of the neighbours that exist, renormalised (edge 1, edge 3, diagonal 100)
    rem = torch.zeros(3, 3, dtype=torch.bool)
    rem[0, 0] = True
    want = (1 / 6 + 3 / 6 + 100 / 12) / (1 / 6 + 1 / 6 + 1 / 12)
    assert noisy_linear_imputation(img, rem, 0.0)[0, 0, 0].item() == pytest.approx(want)
    # everything removed: no boundary data -> kept mean, here nothing kept -> 0
    assert noisy_linear_imputation(img, torch.ones(3, 3, dtype=torch.bool), 0.0).abs().sum() == 0


def test_imputation_noise_only_on_removed_voxels():
    f = _linear_field((8, 8, 8))
    rem = torch.zeros(8, 8, 8, dtype=torch.bool)
    rem[2:6, 2:6, 2:6] = True
    clean = noisy_linear_imputation(f, rem, 0.0)
    noisy = noisy_linear_imputation(f, rem, 0.05, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy[:, ~rem], f[:, ~rem])
    resid = (noisy - clean)[:, rem]
    std = f.flatten(1).std(1)
    ratio = resid.std(1) / (0.05 * std)
    assert torch.all((ratio > 0.8) & (ratio < 1.2))


def test_road_hand_value():
    img = torch.tensor([1.0, 5.0, 1.0, 1.0, 1.0]).reshape(1, 1, 1, 5)
    sal = img[0].clone()
    r = road(img, sal, lambda x: x.flatten(1).sum(1), percentiles=(20, 40), noise=0.0, ties="index")
    # MoRF removes the 5 (imputed 1) -> 5; LeRF removes trailing ones (imputed 1) -> 9
    assert r.score.item() == 9.0
    assert r.morf.tolist() == [[5.0, 5.0]]
    assert r.lerf.tolist() == [[9.0, 9.0]]
    assert r.combined.item() == pytest.approx(2.0)
    with pytest.raises(MedcamError, match="percentiles"):
        road(img, sal, lambda x: x.flatten(1).sum(1), percentiles=(0, 50))


def test_road_prefers_true_contribution_on_linear_model():
    torch.manual_seed(0)
    model = torch.nn.Conv3d(1, 1, 3, padding=1, bias=False).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    xg = x.clone().requires_grad_(True)
    model(xg).sum().backward()
    contrib = (xg.grad * x)[0, 0]
    rand = torch.rand(8, 8, 8, generator=torch.Generator().manual_seed(3))

    def fn(v):
        with torch.no_grad():
            return model(v).flatten(1).sum(1)

    r = road(x, torch.stack([contrib, rand]), fn, percentiles=(20, 50, 80), noise=0.0)
    assert r.combined[0] > r.combined[1]


def test_stencil_weights_are_rongs_in_2d_and_inverse_square_distance_in_3d():
    w2 = dict(stencil_weights(2))
    assert set(w2) == set(RONG_2D) and all(w2[o] == pytest.approx(RONG_2D[o]) for o in RONG_2D)
    w3 = dict(stencil_weights(3))
    assert len(w3) == 26 and sum(w3.values()) == pytest.approx(1.0)
    by_kind = {k: {round(w3[o], 12) for o in w3 if sum(map(abs, o)) == k} for k in (1, 2, 3)}
    assert by_kind == {1: {round(3 / 44, 12)}, 2: {round(3 / 88, 12)}, 3: {round(1 / 44, 12)}}
    # symmetric, hence zero first moment: what makes a linear field an exact solution
    assert np.allclose(sum(w * np.array(o) for o, w in w3.items()), 0.0)
    assert dict(stencil_weights(1)) == {(-1,): 0.5, (1,): 0.5}


def test_imputation_2d_matches_literal_paper_system():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(2, 12, 13))
    rem = rng.random((12, 13)) < 0.5
    rem[0, :4] = True  # border voxels too
    ours = noisy_linear_imputation(torch.from_numpy(img).float(), torch.from_numpy(rem), noise=0.0, solver="direct")
    ref = _literal_imputation(img, rem, RONG_2D)
    assert np.allclose(ours.numpy(), ref, atol=1e-5)


def test_imputation_3d_matches_literal_26_neighbour_system():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(1, 6, 7, 5))
    rem = rng.random((6, 7, 5)) < 0.4
    w3 = {o: 1.0 / sum(c * c for c in o) for o in itertools.product((-1, 0, 1), repeat=3) if any(o)}
    ref = _literal_imputation(img, rem, w3)  # unnormalised weights: the solution is the same
    for solver in ("direct", "cg"):
        ours = noisy_linear_imputation(torch.from_numpy(img).float(), torch.from_numpy(rem), 0.0, solver=solver)
        assert np.allclose(ours.numpy(), ref, atol=1e-4)


@pytest.mark.parametrize("stencil", ["rong", "faces"])
def test_imputation_reproduces_linear_field_3d_both_stencils(stencil):
    f = _linear_field((7, 8, 9))
    rem = torch.zeros(7, 8, 9, dtype=torch.bool)
    rem[1:-1, 1:-1, 1:-1] = torch.rand(5, 6, 7, generator=torch.Generator().manual_seed(2)) < 0.8
    out = noisy_linear_imputation(f, rem, noise=0.0, stencil=stencil)
    assert torch.allclose(out, f, atol=1e-4)
    assert not torch.allclose(noisy_linear_imputation(f**2, rem, noise=0.0, stencil=stencil), f**2, atol=1e-2)


def test_imputation_noise_scales():
    f = _linear_field((8, 8, 8)) * 10
    rem = torch.zeros(8, 8, 8, dtype=torch.bool)
    rem[2:6, 2:6, 2:6] = True
    clean = noisy_linear_imputation(f, rem, 0.0)
    noisy = noisy_linear_imputation(f, rem, 0.5, generator=torch.Generator().manual_seed(0), noise_scale="absolute")
    resid = (noisy - clean)[:, rem]
    assert torch.all((resid.std(1) > 0.4) & (resid.std(1) < 0.6))  # absolute: independent of the channel's std


def _road_sum_expectation(img, sal, pc):
    """Exact expectation of ROAD with a sum score over every order of the tied voxels (noise 0), by enumeration."""
    x = img.reshape(-1).numpy()
    v = sal.reshape(-1).numpy()
    out: dict = {"morf": [], "lerf": [], "morf_sd": [], "lerf_sd": []}
    perms = list(itertools.permutations(range(v.size)))
    valid = [p for p in perms if all(v[p[i]] >= v[p[i + 1]] for i in range(v.size - 1))]  # map orders
    for p_ in pc:
        n = int(round(p_ * v.size / 100))
        for name, pick in (("morf", lambda o, n=n: o[:n]), ("lerf", lambda o, n=n: o[v.size - n :])):
            vals = []
            for o in valid:
                rem = np.zeros(v.size, dtype=bool)
                rem[list(pick(o))] = True
                filled = _literal_imputation(x[None], rem, {(-1,): 0.5, (1,): 0.5}) if rem.any() else x[None]
                vals.append(filled.sum())
            out[name].append(np.mean(vals))
            out[name + "_sd"].append(np.std(vals))
    return out


def test_road_random_ties_average_to_the_expectation_and_report_ties(caplog):
    img = torch.tensor([2.0, 5.0, 1.0, 3.0, 7.0]).reshape(1, 1, 1, 5)
    sal = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]).reshape(1, 1, 5)  # a ReLU-like map: 4 tied zeros
    pc = (20, 40, 60)
    ref = _road_sum_expectation(img[0], sal, pc)
    r = road(img, sal, lambda x: x.flatten(1).sum(1), percentiles=pc, noise=0.0, tie_draws=400, spatial_dims=3)
    assert r.tied_fraction.tolist() == [pytest.approx(0.8)]
    for name in ("morf", "lerf"):  # Monte-Carlo mean of 400 draws: within 4 standard errors of the exact expectation
        err = np.abs(getattr(r, name)[0].numpy() - np.array(ref[name]))
        assert np.all(err <= 4 * np.array(ref[name + "_sd"]) / math.sqrt(400) + 1e-5), (name, err)
    # raster order (the former behaviour) is one particular order, far from the expectation here
    ri = road(img, sal, lambda x: x.flatten(1).sum(1), percentiles=pc, noise=0.0, ties="index")
    assert abs(ri.lerf[0, 0].item() - ref["lerf"][0]) > 1.0
    # a constant map and an empty ROI: NaN with a warning, no number from raster order
    with caplog.at_level("WARNING", logger="medcam.metrics"):
        c = road(img, torch.zeros(1, 1, 5), lambda x: x.flatten(1).sum(1), percentiles=pc)
    assert torch.isnan(c.combined).all() and "constant" in caplog.text
    model = torch.nn.Conv3d(1, 2, 1)
    empty = make_score_fn(model, torch.zeros(2, 1, 1, 5))
    with caplog.at_level("WARNING", logger="medcam.metrics"):
        e = road(img, sal, empty, percentiles=pc)
    assert torch.isnan(e.combined).all() and "empty" in caplog.text
    assert tied_fraction(torch.tensor([[1.0, 2.0, 3.0]])).item() == 0.0


def test_road_default_percentiles_are_the_papers():
    import inspect

    from medcam.evaluation import evaluate

    grid = tuple(range(10, 100, 10))
    assert tuple(inspect.signature(road).parameters["percentiles"].default) == grid
    assert tuple(inspect.signature(evaluate).parameters["road_percentiles"].default) == grid
    r = road(torch.rand(1, 4, 4, 4), torch.rand(4, 4, 4), lambda x: x.flatten(1).sum(1), noise=0.0)
    assert r.percentiles.tolist() == [float(p) for p in grid] and not math.isnan(r.combined.item())
