"""SyCAM: the expression grammar, SynthesizedCAM (= the built-ins it expresses, sliding == autograd), the search."""

from __future__ import annotations

import math

import pytest
import torch
from monai.inferers import SlidingWindowInferer, sliding_window_inference
from monai.networks.nets import SegResNet

import medcam
from medcam import targets as T
from medcam.sycam import (
    KNOWN_EXPRESSIONS,
    ExpressionError,
    SynthesizedCAM,
    fingerprint,
    parse_expression,
    random_inputs,
)
from medcam.synthesis import SynthesisCase, enumerate_expressions, synthesize

LAYER = "down_layers.2"


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return SegResNet(
        spatial_dims=3, in_channels=2, out_channels=3, init_filters=8, blocks_down=(1, 2, 2), blocks_up=(1, 1)
    ).eval()


@pytest.mark.parametrize(
    "bad, match",
    [
        ("sum(g", "does not parse"),
        ("g*g*A", "homogeneous of degree 1"),
        ("sum(g)/(sum(A)-sum(A))", "divides by zero everywhere"),
        ("sum(g)/0", "divides by zero everywhere"),
        ("sum(g+A)", "not zero where g = 0"),
        ("foo(g)", "cannot use"),
        ("x*A", "unknown name"),
        ("g*A + sum(g)", "mixes per-position"),
        ("sum(sum(g))", "sum\\(\\) inside sum"),
        ("A", "must depend on the gradient"),
        ("", "empty"),
        ("g^0.5*A", "powers"),
    ],
)
def test_bad_expressions_are_clear_errors(bad, match):
    with pytest.raises(ExpressionError, match=match):
        parse_expression(bad)
    assert issubclass(ExpressionError, medcam.MedcamError)


def test_text_round_trips_and_protected_division():
    for text in ["sum(g) / N", "sum(g*A) / sum(A)", "(sum(g) - sum(A)) / (sum(A^2) + 2)", "g*A - relu(g)*A"]:
        e = parse_expression(text)
        assert parse_expression(e.text()) == e
    e = parse_expression("sum(g) / sum(relu(g))")
    env = random_inputs()[0]
    env["g"][0, 0] = -abs(env["g"][0, 0])  # channel 0: ReLU(g) sums to 0 -> weight 0, not inf
    alpha = e.evaluate(env)
    assert float(alpha[0, 0]) == 0.0 and bool(torch.isfinite(alpha).all())


@pytest.mark.parametrize("name", list(KNOWN_EXPRESSIONS))
def test_an_expression_is_a_formula_of_the_builtin_kind(net, name, tmp_path):
    """The expression's formula has the kind (class) of the built-in method's formula: the executors dispatch on it."""
    from medcam.formulas import ActivationPooledFormula, ElementwiseFormula, PooledFormula

    kinds = (ActivationPooledFormula, PooledFormula, ElementwiseFormula)
    builtin = next(k for k in kinds if isinstance(medcam.METHODS[name].formula, k))
    cam = SynthesizedCAM(net, LAYER, expression=KNOWN_EXPRESSIONS[name])
    assert next(k for k in kinds if isinstance(cam.formula, k)) is builtin
    from_file = SynthesizedCAM.class_from_file(cam.save(tmp_path / f"{name}.sycam"))
    assert next(k for k in kinds if isinstance(from_file.formula, k)) is builtin
    assert type(SynthesizedCAM.formula) is not type(cam.formula)  # instances do not share one formula


@pytest.mark.parametrize("name", list(KNOWN_EXPRESSIONS))
@pytest.mark.parametrize("sliding", [False, True])
def test_expression_equals_the_builtin_it_expresses(net, name, sliding):
    torch.manual_seed(1)
    x = torch.randn(1, 2, 32, 24, 16)
    tl = [T.BoxROI(1, (0, 0, 0), (10, 10, 10)), T.ClassROI(2)]
    inf = SlidingWindowInferer((16, 16, 16), sw_batch_size=2, overlap=0.5, mode="gaussian") if sliding else None
    ref = medcam.METHODS[name](net, LAYER, inferer=inf).explain(x, tl, relu=False).maps
    got = SynthesizedCAM(net, LAYER, expression=KNOWN_EXPRESSIONS[name], inferer=inf).explain(x, tl, relu=False).maps
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("text", ["sum(relu(g)*A) / (sum(A^2) + N)", "2*g*A - relu(g)*A"])
def test_sliding_equals_autograd_through_monai_blending(net, text):
    """A new expression (no built-in) with sliding windows = the formula applied to per-window autograd gradients
    through MONAI's own sliding_window_inference (activation sums with the normalised blending weights)."""
    torch.manual_seed(2)
    x = torch.randn(1, 2, 24, 24, 16)
    inf = SlidingWindowInferer((16, 16, 16), sw_batch_size=1, overlap=0.5, mode="gaussian")
    target = T.BoxROI(1, (2, 3, 1), (14, 20, 12))
    got = SynthesizedCAM(net, LAYER, expression=text, inferer=inf).explain(x, [target], relu=False).maps[0, 0]

    layer = dict(net.named_modules())[LAYER]
    acts, coords = [], []
    h = layer.register_forward_hook(lambda m, i, o: acts.append(o))
    try:
        with torch.enable_grad():

            def predictor(win, coord):
                coords.append(coord)
                return net(win).clone()

            y = sliding_window_inference(x, (16, 16, 16), 1, predictor, overlap=0.5, mode="gaussian", with_coord=True)
            grads = torch.autograd.grad((target.score_weights(y.detach()) * y).sum(), acts)
    finally:
        h.remove()
    from monai.data.utils import compute_importance_map

    imp = compute_importance_map((16, 16, 16), mode="gaussian", device="cpu")
    count = torch.zeros(x.shape[2:])
    slices = [tuple(slice(int(s.start), int(s.stop)) for s in c[0][2:]) for c in coords]
    for s in slices:
        count[s] += imp
    e = parse_expression(text)
    pooled = e.kind == "pooled"
    feat = acts[0].shape[2:]
    ref = torch.zeros(x.shape[2:], dtype=torch.float64)
    if pooled:
        stats = {}
        for a, g, s in zip(acts, grads, slices):
            w = torch.nn.functional.adaptive_avg_pool3d((imp / count[s])[None, None], feat)[0].double()
            a, g = a.detach().double(), g.double()
            for term in e.sums():
                inner = term.args[0]
                v = inner.evaluate({"A": a, "g": g})
                v = v if inner.uses("g") else v * w
                key = "sum:" + inner.text()
                stats[key] = stats.get(key, 0) + v.flatten(2).sum(-1)
        n = x.shape[2] * x.shape[3] * x.shape[4] * (feat[0] / 16) ** 3
        alpha = e.evaluate({**stats, "N": n})
    for a, g, s in zip(acts, grads, slices):
        a, g = a.detach().double(), g.double()
        m = (alpha[..., None, None, None] * a).sum(1) if pooled else e.evaluate({"A": a, "g": g}).sum(1)
        up = torch.nn.functional.interpolate(m[None].float(), size=(16, 16, 16), mode="trilinear")[0, 0]
        ref[s] += (up * (imp / count[s]) if pooled else up).double()
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_enumeration_prunes_equivalent_expressions():
    st: dict = {}
    exprs = [e for e, _ in enumerate_expressions(3, stats=st)]
    texts = [e.text() for e in exprs]
    assert "sum(g)" in texts and "g*A" in texts and "relu(g)*A" in texts
    assert "sum(g)/N" not in texts  # = sum(g) up to a positive factor, pruned
    assert "sum(A) + sum(g)" not in texts and "sum(g) + sum(A)" in texts  # commuted duplicate pruned
    assert st["generated"] > len(exprs)
    fps = [fingerprint(e, random_inputs()) for e in exprs]
    assert len(set(fps)) == len(fps)


def _phantom_cases(net, n=4):
    cases = []
    for i in range(n):
        g = torch.Generator().manual_seed(10 + i)
        x = torch.randn(1, 2, 32, 24, 16, generator=g)
        lo = [int(torch.randint(0, 8, (1,), generator=g)) for _ in range(3)]
        t = T.BoxROI(i % 3, lo, [lo[0] + 14, lo[1] + 10, lo[2] + 8])
        ref = t.roi(torch.zeros(1, 3, 32, 24, 16))[0]
        cases.append(SynthesisCase(x[0], t, ref, name=f"p{i}"))
    return cases


@pytest.mark.parametrize("name", list(KNOWN_EXPRESSIONS))
def test_search_finds_a_known_method_when_it_is_best(net, name):
    """Metric = closeness to the built-in's map: the search must return an expression equivalent to it."""
    cls = medcam.METHODS[name]
    refs: dict = {}

    def closeness(m, case):
        if case.name not in refs:
            refs[case.name] = cls(net, LAYER).explain(case.image[None], [case.target]).maps[0, 0]
        r = refs[case.name]
        mn = m / m.max() if float(m.max()) > 0 else m
        rn = r / r.max() if float(r.max()) > 0 else r
        return -float((mn - rn).abs().max())

    cam = synthesize(net, LAYER, _phantom_cases(net, 3), metric=closeness, max_size=3, time_limit=120, builtins=())
    envs = random_inputs()
    assert fingerprint(cam.expr, envs) == fingerprint(parse_expression(KNOWN_EXPRESSIONS[name]), envs), cam.text
    assert cam.report.validation_score > -1e-4
    assert cam.report.train_score > -1e-4


def test_energy_search_reports_validation_and_saves(net, tmp_path):
    cases = _phantom_cases(net, 4)
    cam = synthesize(net, LAYER, cases, metric="energy", max_size=3, time_limit=60, seed=1)
    r = cam.report
    assert len(r.validation_cases) == 1 and len(r.train_cases) == 3
    assert not set(r.validation_cases) & set(r.train_cases)
    assert set(r.builtin_validation) == {"gradcam", "hirescam", "xgradcam", "gradcam++", "layercam"}
    # the train score is the best over all scored expressions (every built-in expressible here is among them)
    assert all(math.isnan(s) or s <= r.train_score + 1e-12 for _, s in r.top)
    # the reported validation score is the method's own energy on the validation case
    vc = next(c for c in cases if c.name == r.validation_cases[0])
    m = SynthesizedCAM(net, LAYER, expression=r.expression).explain(vc.image[None], [vc.target]).maps[0, 0]
    e = float(medcam.metrics.energy_pointing_game(m, vc.reference, spatial_dims=3))
    assert math.isclose(e, r.validation_score, rel_tol=1e-4)
    path = cam.save(tmp_path / "best.sycam")
    with pytest.raises(medcam.MedcamError, match="exists"):
        cam.save(path)
    loaded = SynthesizedCAM.class_from_file(path)(net, LAYER)
    assert loaded.expr == cam.expr
    from medcam.methods import resolve_method

    key, klass = resolve_method(f"synth:{path}")
    assert key == "synth-best" and klass(net, LAYER).expr == cam.expr


def test_metric_needing_references_without_them_fails_first(net):
    cases = _phantom_cases(net, 2)
    cases[1].reference = None
    with pytest.raises(medcam.MedcamError, match="needs reference masks"):
        synthesize(net, LAYER, cases, metric="energy")
    with pytest.raises(medcam.MedcamError, match="unknown metric"):
        synthesize(net, LAYER, cases, metric="dice?")


def test_deletion_metric_runs_and_is_lower_is_better(net):
    cam = synthesize(
        net, LAYER, _phantom_cases(net, 2), metric="deletion", max_size=1, deletion_steps=4, builtins=("gradcam",)
    )
    assert cam.report.higher_is_better is False and math.isfinite(cam.report.train_score)
    assert all(math.isnan(s) or s >= cam.report.train_score - 1e-9 for _, s in cam.report.top)
