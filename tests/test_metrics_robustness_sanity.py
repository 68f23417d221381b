"""Similarity measures, cascading randomisation, robustness to noise and the method consensus."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from medcam.errors import MedcamError
from medcam.metrics import (
    add_noise,
    cascading_randomization,
    consensus,
    pearson,
    rankdata,
    robustness,
    spearman,
    ssim,
    top_k_masks,
)


def test_rankdata_and_spearman_match_scipy_with_ties():
    from scipy.stats import rankdata as sp_rank
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a = np.maximum(rng.normal(size=(3, 4, 5, 6)), 0)  # ReLU maps: many tied zeros
    b = np.maximum(a + rng.normal(scale=0.5, size=a.shape), 0)
    ta, tb = torch.from_numpy(a).float(), torch.from_numpy(b).float()
    assert np.allclose(rankdata(ta.reshape(3, -1)).numpy(), np.stack([sp_rank(r) for r in a.reshape(3, -1)]))
    got = spearman(ta, tb)
    exp = [spearmanr(a[i].ravel(), b[i].ravel()).statistic for i in range(3)]
    assert np.allclose(got.numpy(), exp, atol=1e-5)
    assert np.allclose(
        pearson(ta, tb).numpy(), [np.corrcoef(a[i].ravel(), b[i].ravel())[0, 1] for i in range(3)], atol=1e-5
    )
    assert spearman(torch.ones(1, 3, 3, 3), ta[:1, :3, :3, :3]).item() == 0.0  # dead map: see the next test


def test_constant_maps_follow_the_documented_convention():
    g = torch.Generator().manual_seed(0)
    live = torch.zeros(2, 9, 9, 9)
    live[:, 2:6, 3:7, 1:5] = torch.rand(2, 4, 4, 4, generator=g) + 0.1  # sparse ReLU-like maps
    dead = torch.zeros(2, 9, 9, 9)
    const = torch.full((2, 9, 9, 9), 0.1)  # constant but not zero; float mean residuals must not matter
    for fn in (spearman, pearson, ssim):
        # exactly one constant map: 0 (the map changed completely), both constant: 1 (same up to intensity)
        assert fn(dead, live).tolist() == [0.0, 0.0] and fn(live, const).tolist() == [0.0, 0.0], fn
        assert fn(dead, const).tolist() == [1.0, 1.0] and fn(dead, dead).tolist() == [1.0, 1.0], fn
        assert torch.isnan(fn(dead, live, constant="nan")).all() and torch.isnan(fn(dead, dead, constant="nan")).all()
        assert fn(live, live).tolist() == pytest.approx([1.0, 1.0])  # untouched for non-constant maps
        with pytest.raises(MedcamError, match="constant"):
            fn(dead, live, constant="zero")
    # mixed batch: only the constant row is replaced
    mixed = torch.stack([live[0], dead[0]])
    assert spearman(live, mixed).tolist() == pytest.approx([1.0, 0.0])
    # why SSIM needs the convention: the shared zero background alone would make a dead map look similar
    from monai.metrics.regression import compute_ssim_and_cs

    sparse = torch.zeros(1, 16, 16, 16)
    sparse[:, :4, :4, :4] = torch.rand(4, 4, 4, generator=g) + 0.5
    sparse /= sparse.max()
    zero = torch.zeros_like(sparse)[:, None]
    raw, _ = compute_ssim_and_cs(zero, sparse[:, None], 3, [7] * 3, [1.5] * 3, 1.0, "uniform")
    assert raw.mean().item() > 0.5 and ssim(torch.zeros_like(sparse), sparse).item() == 0.0


def test_ssim_matches_skimage():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(1)
    a = rng.random((2, 9, 10, 11))
    b = np.clip(a + 0.3 * rng.random(a.shape), 0, None)
    got = ssim(torch.from_numpy(a), torch.from_numpy(b))
    na = (a - a.min(axis=(1, 2, 3), keepdims=True)) / np.ptp(a.reshape(2, -1), axis=1).reshape(2, 1, 1, 1)
    nb = (b - b.min(axis=(1, 2, 3), keepdims=True)) / np.ptp(b.reshape(2, -1), axis=1).reshape(2, 1, 1, 1)
    exp = [structural_similarity(na[i], nb[i], data_range=1.0, win_size=7) for i in range(2)]
    assert np.allclose(got.numpy(), exp, atol=1e-4)
    with pytest.raises(MedcamError, match="win_size"):
        ssim(torch.rand(1, 5, 5, 5), torch.rand(1, 5, 5, 5))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv3d(4, 4, 3, padding=1)
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x):
        return self.head(self.act(self.conv2(self.act(self.conv1(x)))))


def _grad_x_input(model, x):
    xg = x.clone().requires_grad_(True)
    model(xg)[:, 1].sum().backward()
    return (xg.grad * x).abs()[:, 0]


def test_cascading_randomization_order_similarity_and_no_mutation():
    torch.manual_seed(0)
    model = _Net().eval()
    x = torch.randn(1, 1, 8, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.get_rng_state()
    res = cascading_randomization(model, lambda m: _grad_x_input(m, x), seed=1, keep_maps=True)
    assert res.layers == ["head", "conv2", "conv1"]  # reverse execution order
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng_before)
    sp = res.similarity["spearman"]
    assert sp.shape == (4, 1) and res.similarity["ssim"].shape == (4, 1)
    assert sp[0].item() == pytest.approx(1.0)
    assert sp[-1].item() < 0.9  # all weights random: the gradient map must change
    # the step-i map is that of a model with the last i layers re-initialised: recompute it independently
    assert torch.allclose(spearman(res.maps[0], res.maps[-1]), sp[-1])
    # a "method" that ignores the model (the image itself) fails the check: similarity stays 1
    bad = cascading_randomization(model, lambda m: x[:, 0].abs(), layers=["head", "conv1"])
    assert bad.layers == ["head", "conv1"]
    assert torch.allclose(bad.similarity["spearman"], torch.ones(3, 1))
    with pytest.raises(MedcamError, match="not modules"):
        cascading_randomization(model, lambda m: x[:, 0], layers=["nope"])


def test_cascading_randomization_flags_dead_maps_and_thins_steps(caplog):
    torch.manual_seed(0)
    model = _Net().eval()
    x = torch.randn(1, 1, 8, 8, 8)
    w_head = model.head.weight.detach().clone()

    def dies_when_head_random(m):  # a "method" whose map is dead (all zero) once the head is re-initialised
        live = _grad_x_input(m, x)
        return live if torch.equal(m.head.weight, w_head) else torch.zeros_like(live)

    res = cascading_randomization(model, dies_when_head_random, seed=1)
    assert res.steps == [0, 1, 2, 3]
    assert res.constant.reshape(-1).tolist() == [False, True, True, True]
    for meas in ("spearman", "ssim"):
        assert res.similarity[meas].reshape(-1).tolist()[1:] == [0.0, 0.0, 0.0]  # not NaN: no silent nanmean drop
    # max_steps: every layer is still randomised in cascade, maps only at evenly spaced steps (last included)
    thin = cascading_randomization(model, lambda m: _grad_x_input(m, x), seed=1, max_steps=2, keep_maps=True)
    full = cascading_randomization(model, lambda m: _grad_x_input(m, x), seed=1, keep_maps=True)
    assert thin.steps == [0, 2, 3] and thin.layers == full.layers and len(thin.maps) == 3
    assert torch.allclose(thin.maps[1], full.maps[2]) and torch.allclose(thin.maps[2], full.maps[3])
    with pytest.raises(MedcamError, match="max_steps"):
        cascading_randomization(model, lambda m: _grad_x_input(m, x), max_steps=0)
    # a dead ORIGINAL map makes the test uninformative: flagged and warned about
    with caplog.at_level("WARNING", logger="medcam.metrics.sanity"):
        d = cascading_randomization(model, lambda m: torch.zeros(1, 8, 8, 8), layers=["head"])
    assert d.constant.reshape(-1).tolist() == [True, True] and "uninformative" in caplog.text
    assert d.similarity["spearman"].reshape(-1).tolist() == [1.0, 1.0]


def test_add_noise_strengths():
    g = torch.Generator().manual_seed(0)
    img = torch.zeros(1, 2, 20, 20, 20)
    img[:, :, 5:15] = torch.randn(1, 2, 10, 20, 20, generator=g) * 3 + 10
    level = img[0, 1][img[0, 1] != 0].abs().mean()  # foreground mean, about 10
    n = add_noise(img, 0.1, "gaussian", generator=g) - img
    assert n[0, 1].std().item() == pytest.approx(0.1 * level.item(), rel=0.05)
    zero = torch.zeros(1, 1, 30, 30, 30)
    r = add_noise(zero, 2.0, "rician", relative=False, generator=g)
    assert r.mean().item() == pytest.approx(2.0 * math.sqrt(math.pi / 2), rel=0.03)  # Rayleigh mean
    assert (r >= 0).all()
    with pytest.raises(MedcamError, match="kind"):
        add_noise(img, 0.1, "poisson")


def test_robustness_consistency_and_responsiveness():
    torch.manual_seed(0)
    img = torch.zeros(1, 1, 10, 10, 10)
    img[:, :, 3:7, 3:7, 3:7] = 1.0

    def seg_fn(x):
        return x[:, 0] > 0.5

    def map_fn(x):
        return x[:, 0].clamp_min(0)

    res = robustness(img, map_fn, seg_fn, sigmas=(0.0, 0.3, 2.0), repeats=2, tau=0.9, seed=0)
    assert len(res.records) == 6
    r0 = res.records[0]
    assert r0["dice"] == 1.0 and r0["similarity"] == pytest.approx(1.0) and r0["stable"]
    # recompute the summaries from the records independently
    stable = [r["similarity"] for r in res.records if r["dice"] >= 0.9]
    unstable = [1 - r["similarity"] for r in res.records if r["dice"] < 0.9]
    assert unstable, "sigma = 2 must change the segmentation"
    assert res.consistency == pytest.approx(np.mean(stable))
    assert res.responsiveness == pytest.approx(np.mean(unstable))
    assert res.per_sigma[0.0]["consistency"] == pytest.approx(1.0)
    assert math.isnan(res.per_sigma[0.0]["responsiveness"])
    # the dice of a record is that of the seeded noisy image: reproduce record 2 (sigma 0.3, repeat 0)
    g = torch.Generator().manual_seed(0)
    add_noise(img, 0.0, generator=g), add_noise(img, 0.0, generator=g)
    xn = add_noise(img, 0.3, generator=g)
    a, b = seg_fn(img), seg_fn(xn)
    assert res.records[2]["dice"] == pytest.approx(2 * (a & b).sum().item() / (a.sum() + b.sum()).item())
    with pytest.raises(MedcamError, match="tau"):
        robustness(img, map_fn, seg_fn, tau=1.5)


def test_top_k_and_consensus_hand_values():
    maps = torch.tensor(
        [
            [4.0, 3.0, 2.0, 1.0, 0.0],
            [0.0, 3.0, 4.0, 1.0, 2.0],
            [4.0, 0.0, 3.0, 1.0, 2.0],
        ]
    ).reshape(3, 1, 1, 5)
    tk = top_k_masks(maps, 40)  # top 2 of 5
    assert tk.reshape(3, 5).int().tolist() == [[1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [1, 0, 1, 0, 0]]
    c = consensus(maps, top_percent=40)  # majority = 2 votes
    assert c.votes.flatten().tolist() == [2, 2, 2, 0, 0]
    assert c.mask.flatten().tolist() == [True, True, True, False, False]
    # meta = mean of min-max maps on the consensus: voxel 0 -> (1 + 0 + 1)/3
    assert c.meta_map.flatten()[0].item() == pytest.approx(2 / 3)
    assert c.meta_map.flatten()[3].item() == 0.0
    assert consensus(maps, 40, min_votes=3).mask.sum().item() == 0
    with pytest.raises(MedcamError, match="several methods"):
        consensus(maps[:1], 40)


# ---- issue 16: frozen targets, truthful messages ------------------------------------------------------------------


def test_freeze_targets_fix_the_trained_region():
    from medcam import targets as T
    from medcam.metrics import freeze_targets

    out = torch.randn(1, 3, 5, 6, 7)
    tl = [T.PredictedROI(1), T.ClassROI(2), T.ContrastROI(1, 2, 0.5, region=T.PredictedROI(1))]
    fz = freeze_targets(tl, out)
    assert isinstance(fz[0], T.MaskROI) and isinstance(fz[1], T.MaskROI) and isinstance(fz[2], T.ContrastROI)
    other = torch.randn(1, 3, 5, 6, 7)  # a different (randomised) model's output
    for t, f in zip(tl, fz):
        assert torch.equal(f.score_weights(other), t.score_weights(out))  # frozen: independent of the new output
    assert not torch.equal(tl[0].score_weights(other), tl[0].score_weights(out))


def test_cascading_randomization_frozen_roi_identical_across_the_cascade():
    import medcam
    from medcam import targets as T

    torch.manual_seed(0)
    model = _Net().eval()
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        trained_roi = (torch.sigmoid(model(x)[:, 1]) > 0.5).float()
    assert 0 < trained_roi.sum() < trained_roi.numel()
    seen = []

    def map_fn(m, tl):
        with torch.no_grad():
            seen.append(tl[0].roi(m(x)).clone())  # the region this step explains
        return medcam.SegHiResGradCAM(m, "conv2")(x, tl)[0, 0]

    res = cascading_randomization(model, map_fn, targets=[T.PredictedROI(1)], image=x, seed=1, keep_maps=True)
    assert len(seen) == 4 and all(torch.equal(r, trained_roi) for r in seen)
    assert isinstance(res.frozen_targets[0], T.MaskROI)
    # without freezing, the randomised models re-predict (move) the region: what the frozen protocol prevents
    moved = []

    def drifting(m):
        with torch.no_grad():
            moved.append(T.PredictedROI(1).roi(m(x)))
        return medcam.SegHiResGradCAM(m, "conv2")(x, [T.PredictedROI(1)])[0, 0]

    cascading_randomization(model, drifting, seed=1)
    assert not all(torch.equal(r, trained_roi) for r in moved[1:])
    # the step-3 map equals an independent recomputation: same re-initialisation, trained model's region as a mask
    import copy

    net = copy.deepcopy(model)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        for name in ("head", "conv2", "conv1"):
            getattr(net, name).reset_parameters()
    ref = medcam.SegHiResGradCAM(net, "conv2")(x, [T.MaskROI(trained_roi, 1)])[0, 0]
    assert torch.allclose(res.maps[-1], ref, atol=1e-6)
    with pytest.raises(MedcamError, match="both targets= and image="):
        cascading_randomization(model, map_fn, targets=[T.PredictedROI(1)])


def test_cascading_randomization_says_what_happened_when_map_fn_ignores_the_model(caplog):
    torch.manual_seed(0)
    model = _Net().eval()
    x = torch.randn(1, 1, 8, 8, 8)
    # map_fn captures the user's model instead of using the copy it is given
    with pytest.raises(MedcamError, match="ran the original model, not the model it was given"):
        cascading_randomization(model, lambda m: _grad_x_input(model, x))
    with pytest.raises(MedcamError, match="ran the original model"):
        cascading_randomization(model, lambda m: _grad_x_input(model, x), layers=["head"])
    # map_fn never runs any model
    with pytest.raises(MedcamError, match="ran none of the parametrised modules") as e:
        cascading_randomization(model, lambda m: x[:, 0].abs())
    assert "no parameters" not in str(e.value) and "layers=" in str(e.value)
    # the model really has no parameters
    with pytest.raises(MedcamError, match="no parameters to randomise"):
        cascading_randomization(nn.ReLU(), lambda m: m(x[:, 0]))
    # explicit layers and a deliberately model-independent map: allowed, with a warning
    with caplog.at_level("WARNING", logger="medcam.metrics.sanity"):
        cascading_randomization(model, lambda m: x[:, 0].abs(), layers=["head"])
    assert "does not run the model" in caplog.text


def test_cascading_randomization_frozen_needs_a_two_argument_map_fn():
    from medcam import targets as T

    model = _Net().eval()
    x = torch.randn(1, 1, 8, 8, 8)
    with pytest.raises(MedcamError, match="two arguments"):
        cascading_randomization(model, lambda m: _grad_x_input(m, x), targets=[T.PredictedROI(1)], image=x)
