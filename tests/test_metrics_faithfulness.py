"""Deletion / insertion curves, average drop / increase and the score function, against hand-computed values."""

import numpy as np
import pytest
import torch
from torch import nn

from medcam.errors import MedcamError
from medcam.metrics import (
    average_drop_increase,
    deletion_curve,
    insertion_curve,
    make_baseline,
    make_score_fn,
    perturbation_curve,
    tied_fraction,
)


def _sum_score(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(1)


IMG = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)  # [Cin=1, 1, 1, 4]
SAL = torch.tensor([0.1, 0.4, 0.3, 0.2]).reshape(1, 1, 4)  # order: voxel 1, 2, 3, 0


def test_deletion_and_insertion_hand_values():
    d = deletion_curve(IMG, SAL, _sum_score, steps=4)
    assert torch.allclose(d.fractions, torch.tensor([0, 0.25, 0.5, 0.75, 1.0]))
    assert d.scores.tolist() == [[10.0, 8.0, 5.0, 1.0, 0.0]]
    assert d.auc.item() == pytest.approx(0.25 * (9 + 6.5 + 3 + 0.5))
    i = insertion_curve(IMG, SAL, _sum_score, steps=4, protocol="baseline")
    assert i.scores.tolist() == [[0.0, 2.0, 5.0, 9.0, 10.0]]
    assert i.auc.item() == pytest.approx(0.25 * (1 + 3.5 + 7 + 9.5))
    # constant baseline 1: deletion replaces removed voxels by 1
    d1 = deletion_curve(IMG, SAL, _sum_score, steps=4, baseline=1.0)
    assert d1.scores.tolist() == [[10.0, 9.0, 7.0, 4.0, 4.0]]


def test_several_maps_are_batched_and_chunked():
    calls = []

    def fn(x):
        calls.append(x.shape[0])
        return _sum_score(x)

    sal = torch.stack([SAL, SAL.flip(-1)])
    r = perturbation_curve(IMG[None], sal, fn, steps=4, batch_size=3)
    assert r.scores.shape == (2, 5)
    assert max(calls) == 3 and sum(calls) == 10
    # flipped saliency [0.2, 0.3, 0.4, 0.1]: order voxel 2 (3), 1 (2), 0 (1), 3 (4)
    assert r.scores[1].tolist() == [10.0, 7.0, 5.0, 4.0, 0.0]


def test_make_score_fn_matches_direct_computation():
    torch.manual_seed(0)
    model = nn.Conv3d(2, 3, 3, padding=1).eval()
    x = torch.randn(5, 2, 4, 5, 6)
    w = torch.rand(1, 3, 4, 5, 6)
    fn = make_score_fn(model, w, batch_size=2)
    with torch.no_grad():
        ref = (model(x) * w).flatten(1).sum(1)
    assert torch.allclose(fn(x), ref, atol=1e-5)
    fs = make_score_fn(model, w[0], activation="sigmoid")
    with torch.no_grad():
        ref = (torch.sigmoid(model(x)) * w).flatten(1).sum(1)
    assert torch.allclose(fs(x), ref, atol=1e-5)
    with pytest.raises(MedcamError, match="does not match"):
        make_score_fn(model, torch.rand(2, 4, 5, 6))(x)
    # "none": a network ending in its own sigmoid outputs probabilities, scored as they are (RISE accepts it)
    prob_net = nn.Sequential(model, nn.Sigmoid()).eval()
    fp = make_score_fn(prob_net, w[0], activation="none", reduction="mean")
    with torch.no_grad():
        ref = (prob_net(x) * w).flatten(1).sum(1) / w.sum()
    assert torch.allclose(fp(x), ref, atol=1e-6) and fp.kind == "probability mean"
    assert torch.allclose(fp(x), make_score_fn(model, w[0], activation="sigmoid", reduction="mean")(x), atol=1e-6)
    insertion_curve(x[0], torch.rand(4, 5, 6), fp, steps=2)  # a probability score: no error


def test_linear_model_true_contribution_beats_random_maps():
    torch.manual_seed(0)
    model = nn.Conv3d(2, 2, 3, padding=1, bias=False).eval()
    x = torch.randn(1, 2, 8, 8, 8)
    w = torch.zeros(1, 2, 8, 8, 8)
    w[:, 1, 2:6, 2:6, 2:6] = 1.0  # ROI on channel 1
    xg = x.clone().requires_grad_(True)
    (model(xg) * w).sum().backward()
    contribution = (xg.grad * x).sum(1)[0]  # exact per-voxel contribution of a linear, bias-free model
    fn = make_score_fn(model, w, batch_size=16)
    # the curve at full deletion is 0 and the contributions sum to the score (linear model, baseline 0)
    assert fn(x).item() == pytest.approx(contribution.sum().item(), rel=1e-4)
    rand = torch.rand(5, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    res = deletion_curve(x, torch.cat([contribution[None], rand]), fn, steps=16)
    assert res.scores[:, -1].abs().max() < 1e-4
    assert (res.auc[0] < res.auc[1:]).all()
    ins = insertion_curve(x, torch.cat([contribution[None], rand]), fn, steps=16, protocol="baseline")
    assert (ins.auc[0] > ins.auc[1:]).all()


def test_average_drop_and_increase_hand_values():
    # score = sum(W x) with W = [1, 1, 1, 1] (map 0) -> Y = 10; L = [1, 0, .5, 0] -> O = 1 + 1.5 = 2.5
    sal = torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 2.0]]).reshape(2, 1, 1, 4)
    r = average_drop_increase(IMG, sal, _sum_score)
    assert r["drop_percent"][0].item() == pytest.approx(75.0)
    assert r["masked_score"].tolist() == [2.5, 4.0]
    assert r["increase"].tolist() == [0.0, 0.0]
    wts = torch.tensor([0.0, -1.0, 0.0, 1.0]).reshape(1, 1, 1, 4)
    r2 = average_drop_increase(IMG, sal, lambda x: (x * wts).flatten(1).sum(1))
    # Y = 4 - 2 = 2; map 1 keeps only voxel 3 -> O = 4 > Y
    assert r2["drop_percent"][1].item() == 0.0 and r2["increase"][1].item() == 1.0
    r3 = average_drop_increase(IMG, sal, lambda x: -_sum_score(x))
    assert torch.isnan(r3["drop_percent"]).all()


def test_baselines():
    from scipy.ndimage import gaussian_filter

    img = torch.rand(2, 6, 7, 8, generator=torch.Generator().manual_seed(0))
    blur = make_baseline(img, "blur", blur_sigma=1.0)
    ref = np.stack([gaussian_filter(img[c].double().numpy(), 1.0, mode="nearest", truncate=3.0) for c in range(2)])
    assert np.allclose(blur.numpy(), ref, atol=1e-5)
    assert torch.allclose(make_baseline(img, "mean")[1], img[1].mean().expand(6, 7, 8))
    assert make_baseline(img, "zero").abs().sum() == 0
    with pytest.raises(MedcamError, match="baseline"):
        make_baseline(img, "noise")


def test_bad_inputs_fail_early():
    with pytest.raises(MedcamError, match="spatial shape"):
        deletion_curve(IMG, torch.rand(1, 1, 5), _sum_score)
    with pytest.raises(MedcamError, match="one case"):
        deletion_curve(torch.rand(2, 1, 1, 1, 4), SAL, _sum_score)
    with pytest.raises(MedcamError, match="mode"):
        perturbation_curve(IMG, SAL, _sum_score, mode="erase")


# ---- issue 16: RISE protocol, ties, NaN conventions -------------------------------------------------------------


def _rise_literal(model_prob, img, sal, substrate, step):
    """Petsiuk et al.'s CausalMetric loop (eclique/RISE, evaluation.py), insertion mode, written out: start from the
    substrate, restore `step` voxels per iteration in decreasing saliency, score the probability, normalised AUC."""
    hw = sal.numel()
    n_steps = (hw + step - 1) // step
    start = substrate.clone().reshape(img.shape[0], -1)
    finish = img.clone().reshape(img.shape[0], -1)
    order = np.argsort(-sal.reshape(-1).numpy(), kind="stable")
    scores = np.empty(n_steps + 1)
    for i in range(n_steps + 1):
        scores[i] = float(model_prob(start.reshape(1, *img.shape)))
        coords = order[step * i : step * (i + 1)]
        start[:, coords] = finish[:, coords]
    auc = (scores.sum() - scores[0] / 2 - scores[-1] / 2) / (scores.shape[0] - 1)
    return scores, auc


def test_insertion_default_is_rise_protocol_against_literal_loop():
    from scipy.ndimage import gaussian_filter

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 3, padding=1)).eval()
    x = torch.randn(1, 2, 6, 6, 8)
    with torch.no_grad():
        roi = (model(x)[:, 1] > 0).float()
    w = torch.zeros(1, 2, 6, 6, 8)
    w[:, 1] = roi
    sal = torch.rand(6, 6, 8, generator=torch.Generator().manual_seed(3))  # no ties
    fn = make_score_fn(model, w, activation="sigmoid", reduction="mean")
    res = insertion_curve(x, sal, fn, steps=16, blur_sigma=2.0)
    assert (res.protocol, res.substrate, res.score) == ("rise", "blur(sigma=2)", "probability mean")

    def prob(v):  # mean sigmoid probability over the ROI, computed directly
        with torch.no_grad():
            return (torch.sigmoid(model(v))[:, 1] * roi).sum() / roi.sum()

    blurred = torch.from_numpy(
        np.stack([gaussian_filter(x[0, c].double().numpy(), 2.0, mode="nearest", truncate=3.0) for c in range(2)])
    ).float()
    scores, auc = _rise_literal(prob, x[0], sal, blurred, step=6 * 6 * 8 // 16)
    assert np.allclose(res.scores[0].numpy(), scores, atol=1e-5)
    assert res.auc.item() == pytest.approx(auc, abs=1e-5)
    assert 0.0 <= res.scores.min() and res.scores.max() <= 1.0
    # the former protocol is kept as an option and says so
    old = insertion_curve(x, sal, make_score_fn(model, w), steps=16, protocol="baseline")
    assert (old.protocol, old.substrate, old.score) == ("baseline", "zero", "logit sum")
    with pytest.raises(MedcamError, match="probability"):
        insertion_curve(x, sal, make_score_fn(model, w), steps=4)
    with pytest.raises(MedcamError, match="protocol='baseline'"):
        insertion_curve(x, sal, fn, steps=4, baseline="mean")


def test_random_ties_average_to_the_expected_curve_and_skip_untied_steps():
    # linear score: the exact expected curve over uniformly random orders of tied voxels is
    # S - sum(removed untied) - (number removed from the tied group / its size) * (tied group's sum)
    img = torch.tensor([4.0, 1.0, 2.0, 8.0, 3.0, 5.0, 6.0, 7.0]).reshape(1, 1, 1, 8)
    sal = torch.tensor([0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5]).reshape(1, 1, 8)  # 6 tied zeros, as after a ReLU
    calls = []

    def score(v):
        calls.append(v.shape[0])
        return v.flatten(1).sum(1)

    steps = 4
    res = deletion_curve(img, sal, score, steps=steps, tie_draws=500)
    x = img.reshape(-1).numpy()
    tied = x[1:7]
    expected = []
    for k in range(steps + 1):
        n = round(k * 8 / steps)
        untied = [0, 7][: min(n, 2)]
        from_group = max(0, n - 2)
        expected.append(x.sum() - x[untied].sum() - from_group / tied.size * tied.sum())
    # per step the Monte-Carlo error of 500 draws is far below 0.5 (sd of a 2-of-6 sum <= 4)
    assert np.allclose(res.scores[0].numpy(), expected, atol=0.5)
    # steps 0 (nothing), 1 (2 untied voxels) and 4 (everything) do not cut the tied group: computed once
    assert sum(calls) == 3 + 2 * 500
    assert res.tied_fraction.item() == pytest.approx(6 / 8) and res.tie_draws == 500 and res.ties == "random"
    # raster order (ties="index") is one particular order
    idx = deletion_curve(img, sal, _sum_score, steps=steps, ties="index")
    assert idx.scores[0, 2].item() == pytest.approx(x.sum() - x[[0, 7, 1, 2]].sum())
    # the same seed gives the same curve
    again = deletion_curve(img, sal, _sum_score, steps=steps, tie_draws=3, seed=5)
    assert torch.equal(again.scores, deletion_curve(img, sal, _sum_score, steps=steps, tie_draws=3, seed=5).scores)


def test_tied_fraction_matches_numpy():
    rng = np.random.default_rng(0)
    maps = np.maximum(rng.normal(size=(3, 5, 6, 7)), 0).round(1)
    _, inv, cnt = np.unique(maps[1], return_inverse=True, return_counts=True)
    ref1 = (cnt[inv.reshape(-1)] > 1).mean()
    tf = tied_fraction(torch.from_numpy(maps))
    assert tf[1].item() == pytest.approx(ref1)
    assert tied_fraction(torch.zeros(1, 4, 4)).item() == 1.0
    assert tied_fraction(torch.arange(16.0).reshape(1, 4, 4)).item() == 0.0


def test_constant_map_and_empty_roi_give_nan_with_warning(caplog):
    model = nn.Conv3d(1, 2, 1).eval()
    w = torch.zeros(1, 2, 1, 1, 4)
    w[:, 1] = 1.0
    sal = torch.stack([torch.zeros(1, 1, 4), SAL])
    with caplog.at_level("WARNING", logger="medcam.metrics"):
        r = deletion_curve(IMG, sal, make_score_fn(model, w), steps=4)
    assert torch.isnan(r.scores[0]).all() and torch.isnan(r.auc[0]) and not torch.isnan(r.auc[1])
    assert "constant" in caplog.text
    caplog.clear()
    empty = make_score_fn(model, torch.zeros_like(w), activation="sigmoid", reduction="mean")
    assert empty.empty_roi
    with caplog.at_level("WARNING", logger="medcam.metrics"):
        e = insertion_curve(IMG, SAL, empty, steps=4)
    assert torch.isnan(e.auc).all() and "empty" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_curves_and_road_on_cuda_equal_cpu():
    from medcam.metrics import road

    torch.manual_seed(0)
    model = nn.Conv3d(1, 2, 3, padding=1).eval()
    x = torch.randn(1, 1, 6, 6, 6)
    w = torch.zeros(1, 2, 6, 6, 6)
    w[:, 1, 1:5, 1:5, 1:5] = 1.0
    sal = torch.relu(torch.randn(6, 6, 6, generator=torch.Generator().manual_seed(1)))  # ties at 0
    out = {}
    for dev in ("cpu", "cuda"):
        m = model.to(dev)
        lf = make_score_fn(m, w.to(dev))
        pf = make_score_fn(m, w.to(dev), activation="sigmoid", reduction="mean")
        d = deletion_curve(x.to(dev), sal.to(dev), lf, steps=6)
        i = insertion_curve(x.to(dev), sal.to(dev), pf, steps=6, blur_sigma=1.0)
        r = road(x.to(dev), sal.to(dev), lf, percentiles=(30, 70), noise=0.0)
        assert d.scores.device.type == dev and r.combined.device.type == dev
        out[dev] = (d.scores.cpu(), i.scores.cpu(), r.combined.cpu())
    for a, b in zip(out["cpu"], out["cuda"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-3)
