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
    ame_cam_maps,
    apply_polarity,
    c2am_loss,
    cosine_matrix,
    exit_cams,
    extract_slices,
    fit_attention,
    load_modality_and_labels,
    mean_aggregate,
    minmax_maps,
    multi_exit_loss,
    per_slice_metrics,
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
    train_classifier(m, x, y, batch_size=8, max_steps=8, lr=3e-3, epochs=100)
    with torch.no_grad():
        after = float(m.loss(m.eval()(x), y))
    assert after < before
    assert not m.training


def test_attention_weights_sum_to_one_2d_and_3d():
    torch.manual_seed(0)
    agg = AttentionAggregator(n_maps=4, image_channels=1, spatial_dims=2, hidden=8).eval()
    x, maps = torch.rand(2, 1, 32, 32), torch.randn(2, 4, 32, 32)
    att, w = agg(x, maps)
    assert att.shape == (2, 1, 32, 32) and w.shape == (2, 4, 32, 32)
    torch.testing.assert_close(w.sum(1), torch.ones(2, 32, 32))
    assert (w >= 0).all()
    torch.testing.assert_close(att, (w * maps).sum(1, keepdim=True))
    agg3 = AttentionAggregator(n_maps=3, image_channels=2, spatial_dims=3, hidden=4).eval()
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


def test_contrastive_loss_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    cos = cosine_matrix(a, a)
    assert float(cos.max()) == pytest.approx(0.9995) and float(cos.min()) == pytest.approx(0.0005)
    # SimMin of orthogonal fg/bg: -log(1 - 0.0005); of identical: -log(0.0005)
    assert float(sim_min_loss(a[:1], a[2:])) == pytest.approx(-math.log(1 - 0.0005), rel=1e-3)
    assert float(sim_min_loss(a[:1], a[:1])) == pytest.approx(-math.log(0.0005), rel=1e-5)
    # SimMax: row 0 ranks row 1 (cos 1 -> clamp 0.9995) first (w=1), row 2 (0.0005) second (w=exp(-0.25))
    lo, hi, w1 = -math.log(0.9995), -math.log(0.0005), math.exp(-0.25)
    expected = (2 * (lo + w1 * hi) + (hi + w1 * hi)) / (3 * (1 + w1))
    assert float(sim_max_loss(a)) == pytest.approx(expected, rel=1e-5)
    assert float(sim_max_loss(a[:1])) == 0.0
    # perfect separation (fg identical, bg identical, fg orthogonal to bg): each term is at its clamp floor
    ideal = -math.log(0.9995) + -math.log(1 - 0.0005) + -math.log(0.9995)
    assert float(c2am_loss(a[:2], a[2:].expand(2, 2))) == pytest.approx(ideal, rel=1e-3)
    assert float(c2am_loss(a[:2], a[:2])) > 7.0  # fg == bg: SimMin = -log(0.0005) = 7.6


def test_contrastive_attention_loss_decreases_and_classifier_untouched(tiny_model):
    torch.manual_seed(0)
    x = torch.rand(8, 1, 64, 64) * 0.3
    x[:, :, 16:40, 20:44] += 0.7
    maps, _ = exit_cams(tiny_model, x)
    params_before = [p.detach().clone() for p in tiny_model.parameters()]
    agg = AttentionAggregator(hidden=8)
    losses = fit_attention(agg, x, maps, tiny_model.embed, epochs=6, lr=1e-2, batch_size=8)
    assert len(losses) == 6
    assert np.mean(losses[-2:]) < losses[0]
    assert all(p.grad is None for p in tiny_model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(params_before, tiny_model.parameters()))
    res = ame_cam_maps(tiny_model, x, agg)
    assert res["ame_cam"].shape == (8, 1, 64, 64) and res["weights"].shape == (8, 4, 64, 64)
    assert float(res["ame_cam"].min()) >= 0.0 and float(res["ame_cam"].max()) == pytest.approx(1.0)
    # AME-CAM = min-max of the mean of the 5 raw maps
    mean5 = torch.cat([res["exits"], res["attentive"]], 1).mean(1, keepdim=True)
    torch.testing.assert_close(res["ame_cam"], minmax_maps(mean5))


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
