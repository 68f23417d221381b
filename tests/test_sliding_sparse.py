"""Issue 30 item 7: a small ROI in a large volume costs windows, not volumes. Score weights held on the ROI's
channel and bounding box, the map accumulator on the box of the windows stitched into, the blending normaliser
per window: bit-equal to the volume-sized forms."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import SlidingWindowInferer, sliding_window_inference
from monai.networks.nets import SegResNet

import medcam
from medcam import targets as T
from medcam.executor import ChannelSparse
from medcam.sliding import monai_plan

LAYER = "down_layers.2"


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return SegResNet(
        spatial_dims=3, in_channels=1, out_channels=3, init_filters=8, blocks_down=(1, 2, 2), blocks_up=(1, 1)
    ).eval()


class DenseBox(T.BoxROI):
    """The same box through the dense path (its own score_weights: the volume-sized weights of the base class)."""

    def score_weights(self, output):
        return super().score_weights(output)


@pytest.mark.parametrize("method", ["hirescam", "gradcam"])
def test_boxed_weights_and_box_accumulator_give_the_dense_maps_bit_equal(net, method):
    torch.manual_seed(2)
    x = torch.randn(1, 1, 64, 48, 40)
    inferer = SlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=2, overlap=0.25, mode="gaussian")
    box = T.BoxROI(1, (20, 14, 9), (26, 20, 14))
    dense = DenseBox(1, box.start, box.stop)
    cam = medcam.METHODS[method](net, layer=LAYER, inferer=inferer)
    a, b = cam.explain(x, [box], relu=False), cam.explain(x, [dense], relu=False)
    assert a.stats["backward_windows"] == b.stats["backward_windows"] < a.stats["windows"] // 4
    torch.testing.assert_close(a.maps, b.maps, rtol=0, atol=0)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)
    assert int(a.roi_voxels[0, 0]) == 6 * 6 * 5
    if method == "hirescam":  # element-wise: zero outside the windows that touch the box
        assert a.maps[0, 0, :8].abs().sum() == 0 and a.maps[0, 0, 20:26, 14:20, 9:14].abs().sum() > 0
    mask = torch.zeros(64, 48, 40, dtype=torch.bool)
    mask[20:26, 14:20, 9:14] = True
    c = cam.explain(x, [T.MaskROI(mask, 1)], relu=False)  # the mask's box, held boxed too
    torch.testing.assert_close(c.maps, a.maps, rtol=0, atol=0)
    one = T.BoxROI(2, (30, 5, 33), (31, 6, 34))  # a single voxel: VoxelROI's box
    v = cam.explain(x, [T.VoxelROI(2, (30, 5, 33)), DenseBox(2, one.start, one.stop)], relu=False)
    torch.testing.assert_close(v.maps[:, 0], v.maps[:, 1], rtol=0, atol=0)


def test_per_window_normaliser_equals_monais_count_map():
    inferer = SlidingWindowInferer(roi_size=(16, 12, 10), overlap=0.4, mode="gaussian")
    plan = monai_plan(inferer, torch.zeros(1, 1, 40, 30, 27))
    cpu = torch.device("cpu")
    local = [plan.blend(i, cpu).clone() for i in range(len(plan.windows))]
    assert plan.count is None  # nothing volume-sized was made for them
    plan.full_count()
    count = plan.count
    assert count is not None
    for i, w in enumerate(local):
        torch.testing.assert_close(w, plan.blend(i, cpu), rtol=0, atol=0)
    # MONAI's own count map: sliding_window_inference of ones with a predictor returning ones
    ones = sliding_window_inference(
        torch.ones(1, 1, 40, 30, 27), (16, 12, 10), 1, lambda x: torch.ones_like(x), overlap=0.4, mode="gaussian"
    )
    assert isinstance(ones, torch.Tensor)
    blended = torch.zeros_like(count)
    for i, s in enumerate(plan.windows):
        blended[s] += local[i]  # sum_i omega_i / n = 1 where MONAI blends ones
    torch.testing.assert_close(blended, ones[0, 0], rtol=0, atol=1e-6)


def test_sparse_gradient_holds_its_box_only():
    inferer = SlidingWindowInferer(roi_size=(8, 8, 8), overlap=0.0)
    plan = monai_plan(inferer, torch.zeros(1, 1, 32, 32, 32))
    cpu = torch.device("cpu")
    g = torch.zeros(1, 3, 32, 32, 32)
    g[0, 2, 10:12, 3:4, 20:25] = 1.5
    sp = ChannelSparse.from_dense(g, plan)
    assert sp.channels == [2] and tuple(sp.values.shape) == (1, 1, 2, 1, 5) and sp.lo == (10, 3, 20)
    for s in plan.windows:
        assert sp.touches(0, s) == bool(g[(0, 2, *s)].ne(0).any())
        torch.testing.assert_close(sp.window(0, s, cpu), g[(0, slice(2, 3), *s)], rtol=0, atol=0)
