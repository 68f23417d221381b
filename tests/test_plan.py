"""Pass plans (medcam.plan) and the executor's refusals (medcam.executor), on MONAI's sliding window and whole images.

Every method of medcam.METHODS against autograd through the framework's own prediction, per plan kind: whole images
in tests/test_core.py, MONAI's sliding window in tests/test_sliding.py, nnU-Net's folds x tiles x mirrors in
tests/frameworks/test_nnunet.py.
"""

from __future__ import annotations

import pytest
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import SlidingWindowInferer
from monai.inferers.utils import _get_scan_interval
from torch import nn

import medcam
from medcam.formulas import Formula
from medcam.plan import PassPlan, whole_plan
from medcam.sliding import monai_plan
from medcam.targets import BoxROI


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Conv3d(2, 4, 3, padding=1)
        self.head = nn.Conv3d(4, 3, 1)

    def forward(self, x):
        return self.head(torch.relu(self.enc(x)))


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_monai_plan_is_monais_grid_and_its_blend_weights_sum_to_one(mode):
    x = torch.randn(2, 2, 20, 9, 14)  # the second dim is smaller than the window: padded as MONAI pads
    inferer = SlidingWindowInferer(roi_size=(8, 12, 8), sw_batch_size=3, overlap=0.25, mode=mode)
    plan = monai_plan(inferer, x)
    padded = (20, 12, 14)
    assert plan.padded_size == padded and plan.spatial == (20, 9, 14) and plan.roi_size == (8, 12, 8)
    interval = _get_scan_interval(padded, (8, 12, 8), 3, (0.25,) * 3)
    assert plan.windows == dense_patch_slices(padded, (8, 12, 8), interval)
    total = torch.zeros(padded, dtype=torch.float64)
    for _, _, i, _ in plan.passes():
        total[plan.windows[i]] += plan.blend(i).double() / plan.batch  # both samples' passes
    torch.testing.assert_close(total, torch.ones_like(total), rtol=1e-6, atol=1e-6)
    # the unpadded volume sits at the crop of the padded image (MONAI pads symmetrically)
    assert torch.equal(plan.image[(slice(None), slice(None), *plan.crop)], x)
    # batches of sw_batch_size passes, in MONAI's order (sample, window)
    batches = plan.batches(plan.passes())
    assert [len(b) for b in batches[:-1]] == [3] * (len(batches) - 1)
    assert [p for b in batches for p in b] == [(b, 0, i, ()) for b in range(2) for i in range(len(plan.windows))]


def test_batches_never_mix_folds_and_flip_windows():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    whole = tuple(slice(0, 4) for _ in range(2))
    ones = torch.ones(4, 4)
    state = {"w": torch.zeros(1)}
    plan = PassPlan(
        image=x,
        crop=whole,
        windows=[whole],
        importance=ones,
        count=ones,
        device=x.device,
        net_device=x.device,
        mirrors=[(), (2,), (3,), (2, 3)],
        folds=[state, state],
        batch_size=3,
    )
    passes = plan.passes()
    assert passes == [(0, f, 0, m) for f in range(2) for m in plan.mirrors]
    assert [[p[1] for p in b] for b in plan.batches(passes)] == [[0, 0, 0], [0], [1, 1, 1], [1]]
    inp = plan.inputs(passes[:4])
    assert torch.equal(inp[1], torch.flip(x[0], (1,))) and torch.equal(inp[3], torch.flip(x[0], (1, 2)))
    torch.testing.assert_close(plan.blend(0), torch.full((4, 4), 1 / 8))


def test_whole_plan_is_one_pass_and_equals_the_explainer():
    net = _Net().eval()
    x = torch.randn(2, 2, 6, 6, 5)
    plan = whole_plan(x)
    assert plan.single_pass and plan.passes() == [(0, 0, 0, ()), (1, 0, 0, ())]
    t = BoxROI(1, (1, 1, 1), (4, 5, 3))
    cam = medcam.SegGradCAM(net, "enc")
    a = cam.explain(x, t)
    b = medcam.SegGradCAM(net, "enc").explain_plan(whole_plan(x), t)
    assert torch.equal(a.maps, b.maps) and torch.equal(a.scores, b.scores)


class _Odd(Formula):
    def map(self, activation, grad, layer=None):
        return grad.sum(1)


class _OddCAM(medcam.BaseSegCAM):
    formula = _Odd()


def test_a_formula_the_executor_cannot_follow_is_refused_before_any_pass():
    net = _Net().eval()
    calls = []
    h = net.register_forward_hook(lambda *a: calls.append(1))
    try:
        cam = _OddCAM(net, "enc", inferer=SlidingWindowInferer(roi_size=(4, 4, 4), sw_batch_size=1))
        with pytest.raises(medcam.MedcamError, match="element-wise or pooled formula"):
            cam.explain(torch.randn(1, 2, 8, 8, 8), BoxROI(0, (0, 0, 0), (3, 3, 3)))
    finally:
        h.remove()
    assert not calls


def test_a_method_whose_weights_are_not_additive_is_refused_for_several_passes():
    class NotAdditive(medcam.SegGradCAM):
        supports_sliding_window = False

    net = _Net().eval()
    x = torch.randn(1, 2, 8, 8, 8)
    plan = monai_plan(SlidingWindowInferer(roi_size=(4, 4, 4), sw_batch_size=1), x)
    with pytest.raises(medcam.MedcamError, match="not additive over passes"):
        NotAdditive(net, "enc").explain_plan(plan, BoxROI(0, (0, 0, 0), (3, 3, 3)))
