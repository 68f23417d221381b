"""Sliding-window explanation: equals plain autograd through MONAI's blended output, exactly."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer, sliding_window_inference
from monai.networks.nets import SegResNet

import medcam
from medcam import targets as T

LAYER = "down_layers.2"


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return SegResNet(
        spatial_dims=3, in_channels=2, out_channels=3, init_filters=8, blocks_down=(1, 2, 2), blocks_up=(1, 1)
    ).eval()


def _reference(net, x, inferer, weights_fn, method, probability=None, error_bound=None):
    """Differentiate S = sum W * Y through MONAI's sliding_window_inference itself (all window graphs kept).

    ``probability``: "sigmoid" or "softmax" to score ``sum W * p(Y)`` instead of the logits.
    ``error_bound``: a list; Grad-CAM++ appends the map error that float32 round-off in g can cause (see below).
    """
    layer = dict(net.named_modules())[LAYER]
    acts, coords = [], []

    def hook(m, i, o):
        acts.append(o)

    def predictor(win, coord):
        coords.append(coord)
        return net(win).clone()  # MONAI scales the returned tensor in place: keep the pre-blend output intact

    h = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            y = sliding_window_inference(
                x,
                inferer.roi_size,
                inferer.sw_batch_size,
                predictor,
                overlap=inferer.overlap,
                mode=inferer.mode,
                with_coord=True,
            )
            p = {None: y, "sigmoid": torch.sigmoid(y), "softmax": torch.softmax(y, dim=1)}[probability]
            s = (weights_fn(y.detach()) * p).sum()
            grads = torch.autograd.grad(s, acts)
    finally:
        h.remove()
    roi = tuple(inferer.roi_size)
    padded = [max(s_, r_) for s_, r_ in zip(x.shape[2:], roi)]  # MONAI's coordinates are in the padded volume
    out = torch.zeros((x.shape[0], *padded), dtype=torch.float64)
    if method in ("hirescam", "layercam"):  # element-wise: window maps summed
        for a, g, coord in zip(acts, grads, coords):
            term = g * a if method == "hirescam" else F.relu(g) * a
            m = F.interpolate(term.sum(1, keepdim=True).double(), size=roi, mode="trilinear", align_corners=False)
            for j, sl in enumerate(coord):
                out[(sl[0], *sl[2:])] += m[j, 0]
        crop = [slice((p_ - s_) // 2, (p_ - s_) // 2 + s_) for p_, s_ in zip(padded, x.shape[2:])]
        return out[(slice(None), *crop)]
    # pooled methods: one global alpha, maps blended by MONAI's own weights
    feat = acts[0].shape[2:]
    n = 1.0
    for s_, f_, r_ in zip(x.shape[2:], feat, roi):
        n *= s_ * f_ / r_
    if method == "gradcam":  # alpha = sum of gradients over windows / N
        alpha = sum(g.double().sum((0, 2, 3, 4)) for g in grads) / n
    elif method not in ("xgradcam", "gradcam++"):
        raise NotImplementedError(f"no sliding-window reference for method {method!r}: write one here")
    else:
        # sum_v A_k over the volume: each window's activation weighted by its normalised blending weight, taken
        # from MONAI itself (a predictor that answers 1 in channel w for window w), area-averaged onto the feature grid
        it_w = iter(range(len(coords)))

        def one_hot(win):
            out = torch.zeros((1, len(coords), *win.shape[2:]))
            out[0, next(it_w)] = 1.0
            return out

        share = sliding_window_inference(x[:1], roi, 1, one_hot, overlap=inferer.overlap, mode=inferer.mode)[0]
        # (one window per call and no padding in the tests that use this: coords[w][0][2:] is window w's box)
        pooled = [
            F.adaptive_avg_pool3d(share[w][tuple(coords[w][0][2:])][None, None], feat) for w in range(len(coords))
        ]
        act_sum = sum((a.double() * p.double()).sum((0, 2, 3, 4)) for a, p in zip(acts, pooled))
        if method == "xgradcam":
            alpha = sum((g.double() * a.double()).sum((0, 2, 3, 4)) for g, a in zip(grads, acts)) / (act_sum + 1e-7)
        else:  # gradcam++
            alpha, dalpha = 0, 0
            s_ = act_sum[None, :, None, None, None]
            for g in grads:
                g = g.double()
                den = 2 * g**2 + s_ * g**3
                coef = torch.where(
                    den != 0, g**2 / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(g)
                )
                alpha = alpha + (coef * F.relu(g)).sum((0, 2, 3, 4))
                # ReLU(g) / (2 + S g) has poles at g = -2 / S: its slope 2 / (2 + S g)^2 turns a relative round-off
                # eps of float32 gradients (two paths multiply the blending weights in another order) into
                # d alpha_k <= sum_u 2 eps |g| / (2 + S g)^2
                pole = torch.where(g > 0, 2 * 1e-6 * g / (2 + s_ * g) ** 2, torch.zeros_like(g))
                dalpha = dalpha + pole.sum((0, 2, 3, 4))
            if error_bound is not None:
                a_max = torch.stack([a.double().abs().amax((0, 2, 3, 4)) for a in acts]).amax(0)
                error_bound.append(float((dalpha * a_max).sum()))
    window_maps = [
        F.interpolate(
            (alpha[None, :, None, None, None] * a.double()).sum(1, keepdim=True),
            size=roi,
            mode="trilinear",
            align_corners=False,
        )
        for a in acts
    ]
    it = iter(window_maps)
    blended = sliding_window_inference(
        x, roi, inferer.sw_batch_size, lambda w: next(it).float(), overlap=inferer.overlap, mode=inferer.mode
    )
    return blended[:, 0].double()


#: every registered method is tested (a method added to medcam.METHODS needs its reference in _reference)
CLASSES = medcam.METHODS


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("method", list(CLASSES))
def test_matches_autograd_through_monai_blending(net, mode, method):
    torch.manual_seed(1)
    x = torch.randn(1, 2, 24, 24, 16)
    inferer = SlidingWindowInferer(roi_size=(16, 16, 12), sw_batch_size=1, overlap=0.5, mode=mode)
    # Grad-CAM++: a target whose coefficients stay away from their poles (|2 + S g| >= 1e-3; PredictedROI(1) gets
    # to 3e-5 under gaussian blending, where float32 round-off alone moves the map by a few per cent)
    tgt = T.BoxROI(0, (2, 3, 1), (14, 20, 10)) if method == "gradcam++" else T.PredictedROI(1)
    bound: list[float] = []
    ref = _reference(net, x, inferer, tgt.score_weights, method, error_bound=bound)
    res = CLASSES[method](net, layer=LAYER, inferer=inferer).explain(x, tgt, relu=False)
    assert res.stats["windows"] == 8
    got = res.maps[:, 0].double()
    # Grad-CAM++ only: plus the propagated round-off bound (its coefficients have poles; here |2 + S g| gets down
    # to 3e-5); a semantic error, e.g. per-window activation sums, is off by 10-100 times the map's size
    atol = 1e-5 * float(ref.abs().max()) + (bound[0] if bound else 0.0)
    assert atol < 0.1 * float(ref.abs().max()), "the comparison would be meaningless: pick better-conditioned inputs"
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("case", ["contrast_logits", "softmax_probability"])
def test_gradient_on_several_output_channels(net, case):
    """Targets whose output gradient spans several channels (a contrast; a softmax probability score)."""
    torch.manual_seed(5)
    x = torch.randn(1, 2, 24, 24, 16)
    inferer = SlidingWindowInferer(roi_size=(16, 16, 12), sw_batch_size=2, overlap=0.5, mode="gaussian")
    if case == "contrast_logits":
        tgt, kw, prob = T.ContrastROI(1, 2, alpha=0.7, region=T.BoxROI(1, (2, 3, 1), (14, 20, 10))), {}, None
    else:
        tgt, prob = T.BoxROI(1, (2, 3, 1), (14, 20, 10)), "softmax"
        kw = {"score": "probability", "output_activation": "softmax"}
    ref = _reference(net, x, inferer, tgt.score_weights, "hirescam", probability=prob)
    res = medcam.SegHiResGradCAM(net, layer=LAYER, inferer=inferer, **kw).explain(x, [tgt, T.ClassROI(0)], relu=False)
    torch.testing.assert_close(res.maps[:, 0].double(), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_score_of_blended_output_and_sw_batch(net):
    torch.manual_seed(2)
    x = torch.randn(2, 2, 32, 24, 16)
    inf1 = SlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=1, overlap=0.25, mode="gaussian")
    inf3 = SlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=3, overlap=0.25, mode="gaussian")
    box = T.BoxROI(2, (3, 4, 5), (20, 22, 13))
    with torch.no_grad():
        y = sliding_window_inference(x, (16, 16, 16), 1, net, overlap=0.25, mode="gaussian")
    r1 = medcam.SegHiResGradCAM(net, layer=LAYER, inferer=inf1).explain(x, [box, T.ClassROI(0)])
    r3 = medcam.SegHiResGradCAM(net, layer=LAYER, inferer=inf3).explain(x, [box, T.ClassROI(0)])
    torch.testing.assert_close(r1.scores[:, 0], y[:, 2, 3:20, 4:22, 5:13].sum((1, 2, 3)), rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(r1.scores[:, 1], y[:, 0].sum((1, 2, 3)), rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(r1.maps, r3.maps, rtol=1e-4, atol=1e-5 * float(r1.maps.max()))


@pytest.mark.parametrize(
    "cls",
    [medcam.SegHiResGradCAM, medcam.SegGradCAM, medcam.SegXGradCAM, medcam.SegLayerCAM, medcam.SegGradCAMPlusPlus],
)
def test_one_window_equals_whole_volume(net, cls):
    torch.manual_seed(3)
    x = torch.randn(1, 2, 32, 24, 16)
    inferer = SlidingWindowInferer(roi_size=(32, 24, 16), sw_batch_size=1, overlap=0.5, mode="gaussian")
    tl = [T.PredictedROI(0), T.BoxROI(1, (0, 0, 0), (10, 10, 10))]
    whole = cls(net, layer=LAYER).explain(x, tl, relu=False)
    sw = cls(net, layer=LAYER, inferer=inferer).explain(x, tl, relu=False)
    torch.testing.assert_close(sw.maps, whole.maps, rtol=1e-5, atol=1e-6 * float(whole.maps.abs().max()))
    torch.testing.assert_close(sw.scores, whole.scores, rtol=1e-5, atol=1e-4)


def test_volume_smaller_than_window_is_padded_like_monai(net):
    torch.manual_seed(4)
    x = torch.randn(1, 2, 20, 16, 12)
    inferer = SlidingWindowInferer(roi_size=(24, 16, 16), sw_batch_size=1, overlap=0.5)
    tgt = T.ClassROI(1)
    ref = _reference(net, x, inferer, tgt.score_weights, "hirescam")
    got = medcam.SegHiResGradCAM(net, layer=LAYER, inferer=inferer)(x, tgt, relu=False)[:, 0].double()
    assert got.shape == ref.shape == (1, 20, 16, 12)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_windows_outside_the_roi_are_skipped(net):
    x = torch.randn(1, 2, 48, 48, 16)
    inferer = SlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=2, overlap=0.0)
    calls = {"n": 0}
    h = net.register_forward_hook(lambda m, i, o: calls.__setitem__("n", calls["n"] + i[0].shape[0]))
    try:
        res = medcam.SegHiResGradCAM(net, layer=LAYER, inferer=inferer).explain(x, T.BoxROI(0, (2, 2, 2), (10, 10, 10)))
    finally:
        h.remove()
    assert res.stats["windows"] == 9 and res.stats["backward_windows"] == 1
    assert calls["n"] == 2  # one probe window for the output's channel count + the one ROI window
    calls["n"] = 0
    h = net.register_forward_hook(lambda m, i, o: calls.__setitem__("n", calls["n"] + i[0].shape[0]))
    cam = medcam.SegHiResGradCAM(net, layer=LAYER, inferer=inferer)
    try:
        with torch.no_grad():
            y = sliding_window_inference(x, (16, 16, 16), 2, net, overlap=0.0)
        calls["n"] = 0
        res2 = cam.explain(x, T.MaskROI(torch.sigmoid(y[0, 0]) > 2, 0), output=y)  # empty ROI: nothing runs
        assert calls["n"] == 0 and res2.stats["backward_windows"] == 0
        res3 = cam.explain(x, T.PredictedROI(0), output=y)  # prediction given: no prediction pass
        assert calls["n"] == res3.stats["backward_windows"] <= 9
    finally:
        h.remove()
    assert torch.count_nonzero(res.maps[0, 0, 16:]) == 0  # nothing outside the ROI window


def test_pooled_method_reads_every_window_once_per_pass(net):
    x = torch.randn(1, 2, 48, 16, 16)
    inferer = SlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=1, overlap=0.0)
    res = medcam.SegGradCAM(net, layer=LAYER, inferer=inferer).explain(x, T.BoxROI(0, (2, 2, 2), (6, 6, 6)))
    assert res.stats["backward_windows"] == 1 and res.stats["activation_windows"] == 3
    assert torch.count_nonzero(res.maps[0, 0, 16:]) > 0  # Grad-CAM weights are global: the map spreads


def test_inferer_that_is_not_a_sliding_window_is_refused(net):
    from monai.inferers import SimpleInferer

    with pytest.raises(medcam.MedcamError, match="SlidingWindowInferer"):
        medcam.SegGradCAMPlusPlus(net, layer=LAYER, inferer=SimpleInferer())

    class WholeImageOnly(medcam.SegGradCAM):  # a user's method whose weights do not add up over windows
        supports_sliding_window = False

    with pytest.raises(medcam.MedcamError, match="not additive over windows"):
        WholeImageOnly(net, layer=LAYER, inferer=SlidingWindowInferer(roi_size=(16, 16, 16)))


def test_amp_path_runs_on_cpu(net):
    x = torch.randn(1, 2, 24, 16, 16)
    inferer = SlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=1, overlap=0.5)
    full = medcam.SegHiResGradCAM(net, layer=LAYER, inferer=inferer)(x, T.PredictedROI(1))
    amp = medcam.SegHiResGradCAM(net, layer=LAYER, inferer=inferer, amp=True)(x, T.PredictedROI(1))
    assert amp.dtype == torch.float32 and torch.isfinite(amp).all()
    cos = F.cosine_similarity(full.flatten(), amp.flatten(), dim=0)
    assert cos > 0.9


def test_memory_does_not_grow_over_repeated_calls(net):
    x = torch.randn(1, 2, 32, 16, 16)
    cam = medcam.SegHiResGradCAM(net, layer=LAYER, inferer=SlidingWindowInferer(roi_size=(16, 16, 16), overlap=0.5))

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    cam(x, T.PredictedROI(0))
    n0 = live_tensors()
    for _ in range(2):
        cam(x, T.PredictedROI(0))
    assert live_tensors() <= n0


def test_stitching_device_follows_monai_rules():
    """inferer.device wins; else the CPU past cpu_thresh voxels; else the image's device (as SlidingWindowInferer)."""
    from medcam.sliding import stitch_device

    image = torch.empty(1, 1, 10, 10, 10, device="meta")
    assert stitch_device(SlidingWindowInferer(roi_size=8), image).type == "meta"
    assert stitch_device(SlidingWindowInferer(roi_size=8, cpu_thresh=999), image).type == "cpu"
    assert stitch_device(SlidingWindowInferer(roi_size=8, cpu_thresh=1000), image).type == "meta"
    assert stitch_device(SlidingWindowInferer(roi_size=8, device="cpu"), image).type == "cpu"
