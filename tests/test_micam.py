"""MI-CAM / MI-Grad-CAM: the MI estimator against numpy, the method against a literal implementation, sliding windows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from scipy import ndimage
from torch import nn

import medcam
from medcam import targets as T
from medcam.mutual_information import JointHistogram, dilate, mutual_information, normalized_mutual_information


class TinySeg(nn.Module):
    """conv -> strided conv (hooked ``feat``, half resolution) -> 1x1 head -> nearest upsampling to the input grid."""

    def __init__(self, nd: int = 3, cin: int = 2, k: int = 5):
        super().__init__()
        conv = nn.Conv3d if nd == 3 else nn.Conv2d
        self.enc = nn.Sequential(conv(cin, 6, 3, padding=1), nn.ReLU(), conv(6, k, 3, stride=2, padding=1), nn.ReLU())
        self.feat = nn.Identity()
        self.head = conv(k, 3, 1)

    def forward(self, x):
        return F.interpolate(self.head(self.feat(self.enc(x))), scale_factor=2, mode="nearest")


def _np_mi(a: np.ndarray, x: np.ndarray, bins: int, w: np.ndarray | None = None) -> float:
    """Plug-in MI (nats) from numpy's histogram2d (independent of medcam)."""
    h, _, _ = np.histogram2d(a, x, bins=bins, range=[[a.min(), a.max()], [x.min(), x.max()]], weights=w)
    p = h / h.sum()
    pa, px = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / (pa @ px)[nz])).sum())


def _literal_micam(net, x, roi: np.ndarray, margin: int, bins: int, act=None):
    """MI-CAM written out with numpy/scipy: A hooked, upsampled, histogram2d per channel, weights I/sum I."""
    if act is None:
        store = {}
        h = net.feat.register_forward_hook(lambda m, i, o: store.setdefault("a", o.detach()))
        with torch.no_grad():
            net(x)
        h.remove()
        act = store["a"]
    nd = x.ndim - 2
    up = F.interpolate(act, size=x.shape[2:], mode="trilinear" if nd == 3 else "bilinear", align_corners=False)
    region = ndimage.binary_dilation(roi, structure=np.ones((3,) * nd), iterations=margin) if margin else roi
    xs = x[0].numpy()
    mi = np.array(
        [
            np.mean([_np_mi(up[0, k].numpy()[region], xs[c][region], bins) for c in range(x.shape[1])])
            for k in range(act.shape[1])
        ]
    )
    alpha = mi / mi.sum()
    m = (torch.as_tensor(alpha, dtype=torch.float32)[(slice(None), *([None] * nd))] * act[0]).sum(0)
    m = F.interpolate(m[None, None], size=x.shape[2:], mode="trilinear" if nd == 3 else "bilinear", align_corners=False)
    return torch.relu(m[0, 0]), alpha


def test_mi_estimator_matches_numpy_and_is_additive():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 500, generator=gen, dtype=torch.float64)
    x = torch.randn(1, 500, generator=gen, dtype=torch.float64) + 0.5 * a[:1]
    h = JointHistogram((a.min(1).values, a.max(1).values), (x.min(1).values, x.max(1).values), 8)
    h.add(a, x)
    mi = mutual_information(h.counts)[0]
    ref = [_np_mi(a[k].numpy(), x[0].numpy(), 8) for k in range(3)]
    np.testing.assert_allclose(mi.numpy(), ref, rtol=1e-10)
    assert mi[0] > mi[1] and mi[0] > mi[2]  # channel 0 drives x
    # counts built in two weighted halves equal the whole (additivity, the sliding-window premise)
    h2 = JointHistogram((a.min(1).values, a.max(1).values), (x.min(1).values, x.max(1).values), 8)
    w = torch.full((250,), 1.0, dtype=torch.float64)
    h2.add(a[:, :250], x[:, :250], w)
    h2.add(a[:, 250:], x[:, 250:], w)
    torch.testing.assert_close(h2.counts, h.counts)
    # weighted counts = numpy weighted histogram
    wr = torch.rand(500, generator=gen, dtype=torch.float64)
    h3 = JointHistogram((a.min(1).values, a.max(1).values), (x.min(1).values, x.max(1).values), 8)
    h3.add(a, x, wr)
    assert math.isclose(
        float(mutual_information(h3.counts)[0, 1]), _np_mi(a[1].numpy(), x[0].numpy(), 8, wr.numpy()), rel_tol=1e-10
    )
    nmi = normalized_mutual_information(h.counts)
    assert bool(((nmi >= 0) & (nmi <= 1)).all())


def test_dilate_matches_scipy():
    m = torch.zeros(1, 9, 10, 7, dtype=torch.bool)
    m[0, 4, 2, 3] = m[0, 0, 9, 6] = True
    ref = ndimage.binary_dilation(m[0].numpy(), structure=np.ones((3, 3, 3)), iterations=2)
    assert np.array_equal(dilate(m, 2)[0].numpy(), ref)


@pytest.mark.parametrize("nd", [2, 3])
def test_micam_matches_literal_implementation(nd):
    torch.manual_seed(nd)
    net = TinySeg(nd).eval()
    shape = (16, 12, 10)[:nd]
    x = torch.randn(1, 2, *shape)
    start, stop = (3, 2, 2)[:nd], (9, 8, 6)[:nd]
    t = T.BoxROI(1, start, stop)
    res = medcam.SegMICAM(net, "feat", bins=8, margin=2).explain(x, [t])
    roi = np.zeros(shape, bool)
    roi[tuple(slice(a, b) for a, b in zip(start, stop))] = True
    ref, alpha = _literal_micam(net, x, roi, 2, 8)
    np.testing.assert_allclose(res.stats["mi_weights"][0, 0].numpy(), alpha, rtol=1e-5)
    torch.testing.assert_close(res.maps[0, 0], ref, rtol=1e-5, atol=1e-6)
    assert res.maps.shape == (1, 1, *shape)


def test_micam_leaves_model_untouched_and_needs_no_gradient():
    net = TinySeg().train()
    x = torch.randn(1, 2, 8, 8, 8)
    medcam.SegMICAM(net, "feat", bins=4).explain(x, [T.ClassROI(0)])
    assert net.training and all(p.grad is None and p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("cls", [medcam.SegMICAM, medcam.SegMIGradCAM])
def test_one_window_equals_whole_volume(cls):
    torch.manual_seed(1)
    net = TinySeg().eval()
    x = torch.randn(1, 2, 16, 12, 10)
    tl = [T.BoxROI(1, (2, 2, 2), (8, 8, 6)), T.PredictedROI(0)]
    inferer = SlidingWindowInferer(roi_size=(16, 12, 10), sw_batch_size=1, overlap=0.5, mode="gaussian")
    whole = cls(net, "feat", bins=8, margin=2).explain(x, tl, relu=False)
    sw = cls(net, "feat", bins=8, margin=2, inferer=inferer).explain(x, tl, relu=False)
    torch.testing.assert_close(sw.maps, whole.maps, rtol=1e-5, atol=1e-6 * float(whole.maps.abs().max()))


def test_sliding_equals_literal_on_stitched_volume_without_overlap():
    """Non-overlapping windows: each voxel counted once with weight 1, so MI-CAM of the windows = the literal
    MI-CAM on the stitched (per-window upsampled) activation volume."""
    torch.manual_seed(2)
    net = TinySeg().eval()
    x = torch.randn(1, 2, 16, 16, 8)
    inferer = SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=1, overlap=0.0)
    start, stop = (3, 5, 2), (12, 11, 6)
    res = medcam.SegMICAM(net, "feat", bins=8, margin=1, inferer=inferer).explain(x, [T.BoxROI(1, start, stop)])
    assert res.stats["windows"] == 4
    # stitched upsampled activations, window by window, with an independent hook
    store = {}
    h = net.feat.register_forward_hook(lambda m, i, o: store.__setitem__("a", o.detach()))
    up = torch.zeros(5, 16, 16, 8)
    acts = {}
    with torch.no_grad():
        for i in (0, 8):
            for j in (0, 8):
                net(x[:, :, i : i + 8, j : j + 8])
                acts[(i, j)] = store["a"]
                up[:, i : i + 8, j : j + 8] = F.interpolate(store["a"], size=(8, 8, 8), mode="trilinear")[0]
    h.remove()
    roi = np.zeros((16, 16, 8), bool)
    roi[tuple(slice(a, b) for a, b in zip(start, stop))] = True
    region = ndimage.binary_dilation(roi, structure=np.ones((3, 3, 3)), iterations=1)
    mi = np.array(
        [np.mean([_np_mi(up[k].numpy()[region], x[0, c].numpy()[region], 8) for c in range(2)]) for k in range(5)]
    )
    np.testing.assert_allclose(res.stats["mi_weights"][0, 0].numpy(), mi / mi.sum(), rtol=1e-5)
    ref = torch.zeros(16, 16, 8)
    alpha = torch.as_tensor(mi / mi.sum(), dtype=torch.float32)
    for (i, j), a in acts.items():
        m = (alpha[:, None, None, None] * a[0]).sum(0)
        ref[i : i + 8, j : j + 8] = F.interpolate(m[None, None], size=(8, 8, 8), mode="trilinear")[0, 0]
    torch.testing.assert_close(res.maps[0, 0], torch.relu(ref), rtol=1e-5, atol=1e-6)


def test_migradcam_is_gradcam_times_nmi():
    torch.manual_seed(3)
    net = TinySeg().eval()
    x = torch.randn(1, 2, 12, 12, 12)
    t = T.BoxROI(1, (2, 2, 2), (8, 8, 8))
    mg = medcam.SegMIGradCAM(net, "feat", bins=8, margin=2).explain(x, [t], relu=False, upsample=False)
    nmi = mg.stats["nmi_weights"][0, 0]
    store = {}
    h = net.feat.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    with torch.enable_grad():
        y = net(x)
        w = t.score_weights(y.detach())
        (g,) = torch.autograd.grad((w * y).sum(), store["a"])
    h.remove()
    a = store["a"].detach()
    alpha = g.mean((2, 3, 4))[0] * nmi
    ref = (alpha[:, None, None, None] * a[0]).sum(0)
    torch.testing.assert_close(mg.maps[0, 0], ref, rtol=1e-5, atol=1e-7)
    assert bool((nmi > 0).all()) and bool((nmi <= 1).all())


def test_bad_parameters_are_clear_errors():
    net = TinySeg()
    with pytest.raises(medcam.MedcamError, match="bins"):
        medcam.SegMICAM(net, "feat", bins=1)
    with pytest.raises(medcam.MedcamError, match="margin"):
        medcam.SegMICAM(net, "feat", margin=-1)


def test_empty_roi_gives_zero_map_whole_and_sliding():
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("medcam.micam")  # a handler of its own: CLI tests in this worker may stop propagation
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)  # the CLI sets the "medcam" logger's level (e.g. --quiet) in this process
    net = TinySeg().eval()
    x = torch.randn(1, 2, 16, 12, 10)
    empty = T.MaskROI(torch.zeros(16, 12, 10), 1)
    inferer = SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=1, overlap=0.25)
    for inf in (None, inferer):
        res = medcam.SegMICAM(net, "feat", bins=4, margin=1, inferer=inf).explain(x, [empty, T.ClassROI(0)])
        assert float(res.maps[0, 0].abs().max()) == 0.0 and float(res.maps[0, 1].max()) > 0
        assert res.stats["mi_weights"].shape == (1, 2, 5)
    logger.removeHandler(handler)
    logger.setLevel(level)
    assert any("empty ROI" in r.getMessage() for r in records)


def test_given_blended_output_is_used_and_gives_the_same_maps():
    torch.manual_seed(5)
    net = TinySeg().eval()
    x = torch.randn(1, 2, 16, 16, 8)
    inferer = SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=1, overlap=0.25)
    with torch.no_grad():
        out = inferer(x, net)
    tl = [T.PredictedROI(1)]
    a = medcam.SegMICAM(net, "feat", bins=8, inferer=inferer).explain(x, tl)
    b = medcam.SegMICAM(net, "feat", bins=8, inferer=inferer).explain(x, tl, output=out)
    assert int(a.roi_voxels[0, 0]) > 0 and float(a.maps.max()) > 0
    torch.testing.assert_close(a.maps, b.maps)
    with pytest.raises(medcam.MedcamError, match="output has shape"):
        medcam.SegMICAM(net, "feat", inferer=inferer).explain(x, tl, output=out[:, :, :8])
