"""The MONAI segmentation families users bring: layer 'auto' finds the bottleneck and the maps equal plain autograd.

BasicUNet, DynUNet (MONAI's nnU-Net), AttentionUnet, SwinUNETR and UNETR, small configurations. SegResNet and UNet
are covered in test_core.py. MONAI's transformer blocks need einops (a dev dependency).
"""

from __future__ import annotations

import pytest
import torch
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import UNETR, AttentionUnet, BasicUNet, DynUNet, SwinUNETR

import medcam
from medcam import targets as T
from tests._nets import autograd_reference, reference_maps


def _nets():
    torch.manual_seed(0)
    return {
        # name: (network, input shape, the layer 'auto' must choose)
        "basicunet": (BasicUNet(3, 2, 3, features=(4, 4, 8, 8, 16, 4)), (1, 2, 32, 32, 32), "down_4"),
        "dynunet": (
            DynUNet(
                3,
                2,
                3,
                kernel_size=[3, 3, 3, 3],
                strides=[1, 2, 2, 2],
                upsample_kernel_size=[2, 2, 2],
                filters=[4, 8, 16, 32],
                res_block=True,
            ),
            (1, 2, 32, 32, 24),
            "bottleneck",
        ),
        "attentionunet": (
            AttentionUnet(3, 2, 3, channels=(4, 8, 16), strides=(2, 2)),
            (1, 2, 32, 32, 32),
            "model.1.submodule.1.submodule",
        ),
        "swinunetr": (
            SwinUNETR(in_channels=2, out_channels=3, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
            (1, 2, 64, 64, 64),
            "encoder10",
        ),
        # UNETR's coarsest feature map is its patch embedding, a linear filter of the input: the decoder's first
        # stage (ViT bottleneck + skip) is taken instead
        "unetr": (
            UNETR(2, 3, img_size=(32, 32, 32), feature_size=4, hidden_size=48, mlp_dim=96, num_heads=2),
            (1, 2, 32, 32, 32),
            "decoder5",
        ),
    }


NETS = _nets()


@pytest.mark.parametrize("name", list(NETS))
def test_auto_layer_and_maps_equal_plain_autograd(name):
    net, shape, layer = NETS[name]
    torch.manual_seed(1)
    x = torch.randn(shape)
    net.train()  # the user's mode: medcam explains in eval mode and puts it back
    flags = [p.requires_grad for p in net.parameters()]
    tgt = T.BoxROI(1, (4, 4, 4), (20, 24, 16))
    cams = {m: cls(net) for m, cls in [("hirescam", medcam.SegHiResGradCAM), ("gradcam", medcam.SegGradCAM)]}
    results = {m: cam.explain(x, tgt, relu=False, upsample=False) for m, cam in cams.items()}
    assert cams["hirescam"].layer_name == layer
    assert net.training and [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())

    module = dict(net.named_modules())[layer]
    a, g, y = autograd_reference(net, module, x, tgt.score_weights)
    net.train()
    ref = reference_maps(a.double(), g.double())
    for m, res in results.items():
        torch.testing.assert_close(res.maps[:, 0].double(), ref[m], rtol=1e-4, atol=1e-6 * float(ref[m].abs().max()))
    torch.testing.assert_close(
        results["hirescam"].scores[:, 0], y[:, 1, 4:20, 4:24, 4:16].sum((1, 2, 3)), rtol=1e-5, atol=1e-4
    )


def test_dynunet_sliding_window_with_one_window_is_the_whole_volume():
    """nnU-Net-style use: DynUNet under a sliding-window inferer; one window covering the volume = whole volume."""
    net, shape, _ = NETS["dynunet"]
    torch.manual_seed(2)
    x = torch.randn(shape)
    inferer = SlidingWindowInferer(roi_size=shape[2:], sw_batch_size=1, overlap=0.5, mode="gaussian")
    tl = [T.PredictedROI(1), T.BoxROI(2, (0, 0, 0), (16, 16, 12))]
    whole = medcam.SegHiResGradCAM(net).explain(x, tl, relu=False)
    sw = medcam.SegHiResGradCAM(net, inferer=inferer).explain(x, tl, relu=False)
    torch.testing.assert_close(sw.maps, whole.maps, rtol=1e-5, atol=1e-6 * float(whole.maps.abs().max()))


def test_input_too_small_for_the_network_is_a_clear_error():
    """SwinUNETR needs 32-voxel multiples with more than one bottleneck voxel: say so, no raw torch traceback."""
    net, _, _ = NETS["swinunetr"]
    with pytest.raises(medcam.ModelError, match=r"failed on an input of shape \(1, 2, 32, 32, 32\)"):
        medcam.SegHiResGradCAM(net).explain(torch.randn(1, 2, 32, 32, 32), T.ClassROI(1))


def _tokens_to_grid(t, grid):
    """Independent of medcam.TokenGrid: MONAI UNETR.proj_feat's own view + permute."""
    return t.view(t.shape[0], *grid, t.shape[2]).permute(0, 4, 1, 2, 3)


@pytest.mark.parametrize("method", ["hirescam", "gradcam"])
def test_vit_tokens_with_token_grid_equal_plain_autograd(method):
    """UNETR's ViT output (its final LayerNorm, what the decoder reads): tokens [B, N, C] on the 16-voxel patch grid."""
    net, shape, _ = NETS["unetr"]
    torch.manual_seed(3)
    x = torch.randn(shape)
    layer = "vit.norm"
    tgt = T.BoxROI(2, (0, 4, 8), (24, 30, 28))
    cls = {"hirescam": medcam.SegHiResGradCAM, "gradcam": medcam.SegGradCAM}[method]
    res = cls(net, layer, reshape_transform=medcam.TokenGrid(16)).explain(x, tgt, relu=False, upsample=False)
    a, g, _ = autograd_reference(net, dict(net.named_modules())[layer], x, tgt.score_weights)
    assert a.shape == (1, 8, 48) and res.feature_shape == (2, 2, 2)
    ref = reference_maps(_tokens_to_grid(a, (2, 2, 2)).double(), _tokens_to_grid(g, (2, 2, 2)).double())[method]
    torch.testing.assert_close(res.maps[:, 0].double(), ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


def test_vit_tokens_in_a_sliding_window():
    """One window covering the volume equals the whole-volume result for a token layer too."""
    net, shape, _ = NETS["unetr"]
    torch.manual_seed(4)
    x = torch.randn(shape)
    inferer = SlidingWindowInferer(roi_size=shape[2:], overlap=0.5, mode="gaussian")
    kw = {"reshape_transform": medcam.TokenGrid(16)}
    tl = [T.ClassROI(0), T.BoxROI(1, (0, 0, 0), (16, 16, 16))]
    whole = medcam.SegHiResGradCAM(net, "vit.norm", **kw).explain(x, tl, relu=False)
    sw = medcam.SegHiResGradCAM(net, "vit.norm", inferer=inferer, **kw).explain(x, tl, relu=False)
    torch.testing.assert_close(sw.maps, whole.maps, rtol=1e-5, atol=1e-6 * float(whole.maps.abs().max()))


def test_token_layer_without_transform_or_with_wrong_patch_says_how_to_fix():
    net, shape, _ = NETS["unetr"]
    x = torch.randn(shape)
    with pytest.raises(medcam.LayerError, match=r"transformer tokens.*TokenGrid\(patch_size"):
        medcam.SegHiResGradCAM(net, "vit.norm").explain(x, T.ClassROI(0))
    with pytest.raises(medcam.LayerError, match=r"8 tokens.*patch size 8 makes a \(4, 4, 4\) grid of 64"):
        medcam.SegHiResGradCAM(net, "vit.norm", reshape_transform=medcam.TokenGrid(8)).explain(x, T.ClassROI(0))
