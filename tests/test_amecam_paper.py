"""Tests of the published AME-CAM pieces: multi-exit classifier, attention aggregator, contrastive loss, slices."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import medcam
from medcam import targets
from medcam.amecam import (
    AttentionAggregator,
    ExitLogit,
    ResNet18IN,
    ame_cam_from_maps,
    ame_cam_maps,
    apply_polarity,
    authors_minmax,
    authors_normalize,
    c2am_loss,
    cosine_matrix,
    exit_cams,
    extract_slices,
    fit_attention,
    hd95_pooled,
    load_modality_and_labels,
    mean_aggregate,
    minmax_maps,
    multi_exit_loss,
    per_slice_metrics,
    pixel_embeddings,
    roc_auc,
    sim_max_loss,
    sim_min_loss,
    train_classifier,
)
from medcam.errors import MedcamError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "brats_real_cases"


@pytest.fixture(scope="module")
def tiny_model() -> ResNet18IN:
    torch.manual_seed(0)
    return ResNet18IN(in_channels=1, width=4).eval()


def test_exit_shapes_and_logits_are_map_means(tiny_model):
    x = torch.rand(3, 1, 64, 64)
    logits, maps = tiny_model.forward_maps(x)
    assert logits.shape == (3, 4)
    assert [tuple(m.shape) for m in maps] == [(3, 1, 16, 16), (3, 1, 8, 8), (3, 1, 4, 4), (3, 1, 2, 2)]
    for i, m in enumerate(maps):
        torch.testing.assert_close(logits[:, i], m.mean(dim=(1, 2, 3)))
    up, lg = exit_cams(tiny_model, x)
    assert up.shape == (3, 4, 64, 64)
    torch.testing.assert_close(lg, logits)
    assert tiny_model.embed(x).shape == (3, 32)
    with pytest.raises(MedcamError):
        tiny_model(torch.rand(1, 2, 64, 64))


def test_multi_exit_loss_matches_weighted_bce():
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0], [-0.3, 0.7, -2.0, 1.5]])
    y = torch.tensor([1, 0])
    expected = 0.0
    for i, w in enumerate((0.25, 0.5, 0.75, 1.0)):
        z = logits[:, i]
        bce = -(y * torch.log(torch.sigmoid(z)) + (1 - y) * torch.log(1 - torch.sigmoid(z))).mean()
        expected += w * float(bce)
    assert float(multi_exit_loss(logits, y)) == pytest.approx(expected, rel=1e-6)
    # all-zero logits: each BCE = log 2, weights sum to 2.5
    assert float(multi_exit_loss(torch.zeros(4, 4), torch.tensor([0, 1, 1, 0]))) == pytest.approx(2.5 * math.log(2))
    with pytest.raises(MedcamError):
        multi_exit_loss(logits, torch.tensor([1, 2]))


def test_classifier_training_reduces_loss():
    torch.manual_seed(0)
    x = torch.rand(16, 1, 64, 64) * 0.2
    y = torch.tensor([0, 1] * 8)
    x[y == 1, :, 20:40, 20:40] += 0.8  # bright "tumour"
    m = ResNet18IN(width=4)
    with torch.no_grad():
        before = float(m.loss(m(x), y))
    train_classifier(m, x, y, batch_size=8, max_steps=8, lr=3e-3, epochs=100)  # cosine over 100 epochs: ~constant lr
    with torch.no_grad():
        after = float(m.loss(m.eval()(x), y))
    assert after < before
    assert not m.training


def test_attention_weights_sum_to_one_2d_and_3d():
    torch.manual_seed(0)
    agg = AttentionAggregator(n_maps=4, spatial_dims=2, hidden=8).eval()
    x, maps = torch.rand(2, 1, 32, 32), torch.randn(2, 4, 32, 32)
    att, w = agg(x, maps)
    assert att.shape == (2, 1, 32, 32) and w.shape == (2, 4, 32, 32)
    torch.testing.assert_close(w.sum(1), torch.ones(2, 32, 32))
    assert (w >= 0).all()
    torch.testing.assert_close(att, (w * maps).sum(1, keepdim=True))
    agg3 = AttentionAggregator(n_maps=3, spatial_dims=3, hidden=4).eval()
    _, w3 = agg3(torch.rand(1, 2, 8, 8, 8), torch.randn(1, 3, 8, 8, 8))
    torch.testing.assert_close(w3.sum(1), torch.ones(1, 8, 8, 8))
    with pytest.raises(MedcamError):
        agg(x, maps[:, :3])


def test_aggregating_identical_maps_returns_that_map():
    torch.manual_seed(1)
    agg = AttentionAggregator(n_maps=4, hidden=8).eval()
    m = torch.randn(2, 1, 24, 24)
    maps = m.expand(2, 4, 24, 24)
    att, _ = agg(torch.rand(2, 1, 24, 24), maps)
    torch.testing.assert_close(att, m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean_aggregate(maps), m)


def test_minmax_maps():
    m = torch.tensor([[[[1.0, 3.0], [5.0, 9.0]]], [[[2.0, 2.0], [2.0, 2.0]]]])
    out = minmax_maps(m)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert float(out[1].abs().max()) == 0.0  # constant map -> zeros
    torch.testing.assert_close(apply_polarity(out, -1)[0, 0], torch.tensor([[1.0, 0.75], [0.5, 0.0]]))


def _literal_cos(u: torch.Tensor, v: torch.Tensor) -> float:
    """Clamped cosine of two vectors, element by element in float64 (independent of cosine_matrix)."""
    uu = [float(t) for t in u]
    vv = [float(t) for t in v]
    dot = sum(p * q for p, q in zip(uu, vv))
    nu, nv = math.sqrt(sum(p * p for p in uu)), math.sqrt(sum(q * q for q in vv))
    c = dot / (max(nu, 1e-12) * max(nv, 1e-12))
    return min(max(c, 0.0005), 0.9995)


def _literal_sim_max(e: torch.Tensor, alpha: float = 0.25) -> float:
    """The authors' SimMax, pair by pair: mean over all N^2 pairs (self included) of exp(-alpha (rank - 1)) * -log s,
    rank = position of j in row i sorted by decreasing s, ties in index order."""
    n = e.shape[0]
    s = [[_literal_cos(e[i], e[j]) for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):
        for j in range(n):
            rank = sum(1 for k in range(n) if s[i][k] > s[i][j] or (s[i][k] == s[i][j] and k < j))
            total += math.exp(-alpha * (rank - 1)) * max(0.0, -math.log(s[i][j]))
    return total / (n * n)


def _literal_sim_min(f: torch.Tensor, b: torch.Tensor) -> float:
    n, m = f.shape[0], b.shape[0]
    return sum(-math.log(1 - _literal_cos(f[i], b[j])) for i in range(n) for j in range(m)) / (n * m)


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_sim_losses_match_literal_per_pair_loops(n):
    g = torch.Generator().manual_seed(n)
    e = torch.randn(n, 7, generator=g, dtype=torch.float64)
    e[0] = e[-1]  # a duplicate row: cosine 1 -> clamped, a tie with the self pair
    b = torch.randn(n + 1, 7, generator=g, dtype=torch.float64).abs()
    assert float(sim_max_loss(e)) == pytest.approx(_literal_sim_max(e), rel=1e-9)
    assert float(sim_max_loss(b)) == pytest.approx(_literal_sim_max(b), rel=1e-9)
    assert float(sim_min_loss(e, b)) == pytest.approx(_literal_sim_min(e, b), rel=1e-9)
    assert float(sim_max_loss(b.float())) == pytest.approx(_literal_sim_max(b), rel=1e-4)  # float32 inputs
    full = float(c2am_loss(e, b[:n]))
    lit = _literal_sim_max(e) + _literal_sim_min(e, b[:n]) + _literal_sim_max(b[:n])
    assert full == pytest.approx(lit, rel=1e-9)


def test_contrastive_loss_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    cos = cosine_matrix(a, a)
    assert float(cos.max()) == pytest.approx(0.9995) and float(cos.min()) == pytest.approx(0.0005)
    # SimMin of orthogonal fg/bg: -log(1 - 0.0005); of identical: -log(0.0005)
    assert float(sim_min_loss(a[:1], a[2:])) == pytest.approx(-math.log(1 - 0.0005), rel=1e-3)
    assert float(sim_min_loss(a[:1], a[:1])) == pytest.approx(-math.log(0.0005), rel=1e-5)
    # SimMax by hand, rows sorted by decreasing cosine (ties in index order), weight exp(-0.25 (rank - 1)):
    # rows 0 and 1: [0.9995, 0.9995, 0.0005] at ranks 0, 1, 2; row 2: [0.0005, 0.0005, 0.9995] at ranks 1, 2, 0
    lo, hi = -math.log(0.9995), -math.log(0.0005)
    w = [math.exp(0.25), 1.0, math.exp(-0.25)]
    rows01 = w[0] * lo + w[1] * lo + w[2] * hi
    row2 = w[1] * hi + w[2] * hi + w[0] * lo
    assert float(sim_max_loss(a)) == pytest.approx((2 * rows01 + row2) / 9, rel=1e-5)
    # one embedding: only the self pair, -log(0.9995) * exp(0.25)
    assert float(sim_max_loss(a[:1].double())) == pytest.approx(lo * math.exp(0.25), rel=1e-9)
    # perfect separation (fg identical, bg identical, fg orthogonal to bg): SimMax terms at the clamp floor
    ideal = 2 * lo * (math.exp(0.25) + 1.0) / 2 + -math.log(1 - 0.0005)
    assert float(c2am_loss(a[:2], a[2:].expand(2, 2))) == pytest.approx(ideal, rel=1e-3)
    assert float(c2am_loss(a[:2], a[:2])) > 7.0  # fg == bg: SimMin = -log(0.0005) = 7.6


def test_pixel_embeddings_are_masked_grey_pixels():
    x = torch.rand(3, 2, 6, 5)
    m = torch.randn(3, 1, 6, 5)  # raw map: not normalised, may be negative
    fg, bg = pixel_embeddings(x, m)
    g = x.mean(1, keepdim=True)
    torch.testing.assert_close(fg, (g * m).reshape(3, -1))
    torch.testing.assert_close(bg, (g * (1 - m)).reshape(3, -1))
    with pytest.raises(MedcamError):
        pixel_embeddings(x, m[:, :, :5])


def test_authors_aggregator_structure_and_identity():
    """Res_Scoring as in the authors' code: 4 bias-free convs, each followed by BatchNorm and ReLU; input
    grey * normalize(maps); final map = sum(raw maps * softmax weights); AME-CAM = mean of the maps and the final map."""
    torch.manual_seed(0)
    agg = AttentionAggregator(n_maps=4, spatial_dims=2, hidden=8)
    convs = [m for m in agg.net if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.bias) for c in convs] == [
        (4, 8, None),
        (8, 8, None),
        (8, 8, None),
        (8, 4, None),
    ]
    kinds = [type(m).__name__ for m in agg.net]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"] * 4
    agg.train()
    agg(torch.rand(2, 3, 16, 16), torch.randn(2, 4, 16, 16))  # BatchNorm statistics move
    agg.eval()
    x, maps = torch.rand(2, 3, 16, 16), 5 * torch.randn(2, 4, 16, 16)
    final, w = agg(x, maps)
    # independent recomputation of the weights from the layers
    grey_ = x.mean(1, keepdim=True)
    lo = maps.amin(dim=(2, 3), keepdim=True)
    hi = maps.amax(dim=(2, 3), keepdim=True)
    h = grey_ * (maps - lo + 1e-5) / (hi - lo + 1e-5)
    for mod in agg.net:
        h = mod(h)
    torch.testing.assert_close(w, torch.softmax(h, 1))
    torch.testing.assert_close(w.sum(1), torch.ones(2, 16, 16))
    torch.testing.assert_close(final, (maps * w).sum(1, keepdim=True))  # raw maps, not normalised
    torch.testing.assert_close(ame_cam_from_maps(maps, final), (maps.sum(1, keepdim=True) + final) / 5)
    torch.testing.assert_close(authors_normalize(maps)[0, 0].amax(), torch.tensor(1.0))


def test_contrastive_attention_loss_decreases_and_classifier_untouched(tiny_model):
    torch.manual_seed(0)
    x = torch.rand(8, 1, 64, 64) * 0.3
    x[:, :, 16:40, 20:44] += 0.7
    maps, _ = exit_cams(tiny_model, x)
    params_before = [p.detach().clone() for p in tiny_model.parameters()]
    agg = AttentionAggregator(hidden=8)
    losses = fit_attention(agg, x, maps, epochs=6, lr=1e-2, batch_size=8)  # the authors' pixel embeddings
    assert len(losses) == 6
    assert np.mean(losses[-2:]) < losses[0]
    # feature-space ablation: the encoder is frozen and gets no gradient
    agg_f = AttentionAggregator(hidden=8)
    lf = fit_attention(agg_f, x, maps, tiny_model.embed, epochs=2, lr=1e-2, batch_size=8)
    assert len(lf) == 2 and all(np.isfinite(lf))
    assert all(p.grad is None for p in tiny_model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(params_before, tiny_model.parameters()))
    res = ame_cam_maps(tiny_model, x, agg)
    assert res["ame_cam"].shape == (8, 1, 64, 64) and res["weights"].shape == (8, 4, 64, 64)
    # AME-CAM = mean of the 5 raw maps (4 exits + final map), ME-CAM = mean of the 4 exits
    mean5 = torch.cat([res["exits"], res["attentive"]], 1).mean(1, keepdim=True)
    torch.testing.assert_close(res["ame_cam"], mean5)
    torch.testing.assert_close(res["me_cam"], res["exits"].mean(1, keepdim=True))
    n = authors_minmax(res["ame_cam"])
    assert float(n.min()) == pytest.approx(1e-5 / (float(mean5[0].max() - mean5[0].min()) + 1e-5), abs=1e-3)
    assert float(n.max()) == pytest.approx(1.0)


def test_instance_norm_has_no_affine_parameters(tiny_model):
    norms = [m for m in tiny_model.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    assert norms and all(not m.affine and m.weight is None for m in norms)


def test_roc_auc_matches_pair_count():
    s = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.4])
    y = torch.tensor([0, 0, 1, 1, 1])
    pairs = [(float(s[i]), float(s[j])) for i in range(5) for j in range(5) if y[i] == 1 and y[j] == 0]
    lit = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert roc_auc(s, y) == pytest.approx(lit)
    assert math.isnan(roc_auc(s, torch.ones(5)))


def test_classifier_keeps_best_validation_auc_epoch():
    torch.manual_seed(0)
    x = torch.rand(24, 1, 64, 64) * 0.2
    y = torch.tensor([0, 1] * 12)
    x[y == 1, :, 20:40, 20:40] += 0.8
    m = ResNet18IN(width=4)
    hist: dict = {}
    train_classifier(
        m, x[:16], y[:16], epochs=4, batch_size=8, lr=3e-3, val_images=x[16:], val_labels=y[16:], history=hist
    )
    assert len(hist["val_auc"]) == 4
    assert hist["best_val_auc"] == max(hist["val_auc"])
    assert hist["best_epoch"] == hist["val_auc"].index(max(hist["val_auc"]))
    with torch.no_grad():
        auc_now = roc_auc(m(x[16:])[:, -1], y[16:])
    assert auc_now == pytest.approx(hist["best_val_auc"])  # the best epoch's weights were restored


def test_gradcam_of_deepest_exit_equals_its_cam(tiny_model):
    """GAP + linear head: HiResCAM at layer4 = the exit-4 map / N (cam-reference invariant 2)."""
    x = torch.rand(2, 1, 64, 64)
    cam = medcam.SegHiResGradCAM(ExitLogit(tiny_model, -1), layer="model.layer4")
    hires = cam(x, [targets.ClassROI(0)], relu=False, upsample=False)  # [2, 1, 2, 2]
    _, maps = tiny_model.forward_maps(x)
    exit4 = maps[3] - tiny_model.exits[3].bias.view(1, 1, 1, 1)
    torch.testing.assert_close(hires, exit4 / 4, atol=1e-5, rtol=1e-4)


def test_extract_slices_labels_and_normalisation():
    vol = np.zeros((20, 20, 6), np.float32) + 10
    vol[..., 0] = 0  # an empty (no brain) slice
    lab = np.zeros((20, 20, 6), np.int16)
    lab[:2, :2, 2] = 2  # 4 px = 1.0% -> normal (needs MORE than 1%)
    lab[:3, :2, 3] = 1  # 6 px = 1.5% -> tumour
    lab[5:15, 5:15, 4] = 4
    vol[5:15, 5:15, 4] = 110
    s = extract_slices(vol, lab, axis=-1)
    assert s.slice_index.tolist() == [1, 2, 3, 4, 5]
    assert s.labels.tolist() == [0, 0, 1, 1, 0]
    assert float(s.images.max()) == 1.0
    # per-volume, not per-slice, normalisation: the volume minimum 0 lies in the dropped slice 0
    assert float(s.images[0].max()) == pytest.approx(10 / 110)
    r = s.resized(10)
    assert r.images.shape == (5, 1, 10, 10) and r.masks.shape == (5, 10, 10)
    with pytest.raises(MedcamError):
        extract_slices(vol, lab[..., :3])


def test_per_slice_metrics_conventions():
    p = torch.zeros(3, 240, 240, dtype=torch.bool)
    r = p.clone()
    r[1, 10:20, 10:20] = True
    p[2, 10:20, 10:20] = True
    r[2, 12:22, 10:20] = True
    m = per_slice_metrics(p, r)
    np.testing.assert_allclose(m["dice"], [1.0, 0.0, 0.8], atol=1e-6)
    np.testing.assert_allclose(m["iou"], [1.0, 0.0, 80 / 120], atol=1e-6)
    np.testing.assert_allclose(m["hd95"][:2], [0.0, math.hypot(240, 240)], rtol=1e-5)
    assert m["hd95"][2] == pytest.approx(2.0)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared real cases not available")
def test_real_case_slices():
    vol, lab = load_modality_and_labels(SHARED / "tcga_fg_6692", "flair")
    assert vol.shape == lab.shape == (240, 240, 155)
    s = extract_slices(vol, lab)
    frac = (lab > 0).reshape(-1, 155).sum(0) / (240 * 240)
    kept = s.slice_index.numpy()
    np.testing.assert_array_equal(s.labels.numpy(), (frac[kept] > 0.01).astype(int))
    assert 0 < int(s.labels.sum()) < len(s)


def test_extract_slices_multichannel_normalises_each_channel():
    g = np.random.default_rng(0)
    vol = np.stack([g.uniform(0, 10, (12, 12, 4)), g.uniform(-5, 300, (12, 12, 4))]).astype(np.float32)
    lab = np.zeros((12, 12, 4), np.int16)
    lab[2:8, 2:8, 1] = 1
    s = extract_slices(vol, lab, axis=-1)
    assert s.images.shape == (4, 2, 12, 12)
    for c in range(2):
        v = vol[c]
        exp = (v - v.min()) / (v.max() - v.min())
        np.testing.assert_allclose(s.images[:, c].numpy(), np.moveaxis(exp, -1, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(s.images[:, 0].numpy(), extract_slices(vol[0], lab).images[:, 0].numpy())
    assert s.labels.tolist() == [0, 1, 0, 0]


def _brute_hd95_pooled(p: np.ndarray, r: np.ndarray, spacing: tuple[float, float]) -> float:
    """Pooled HD95 from explicit surface point lists (face-connected surface, all pairwise distances)."""
    from scipy.ndimage import binary_erosion, generate_binary_structure

    st = generate_binary_structure(2, 1)
    pb = np.argwhere(p & ~binary_erosion(p, st)) * np.asarray(spacing)
    rb = np.argwhere(r & ~binary_erosion(r, st)) * np.asarray(spacing)
    d = np.sqrt(((pb[:, None, :] - rb[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.hstack((d.min(1), d.min(0))), 95))


def test_hd95_pooled_medpy_convention():
    g = np.random.default_rng(3)
    for _ in range(4):
        p = np.zeros((40, 40), bool)
        r = np.zeros((40, 40), bool)
        y, x = g.integers(5, 20, 2)
        p[y : y + g.integers(3, 15), x : x + g.integers(3, 15)] = True
        y, x = g.integers(5, 20, 2)
        r[y : y + g.integers(3, 15), x : x + g.integers(3, 15)] = True
        r[g.integers(0, 40), g.integers(0, 40)] = True  # an outlier voxel
        for sp in ((1.0, 1.0), (1.0, 2.5)):
            assert hd95_pooled(p, r, sp) == pytest.approx(_brute_hd95_pooled(p, r, sp), rel=1e-9)
        try:
            from medpy.metric import hd95 as medpy_hd95
        except ImportError:
            continue
        assert hd95_pooled(p, r, (1.0, 1.0)) == pytest.approx(medpy_hd95(p, r, (1, 1)), rel=1e-9)
    e = np.zeros((8, 8), bool)
    assert hd95_pooled(e, e) == 0.0
    assert hd95_pooled(p, np.zeros_like(p)) == pytest.approx(373.12866)
    m = per_slice_metrics(torch.as_tensor(p)[None], torch.as_tensor(r)[None])
    assert m["hd95_pooled"][0] == pytest.approx(hd95_pooled(p, r))
    assert m["hd95_pooled"][0] <= m["hd95"][0] + 1e-9  # pooled percentile <= larger directed percentile
