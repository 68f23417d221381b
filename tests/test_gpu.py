"""CUDA correctness (skipped without a GPU; CI has none, run it on a GPU machine): same maps as on the CPU."""

from __future__ import annotations

import contextlib

import pytest
import torch
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import SegResNet

import medcam
from medcam import targets as T

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


@contextlib.contextmanager
def true_fp32():
    """TF32 off for the block (TF32 convolutions, the default on Ampere/Hopper, carry ~1e-3 relative error), and the
    process's flags given back afterwards, also on error."""
    flags = _tf32_flags()
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    with true_fp32():
        yield SegResNet(spatial_dims=3, in_channels=2, out_channels=3, init_filters=8).eval()


def test_true_fp32_restores_the_tf32_flags():
    torch.backends.cudnn.allow_tf32 = True
    before = _tf32_flags()
    with pytest.raises(RuntimeError), true_fp32():
        assert _tf32_flags() == (False, False)
        raise RuntimeError("restored on error too")
    assert _tf32_flags() == before


@cuda
@pytest.mark.parametrize("name", list(medcam.METHODS))
@pytest.mark.parametrize("sliding", [False, True])
def test_cuda_matches_cpu(net, name, sliding):
    cls = medcam.METHODS[name]
    torch.manual_seed(1)
    x = torch.randn(1, 2, 48, 40, 32)
    # Grad-CAM++: a box target keeps its coefficients away from their poles (see test_sliding)
    box = T.BoxROI(1, (4, 4, 4), (30, 20, 20))
    tl = [box] if name == "gradcam++" else [T.PredictedROI(0), box]
    inf = SlidingWindowInferer(roi_size=(32, 32, 32), overlap=0.5, mode="gaussian") if sliding else None
    ref = cls(net, layer="down_layers.3", inferer=inf).explain(x, tl)
    gpu_net = net.to("cuda")
    try:
        got = cls(gpu_net, layer="down_layers.3", inferer=inf).explain(x.cuda(), tl)
    finally:
        net.to("cpu")
    assert got.maps.device.type == "cuda"
    torch.testing.assert_close(got.maps.cpu(), ref.maps, rtol=1e-3, atol=1e-3 * float(ref.maps.max()))
    torch.testing.assert_close(got.scores, ref.scores, rtol=1e-3, atol=1e-2)


@cuda
def test_cuda_amp_and_cpu_stitching(net):
    """Windows on the GPU, volume-sized buffers on the CPU (sw_device/device as in MONAI)."""
    x = torch.randn(1, 2, 64, 48, 32)
    gpu_net = net.to("cuda")
    try:
        inf = SlidingWindowInferer(roi_size=(32, 32, 32), overlap=0.25, sw_device="cuda", device="cpu")
        res = medcam.SegHiResGradCAM(gpu_net, layer="down_layers.3", inferer=inf, amp=True).explain(x, T.ClassROI(1))
        full = medcam.SegHiResGradCAM(gpu_net, layer="down_layers.3", inferer=inf).explain(x, T.ClassROI(1))
    finally:
        net.to("cpu")
    assert res.maps.device.type == "cpu" and torch.isfinite(res.maps).all()
    cos = torch.nn.functional.cosine_similarity(res.maps.flatten(), full.maps.flatten(), dim=0)
    assert cos > 0.95


@cuda
def test_cuda_cpu_thresh_stitches_on_the_host(net):
    """A volume over cpu_thresh voxels is stitched (and returned) on the CPU, as MONAI does; same maps."""
    torch.manual_seed(2)
    x = torch.randn(1, 2, 48, 40, 32)
    gpu_net = net.to("cuda")
    try:
        on_gpu = SlidingWindowInferer(roi_size=(32, 32, 32), overlap=0.5, mode="gaussian")
        on_host = SlidingWindowInferer(roi_size=(32, 32, 32), overlap=0.5, mode="gaussian", cpu_thresh=1000)
        a = medcam.SegHiResGradCAM(gpu_net, layer="down_layers.3", inferer=on_gpu).explain(x.cuda(), T.ClassROI(1))
        b = medcam.SegHiResGradCAM(gpu_net, layer="down_layers.3", inferer=on_host).explain(x.cuda(), T.ClassROI(1))
    finally:
        net.to("cpu")
    assert a.maps.device.type == "cuda" and b.maps.device.type == "cpu"
    torch.testing.assert_close(b.maps, a.maps.cpu(), rtol=1e-4, atol=1e-4 * float(a.maps.max()))
