"""Core explainer: agreement with plain autograd, exact invariants, targets, model left unchanged, errors."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import SegResNet, UNet

import medcam
from medcam import targets as T
from tests._nets import GapLinearNet, LinearHeadNet, autograd_reference, reference_maps

#: every registered method is tested (a method added to medcam.METHODS needs its formula in reference_maps, or in
#: _reference for a method whose channel weights are not formed from A and g alone)
METHODS = medcam.METHODS


def _reference(name, cam, x, tgt, a, g):
    """Pre-ReLU reference map ``[B, *f]`` (float64) of method ``name`` on ``A``, ``g`` from plain autograd.

    MI-CAM / MI-Grad-CAM: the mutual-information weights are those the explainer reports (``channel_weights``,
    checked against a literal numpy MI implementation in tests/test_micam.py); the map formed from them, the
    gradient part of MI-Grad-CAM and the hooking/upsampling are checked here like every other method's.
    """
    if name not in ("micam", "migradcam"):
        return reference_maps(a, g)[name]
    dims = tuple(range(2, a.ndim))
    w = cam.channel_weights(x, [tgt])[:, 0].double()  # [B, K]
    if name == "migradcam":
        w = w * g.sum(dims) / float(np.prod(a.shape[2:]))
    return (w[(...,) + (None,) * len(dims)] * a).sum(1)


def _model_state(model):
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [p.grad for p in model.parameters()],
        [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def _assert_same_state(before, after):
    assert before[0] == after[0], "train/eval modes changed"
    assert before[1] == after[1], "requires_grad flags changed"
    assert all(g is None for g in after[2]), "a parameter .grad was created"
    assert before[3] == after[3], "hooks left behind"
    for k in before[4]:
        assert torch.equal(before[4][k], after[4][k]), f"state {k} changed"


@pytest.fixture(scope="module")
def segresnet():
    torch.manual_seed(0)
    return SegResNet(spatial_dims=3, in_channels=2, out_channels=3, init_filters=8, blocks_down=(1, 2, 2, 4))


@pytest.fixture(scope="module")
def unet3d():
    torch.manual_seed(1)
    return UNet(3, 2, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize(
    "net_layer",
    [("segresnet", "down_layers.3"), ("segresnet", "up_layers.1"), ("unet3d", "model.1.submodule.1.submodule")],
)
def test_agrees_with_plain_autograd_3d(request, name, net_layer):
    net = request.getfixturevalue(net_layer[0])
    layer = net_layer[1]
    torch.manual_seed(2)
    x = torch.randn(2, 2, 16, 16, 16)
    tgt = T.PredictedROI(1)
    a, g, _ = autograd_reference(net, dict(net.named_modules())[layer], x, lambda y: tgt.score_weights(y))
    cam = METHODS[name](net, layer=layer)
    ref = _reference(name, cam, x, tgt, a.double(), g.double()).float()
    scale = float((g.abs() * a.abs()).sum(1).max())  # size of the terms summed: float32 rounding is relative to it
    got = cam(x, [tgt], relu=False, upsample=False)[:, 0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * scale)
    # upsampled + ReLU follows the documented order: upsample(pre-ReLU) then ReLU
    full = cam(x, tgt)
    exp = F.relu(F.interpolate(ref[:, None], size=x.shape[2:], mode="trilinear", align_corners=False))
    torch.testing.assert_close(full, exp, rtol=1e-4, atol=1e-5 * scale)
    assert full.dtype == torch.float32 and full.shape == (2, 1, 16, 16, 16)


@pytest.mark.parametrize("name", ["gradcam", "hirescam"])
def test_agrees_with_plain_autograd_2d_unet(name):
    torch.manual_seed(3)
    net = UNet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2))
    layer = "model.1.submodule.1.submodule"
    x = torch.randn(2, 1, 32, 32)
    mask = torch.zeros(32, 32)
    mask[8:20, 10:30] = 1
    tgt = T.MaskROI(mask, channel=1)
    a, g, _ = autograd_reference(net, dict(net.named_modules())[layer], x, lambda y: tgt.score_weights(y))
    ref = reference_maps(a.double(), g.double())[name].float()
    got = METHODS[name](net, layer=layer)(x, tgt, relu=False, upsample=False)[:, 0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


def test_linear_head_invariants():
    """y_c = sum_k w_ck A_k + b_c: HiResCAM = M (y_c - b_c); Grad-CAM = (|M|/N)(y_c - b_c) everywhere."""
    torch.manual_seed(4)
    net = LinearHeadNet(stride=1)
    x = torch.randn(2, 2, 8, 8, 8)
    mask = (torch.rand(2, 8, 8, 8) > 0.6).float()
    c = 2
    with torch.no_grad():
        y = net(x)
    b = net.head.bias[c]
    tgt = T.MaskROI(mask, channel=c)
    hires = medcam.SegHiResGradCAM(net, layer="feat")(x, tgt, relu=False, upsample=False)[:, 0]
    torch.testing.assert_close(hires, mask * (y[:, c] - b), rtol=1e-5, atol=1e-5)
    grad = medcam.SegGradCAM(net, layer="feat")(x, tgt, relu=False, upsample=False)[:, 0]
    n = 8 * 8 * 8
    size = mask.flatten(1).sum(1)[:, None, None, None]
    torch.testing.assert_close(grad, size / n * (y[:, c] - b), rtol=1e-5, atol=1e-5)


def test_gap_linear_classifier_invariant():
    """GAP + linear head: Grad-CAM = HiResCAM = XGrad-CAM = CAM / N."""
    torch.manual_seed(5)
    net = GapLinearNet()
    x = torch.randn(2, 2, 6, 6, 6)
    c = 1
    with torch.no_grad():
        a = net.feat(x)
    n = 6**3
    cam_ref = torch.einsum("k,bkxyz->bxyz", net.fc.weight[c], a) / n
    for m in (medcam.SegGradCAM, medcam.SegHiResGradCAM, medcam.SegXGradCAM):
        got = m(net, layer="feat")(x, T.ClassROI(c), relu=False, upsample=False)[:, 0]
        torch.testing.assert_close(got, cam_ref, rtol=1e-4, atol=1e-6)


def test_sum_identities_on_any_net(segresnet):
    """sum XGradCAM = sum HiResCAM = sum g A; sum GradCAM = sum HiResCAM - N sum_k Cov(g_k, A_k)."""
    torch.manual_seed(6)
    x = torch.abs(torch.randn(1, 2, 16, 16, 16))
    layer = "down_layers.2"
    tgt = T.ClassROI(0)
    a, g, _ = autograd_reference(segresnet, dict(segresnet.named_modules())[layer], x, tgt.score_weights)
    a, g = a.double(), g.double()
    kw = dict(relu=False, upsample=False)
    hires = medcam.SegHiResGradCAM(segresnet, layer=layer)(x, tgt, **kw).double().sum()
    xgrad = medcam.SegXGradCAM(segresnet, layer=layer)(x, tgt, **kw).double().sum()
    gradcam = medcam.SegGradCAM(segresnet, layer=layer)(x, tgt, **kw).double().sum()
    total = (g * a).sum()
    assert torch.isclose(hires, total, rtol=1e-4)
    assert torch.isclose(xgrad, total, rtol=1e-3)
    n = a[0, 0].numel()
    cov = ((g - g.mean((2, 3, 4), keepdim=True)) * (a - a.mean((2, 3, 4), keepdim=True))).mean((2, 3, 4)).sum()
    assert torch.isclose(gradcam, total - n * cov, rtol=1e-3, atol=1e-3 * float(total.abs()))


@pytest.mark.parametrize("method", [medcam.SegGradCAM, medcam.SegHiResGradCAM, medcam.SegXGradCAM])
def test_disjoint_rois_add_up(segresnet, method):
    torch.manual_seed(7)
    x = torch.randn(1, 2, 16, 16, 16)
    m1 = torch.zeros(16, 16, 16)
    m1[:8] = 1
    m2 = 1 - m1
    cam = method(segresnet, layer="down_layers.3")
    maps = cam(x, [T.MaskROI(m1, 2), T.MaskROI(m2, 2), T.ClassROI(2)], relu=False)
    torch.testing.assert_close(maps[:, 0] + maps[:, 1], maps[:, 2], rtol=1e-4, atol=1e-4 * float(maps.abs().max()))


def test_empty_roi_gives_zero_and_warns(segresnet, caplog):
    x = torch.randn(1, 2, 16, 16, 16)
    cam = medcam.SegHiResGradCAM(segresnet, layer="down_layers.3")
    with caplog.at_level(logging.WARNING, logger="medcam"):
        res = cam.explain(x, [T.MaskROI(torch.zeros(16, 16, 16), 0), T.ClassROI(0)])
    assert torch.count_nonzero(res.maps[:, 0]) == 0
    assert torch.count_nonzero(res.maps[:, 1]) > 0
    assert int(res.roi_voxels[0, 0]) == 0 and int(res.roi_voxels[0, 1]) == 16**3
    assert "empty ROI" in caplog.text


def test_score_values_and_probability_mode(segresnet):
    torch.manual_seed(8)
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        segresnet.eval()
        y = segresnet(x)
    box = T.BoxROI(1, (2, 3, 4), (9, 10, 11))
    res = medcam.SegHiResGradCAM(segresnet, layer="down_layers.3").explain(x, [box, T.VoxelROI(0, (1, 2, 3))])
    assert torch.isclose(res.scores[0, 0], y[0, 1, 2:9, 3:10, 4:11].sum(), rtol=1e-5)
    assert torch.isclose(res.scores[0, 1], y[0, 0, 1, 2, 3], rtol=1e-5)
    assert res.roi_voxels[0, 0] == 7**3
    # probability score = HiResCAM of sum sigmoid(y) over the box: compare with plain autograd
    layer = dict(segresnet.named_modules())["down_layers.3"]
    store = {}
    h = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        with torch.enable_grad():
            yy = segresnet(x)
            s = torch.sigmoid(yy[0, 1, 2:9, 3:10, 4:11]).sum()
            (g,) = torch.autograd.grad(s, store["a"])
    finally:
        h.remove()
    ref = (g * store["a"]).sum(1).detach()
    cam = medcam.SegHiResGradCAM(segresnet, layer="down_layers.3", score="probability", output_activation="sigmoid")
    r2 = cam.explain(x, box, relu=False, upsample=False)
    torch.testing.assert_close(r2.maps[:, 0], ref, rtol=1e-4, atol=1e-7)
    assert torch.isclose(r2.scores[0, 0], s.detach(), rtol=1e-5)


def test_contrast_roi_is_difference_of_maps(segresnet):
    x = torch.randn(1, 2, 16, 16, 16)
    cam = medcam.SegHiResGradCAM(segresnet, layer="down_layers.3")
    maps = cam(x, [T.ClassROI(1), T.ClassROI(2), T.ContrastROI(1, 2, alpha=0.5)], relu=False)
    torch.testing.assert_close(
        maps[:, 2], maps[:, 0] - 0.5 * maps[:, 1], rtol=1e-4, atol=1e-4 * float(maps.abs().max())
    )
    # alpha = 0 is the base target
    m0 = cam(x, [T.ContrastROI(1, 2, alpha=0.0)], relu=False)
    torch.testing.assert_close(m0[:, 0], maps[:, 0], rtol=1e-5, atol=1e-6)


def test_component_roi_selects_components():
    out = torch.full((1, 1, 12, 12, 12), -5.0)
    out[0, 0, 1:3, 1:3, 1:3] = 5.0  # 8 voxels
    out[0, 0, 6:10, 6:10, 6:10] = 5.0  # 64 voxels
    big = T.ComponentROI(0, which="largest").roi(out)
    small = T.ComponentROI(0, which=1).roi(out)
    at = T.ComponentROI(0, point=(1, 1, 1)).roi(out)
    assert big.sum() == 64 and big[0, 7, 7, 7] == 1
    assert small.sum() == 8 and torch.equal(small, at)
    pred = T.PredictedROI(0).roi(out)
    assert pred.sum() == 72
    soft = torch.zeros(1, 3, 4, 4, 4)
    soft[:, 2, :2] = 3.0
    assert T.PredictedROI(2, activation="softmax").roi(soft).sum() == 2 * 16


def test_batch_and_per_sample_masks(segresnet):
    """A batch with one mask per sample equals each sample explained alone. Computed in float64: in float32 a
    batched convolution sums in another order than a single sample's, which moved 16 of 4096 voxels by 1.8e-5
    (flaky at atol 1e-5 on a 2-core CI machine); the invariant itself is exact."""
    net = copy.deepcopy(segresnet).double()
    torch.manual_seed(9)
    x = torch.randn(2, 2, 16, 16, 16, dtype=torch.float64)
    masks = torch.zeros(2, 16, 16, 16)
    masks[0, :4] = 1
    masks[1, 8:] = 1
    cam = medcam.SegHiResGradCAM(net, layer="down_layers.3")
    both = cam(x, T.MaskROI(masks, 0), relu=False)
    one0 = cam(x[:1], T.MaskROI(masks[0], 0), relu=False)
    one1 = cam(x[1:], T.MaskROI(masks[1], 0), relu=False)
    top = float(both.abs().max())  # maps are returned in float32: equal up to that final rounding (2^-24)
    assert top > 0
    torch.testing.assert_close(both[0], one0[0], rtol=1e-6, atol=1e-7 * top)
    torch.testing.assert_close(both[1], one1[0], rtol=1e-6, atol=1e-7 * top)


def test_model_unchanged_after_call_and_after_error(segresnet):
    segresnet.train()
    segresnet.down_layers[0].eval()
    segresnet.convInit.conv.weight.requires_grad_(False)
    before = _model_state(segresnet)
    x = torch.randn(1, 2, 16, 16, 16)
    medcam.SegGradCAM(segresnet, layer="down_layers.3")(x, [T.ClassROI(0), T.PredictedROI(1)])
    _assert_same_state(before, _model_state(segresnet))
    with pytest.raises(medcam.TargetError):
        medcam.SegGradCAM(segresnet, layer="down_layers.3")(x, T.ClassROI(7))
    _assert_same_state(before, _model_state(segresnet))
    segresnet.convInit.conv.weight.requires_grad_(True)
    segresnet.eval()


def test_auto_layer_picks_bottleneck(segresnet, unet3d):
    x = torch.randn(1, 2, 16, 16, 16)
    assert medcam.layers.auto_layer(segresnet, x) == "down_layers.3"
    assert medcam.layers.auto_layer(unet3d, x) == "model.1.submodule.1.submodule"
    infos = {i.name: i for i in medcam.list_layers(segresnet, x)}
    assert infos["down_layers.3"].stride == (8.0, 8.0, 8.0) and infos["down_layers.3"].shape == (1, 64, 2, 2, 2)
    assert infos["conv_final"].is_output
    cam = medcam.SegHiResGradCAM(segresnet)  # layer="auto" by default
    cam(x, T.ClassROI(0))
    assert cam.layer_name == "down_layers.3"


def test_clear_errors(segresnet):
    x = torch.randn(1, 2, 16, 16, 16)
    with pytest.raises(medcam.LayerError, match="down_layers.3"):
        medcam.SegGradCAM(segresnet, layer="down_layer.3")
    with pytest.raises(medcam.ModelError, match="TorchScript"):
        medcam.SegGradCAM(torch.jit.trace(LinearHeadNet().eval(), torch.randn(1, 2, 4, 4, 4)), layer="feat")
    with pytest.raises(medcam.TargetError, match="out of range"):
        medcam.SegGradCAM(segresnet, layer="down_layers.3")(x, T.ClassROI(3))
    with pytest.raises(medcam.TargetError, match="mask has shape"):
        medcam.SegGradCAM(segresnet, layer="down_layers.3")(x, T.MaskROI(np.ones((8, 8, 8)), 0))
    with pytest.raises(medcam.MedcamError, match="B, C"):
        medcam.SegGradCAM(segresnet, layer="down_layers.3")(x[0, 0], T.ClassROI(0))
    with pytest.raises(medcam.ModelError, match="takes 2 channels and 3 spatial dims"):
        medcam.SegGradCAM(segresnet, layer="down_layers.3")(x[0], T.ClassROI(0))
    with pytest.raises(medcam.MedcamError, match="NaN"):
        medcam.SegGradCAM(segresnet, layer="down_layers.3")(x * float("nan"), T.ClassROI(0))
    unused = torch.nn.Sequential(LinearHeadNet(), torch.nn.Conv3d(3, 3, 1))
    net = LinearHeadNet()
    net.unused = torch.nn.Conv3d(5, 5, 1)
    with pytest.raises(medcam.LayerError, match="never ran"):
        medcam.SegGradCAM(net, layer="unused")(torch.randn(1, 2, 8, 8, 8), T.ClassROI(0))
    with pytest.raises(medcam.MedcamError, match="output_activation"):
        medcam.SegGradCAM(segresnet, layer="down_layers.3", score="probability")
    del unused


def test_non_finite_gradient_is_a_clear_error():
    net = LinearHeadNet()
    with torch.no_grad():
        net.head.weight[0, 0] = float("inf")
    before = _model_state(net)
    with pytest.raises(medcam.ModelError, match="NaN/inf"):
        medcam.SegHiResGradCAM(net, layer="feat")(torch.randn(1, 2, 8, 8, 8), T.ClassROI(0))
    after = _model_state(net)
    assert before[:4] == after[:4]


def test_normalize():
    m = torch.tensor([[[0.0, 2.0, 4.0]], [[0.0, 0.0, 0.0]]])[:, :, None]  # [2, 1, 1, 3]
    mm = medcam.normalize(m, "minmax")
    assert torch.equal(mm[0].flatten(), torch.tensor([0.0, 0.5, 1.0])) and torch.count_nonzero(mm[1]) == 0
    assert torch.equal(medcam.normalize(m, "max")[0].flatten(), torch.tensor([0.0, 0.5, 1.0]))
