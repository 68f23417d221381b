"""Predicted-region explanations in one pass (medcam.kept_graphs): the prediction is blended from the explanation's
own network calls, whose graphs are kept within a budget (the others recomputed), on MONAI's sliding window.

The maps equal plain autograd through MONAI's blending in tests/test_sliding.py (PredictedROI targets, all graphs
kept and none kept); nnU-Net's folds x tiles x mirrors in tests/frameworks/test_nnunet.py. Here: the blended output
is MONAI's to the bit, the result is the same for every budget and equals the two-pass result (prediction given),
and each window runs the network once.
"""

from __future__ import annotations

import pytest
import torch
from monai.inferers import SlidingWindowInferer, sliding_window_inference
from monai.networks.nets import SegResNet

import medcam
from medcam import targets as T
from medcam.errors import MedcamError
from medcam.formulas import PooledFormula

LAYER = "down_layers.1"
GRADIENT_METHODS = [n for n, c in medcam.METHODS.items() if n not in ("micam", "migradcam")]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return SegResNet(
        spatial_dims=3, in_channels=1, out_channels=2, init_filters=8, blocks_down=(1, 1), blocks_up=(1,)
    ).eval()


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(3)
    x = torch.randn(2, 1, 20, 16, 16)  # 2 x 2 x 1 windows per sample, 3 per network call
    inferer = SlidingWindowInferer(roi_size=(16, 12, 16), sw_batch_size=3, overlap=0.5, mode="gaussian")
    return x, inferer


def _monai(net, x, inferer):
    with torch.no_grad():
        return sliding_window_inference(
            x, inferer.roi_size, inferer.sw_batch_size, net, overlap=inferer.overlap, mode=inferer.mode
        )


class _Calls:
    """Counts the network's calls (a forward pre-hook: calls stopped at the layer count too; removed on exit)."""

    def __init__(self, net):
        self.net, self.n = net, 0

    def __enter__(self):
        self.h = self.net.register_forward_pre_hook(lambda *_: setattr(self, "n", self.n + 1))
        return self

    def __exit__(self, *exc):
        self.h.remove()


@pytest.mark.parametrize("method", list(medcam.METHODS))
def test_every_budget_gives_the_two_pass_result(net, case, method):
    """All graphs kept, one call's graph kept, none kept: the same maps, scores and output (bit-equal), MONAI's
    blended output to the bit, and the result of the run with that output given (two passes)."""
    x, inferer = case
    targets = [T.PredictedROI(1), T.PredictedROI(0, activation="sigmoid", threshold=0.6)]
    y = _monai(net, x, inferer)
    cls = medcam.METHODS[method]
    given = cls(net, layer=LAYER, inferer=inferer).explain(x, targets, output=y)
    results = {}
    for budget in (None, 0, 1):  # 1 byte: the first call's graph does not fit either
        results[budget] = cls(net, layer=LAYER, inferer=inferer, graph_budget=budget).explain(x, targets)
    one = results[None]
    assert torch.equal(one.output, y)
    for budget, res in results.items():
        assert torch.equal(res.maps, one.maps), budget
        assert torch.equal(res.scores, one.scores) and torch.equal(res.output, one.output), budget
    assert float(given.maps.abs().max()) > 0
    torch.testing.assert_close(one.maps, given.maps, rtol=1e-5, atol=1e-6 * float(given.maps.abs().max()))
    torch.testing.assert_close(one.scores, given.scores, rtol=1e-6, atol=0)
    torch.testing.assert_close(one.roi_voxels, given.roi_voxels, rtol=0, atol=0)
    if method in GRADIENT_METHODS:
        assert one.stats["prediction"] == "one_pass" and "one_pass" not in one.stats
        assert one.stats["graph_calls_recomputed"] == 0
        n_calls = -(-one.stats["windows"] // inferer.sw_batch_size)
        assert results[0].stats["graph_calls_recomputed"] == results[1].stats["graph_calls_recomputed"] > 0
        assert results[0].stats["graph_calls_recomputed"] <= n_calls
    else:  # MI-CAM's own histogram passes: the prediction runs first, and the result says so
        assert one.stats["prediction"] == "predictor" and "own passes" in one.stats["one_pass"]


def test_a_small_budget_keeps_some_graphs_and_recomputes_the_others(net, case):
    x, inferer = case
    targets = [T.PredictedROI(1)]
    full = medcam.SegHiResGradCAM(net, layer=LAYER, inferer=inferer).explain(x, targets)
    n_calls = -(-full.stats["windows"] // inferer.sw_batch_size)
    per_call = full.stats["graph_peak_bytes"] // n_calls
    budget = 2 * per_call + per_call // 2
    part = medcam.SegHiResGradCAM(net, layer=LAYER, inferer=inferer, graph_budget=budget).explain(x, targets)
    assert 0 < part.stats["graph_peak_bytes"] <= budget < full.stats["graph_peak_bytes"]
    assert 0 < part.stats["graph_calls_recomputed"] < n_calls
    assert torch.equal(part.maps, full.maps) and torch.equal(part.output, full.output)


@pytest.mark.parametrize("method", ["hirescam", "gradcam", "gradcam++"])
def test_each_window_runs_the_network_once(net, case, method):
    """One network call per batch of windows (all graphs kept); the two-pass run calls it for the prediction and
    again for the windows of the ROI. Pooled methods add their map pass (stopped at the layer) either way."""
    x, inferer = case
    targets = [T.PredictedROI(1), T.PredictedROI(0)]
    cls = medcam.METHODS[method]
    with _Calls(net) as one:
        res = cls(net, layer=LAYER, inferer=inferer).explain(x, targets)
    with _Calls(net) as given:
        cls(net, layer=LAYER, inferer=inferer).explain(x, targets, output=res.output)
    n_calls = -(-res.stats["windows"] // inferer.sw_batch_size)
    map_pass = n_calls if isinstance(cls.formula, PooledFormula) else 0  # no activation cache with MONAI
    assert one.n == n_calls + map_pass
    assert given.n >= one.n  # the given-output run: the ROI's windows (here all of them) and the same map pass


def test_probability_score_is_one_pass(net, case):
    x, inferer = case
    tgt = T.BoxROI(1, (2, 2, 2), (20, 14, 12))
    cam = medcam.SegHiResGradCAM(net, layer=LAYER, inferer=inferer, score="probability", output_activation="sigmoid")
    res = cam.explain(x, tgt)
    y = _monai(net, x, inferer)
    given = cam.explain(x, tgt, output=y)
    assert res.stats["prediction"] == "one_pass" and torch.equal(res.output, y)
    torch.testing.assert_close(res.maps, given.maps, rtol=1e-5, atol=1e-6 * float(given.maps.abs().max()))
    torch.testing.assert_close(res.scores, given.scores, rtol=1e-6, atol=0)


def test_targets_that_do_not_need_the_prediction_skip_it(net, case):
    """A box target needs no prediction: only the windows it touches run, no graphs are kept."""
    x, inferer = case
    res = medcam.SegHiResGradCAM(net, layer=LAYER, inferer=inferer).explain(x, T.BoxROI(1, (0, 0, 0), (3, 3, 5)))
    assert "prediction" not in res.stats and "graph_budget" not in res.stats
    assert res.stats["backward_windows"] < res.stats["windows"]


def test_model_left_as_it_was(net, case):
    x, inferer = case
    flags = [p.requires_grad for p in net.parameters()]
    net.train()
    medcam.SegGradCAM(net, layer=LAYER, inferer=inferer, graph_budget=10**6).explain(x, T.PredictedROI(1))
    assert net.training and [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())
    net.eval()


@pytest.mark.parametrize("bad", [-1, 1.5, "1GB", True])
def test_bad_graph_budget_is_refused(net, bad):
    with pytest.raises(MedcamError, match="graph_budget must be None"):
        medcam.SegGradCAM(net, layer=LAYER, graph_budget=bad)
