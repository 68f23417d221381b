"""The runner (one place that runs the model), the formula kinds and the executors' shared contract."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import SlidingWindowInferer
from torch import nn

import medcam
from medcam import targets as T
from medcam.evaluation import evaluate
from medcam.formulas import ActivationPooledFormula, ElementwiseFormula, PooledFormula
from medcam.runner import ModelRunner
from tests._nets import LinearHeadNet


class DeepSupervision(nn.Module):
    """Returns ``(main output, auxiliary output)`` like nnU-Net/DynUNet deep supervision; the aux head differs."""

    def __init__(self):
        super().__init__()
        self.net = LinearHeadNet(cout=2)
        self.aux = nn.Conv3d(5, 2, 1)

    def forward(self, x):
        a = self.net.feat(self.net.enc(x))
        return self.net.head(a), self.aux(a)


def _state(model):
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


def test_predict_selects_the_output_and_preserves_the_model():
    torch.manual_seed(0)
    model = DeepSupervision().train()  # left in training mode by the user: restored after the call
    before = _state(model)
    x = torch.randn(1, 2, 8, 8, 8)
    with torch.no_grad():
        expected = model.eval()(x)
    model.train()
    y0 = ModelRunner(model).predict(x)
    y1 = ModelRunner(model, output_index=1).predict(x)
    torch.testing.assert_close(y0, expected[0])
    torch.testing.assert_close(y1, expected[1])
    assert not y0.requires_grad and _state(model) == before
    assert all(p.grad is None for p in model.parameters())
    inferer = SlidingWindowInferer(roi_size=(8, 8, 8), overlap=0.5)
    torch.testing.assert_close(ModelRunner(model).predict(torch.randn(1, 2, 12, 8, 8), inferer).shape[1], 2)


def test_evaluation_takes_the_same_output_as_the_explainers():
    """A deep-supervision model (tuple output) used to break only in evaluate(): it now selects output 0."""
    torch.manual_seed(1)
    model = DeepSupervision().eval()
    x = torch.randn(1, 2, 8, 8, 8)
    res = evaluate(
        model, x, [T.ClassROI(1)], methods=("hirescam",), layers=("net.feat",), metrics=("deletion",), steps=4
    )
    with torch.no_grad():
        full = (model(x)[0][:, 1]).sum()
    curve = res.curves[("case", "hirescam", "net.feat", "class1", "deletion")]
    assert curve[1][0] == pytest.approx(float(full), rel=1e-5)  # deletion starts at the unperturbed score


def test_runner_gradient_is_with_respect_to_the_activation_only():
    torch.manual_seed(2)
    model = LinearHeadNet()
    runner = ModelRunner(model, "feat")
    x = torch.randn(1, 2, 8, 8, 8)
    with runner.session("grad") as hook:
        y, a = runner.forward(x, hook)
        w = torch.zeros_like(y)
        w[:, 0] = 1.0
        g = runner.activation_grad(y, a, w)
        with hook.mode_as("stop"):
            assert hook.mode == "stop"
            a2 = runner.activations(x, hook)
        assert hook.mode == "grad"
    # the head is a 1x1 conv: dS/dA_k(u) = w_0k for S = sum_u y_0(u)
    expected = model.head.weight[0, :, 0, 0, 0][None, :, None, None, None].expand_as(g)
    torch.testing.assert_close(g, expected.detach())
    torch.testing.assert_close(a2, a.detach())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not model.feat._forward_hooks


@pytest.mark.parametrize("name", list(medcam.METHODS))
def test_every_method_has_a_formula_of_one_kind(name):
    formula = medcam.METHODS[name].formula
    assert isinstance(formula, (ElementwiseFormula, PooledFormula))
    assert not isinstance(formula, ElementwiseFormula) or not isinstance(formula, PooledFormula)
    if isinstance(formula, PooledFormula) and not isinstance(formula, ActivationPooledFormula):
        assert formula.activation_statistics(torch.ones(1, 2, 3), None) == {}


def test_a_class_without_formula_is_refused():
    with pytest.raises(medcam.MedcamError, match="no formula"):
        medcam.BaseSegCAM(LinearHeadNet(), "feat")
