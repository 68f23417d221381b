"""evaluate(): table contents against direct metric calls, writing with overwrite protection."""

import csv
import json
import math

import pytest
import torch
from torch import nn

import medcam
from medcam import targets
from medcam.errors import MedcamError
from medcam.evaluation import evaluate, evaluate_cohort, write_results
from medcam.metrics import (
    deletion_curve,
    insertion_curve,
    localisation_scores,
    make_score_fn,
    tied_fraction,
)


class TinySeg(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv3d(1, 4, 3, padding=1)
        self.mid = nn.Conv3d(4, 4, 3, padding=1)
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.mid(torch.relu(self.enc(x)))))


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    model = TinySeg().eval()
    img = torch.zeros(1, 1, 10, 10, 10)
    img[..., 3:7, 3:7, 3:7] = 1.0
    img += 0.1 * torch.randn(img.shape, generator=torch.Generator().manual_seed(1))
    ref = torch.zeros(10, 10, 10, dtype=torch.bool)
    ref[3:7, 3:7, 3:7] = True
    return model, img, ref


def test_evaluate_table_matches_direct_metrics(case):
    model, img, ref = case
    tl = [targets.ClassROI(1), targets.BoxROI(0, (2, 2, 2), (8, 8, 8))]
    res = evaluate(
        model, img, tl, methods=("gradcam", "hirescam"), layers=("mid", "enc"), reference=ref,
        spacing=(1.0, 1.0, 2.0), steps=5, consensus=True,
    )  # fmt: skip
    per_map = {"energy_pointing_game", "pointing_game", "dice", "iou", "threshold_fraction", "hd95_monai_mm",
               "deletion_auc", "insertion_rise_auc", "average_drop_percent", "increase_in_confidence", "tied_fraction"}  # fmt: skip
    assert {r["metric"] for r in res.rows} == per_map
    assert len(res.rows) == 3 * 2 * 2 * len(per_map)  # (2 methods + metacam) x 2 layers x 2 targets
    # independent recomputation of one cell
    cam = medcam.SegHiResGradCAM(model, "mid")
    m = cam(img, [tl[1]])[0, 0]
    with torch.no_grad():
        w = tl[1].score_weights(model(img))
    d = deletion_curve(img, m, make_score_fn(model, w), steps=5)
    assert res.value("hirescam", "mid", tl[1].name, "deletion_auc") == pytest.approx(d.auc.item(), rel=1e-5)
    ins = insertion_curve(img, m, make_score_fn(model, w, activation="sigmoid", reduction="mean"), steps=5)
    assert res.value("hirescam", "mid", tl[1].name, "insertion_rise_auc") == pytest.approx(ins.auc.item(), rel=1e-5)
    assert res.value("hirescam", "mid", tl[1].name, "tied_fraction") == pytest.approx(tied_fraction(m[None]).item())
    loc = localisation_scores(m[None], ref[None], "otsu", spacing=(1.0, 1.0, 2.0))
    assert res.value("hirescam", "mid", tl[1].name, "dice") == pytest.approx(loc["dice"].item())
    assert res.value("hirescam", "mid", tl[1].name, "hd95_monai_mm") == pytest.approx(loc["hd95_monai_mm"].item())
    key = ("case", "gradcam", "enc", tl[0].name, "insertion")
    assert len(res.curves[key][0]) == 6
    df = res.to_dataframe()
    assert set(df.columns) == {"case", "method", "layer", "target", "metric", "value"}


def test_evaluate_road_sanity_and_cohort(case):
    model, img, ref = case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = evaluate_cohort(
        model, [("a", img, ref), ("b", img.flip(-1), None)], targets.ClassROI(1), methods=("hirescam",),
        layers=("mid",), metrics=("road", "sanity"), road_percentiles=(20, 80),
    )  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {r["case"] for r in res.rows} == {"a", "b"}
    comb = res.value("hirescam", "mid", "class1", "road_combined", case="a")
    morf = res.value("hirescam", "mid", "class1", "road_morf", case="a")
    lerf = res.value("hirescam", "mid", "class1", "road_lerf", case="a")
    assert comb == pytest.approx((lerf - morf) / 2, rel=1e-5)
    assert res.value("hirescam", "mid", "class1", "sanity_spearman_final", case="a") < 0.99
    assert res.value("hirescam", "mid", "class1", "sanity_original_constant", case="a") == 0.0
    assert 0 <= res.value("hirescam", "mid", "class1", "sanity_constant_steps", case="a") <= 3
    thin = evaluate(
        model, img, targets.ClassROI(1), methods=("hirescam",), layers=("mid",), metrics=("sanity",), sanity_max_steps=1
    )
    # one map only, after randomising every layer: the "final" value is the same, the mean is over that one step
    assert thin.value("hirescam", "mid", "class1", "sanity_spearman_final") == pytest.approx(
        res.value("hirescam", "mid", "class1", "sanity_spearman_final", case="a"), abs=1e-6
    )
    assert thin.value("hirescam", "mid", "class1", "sanity_spearman_mean") == pytest.approx(
        thin.value("hirescam", "mid", "class1", "sanity_spearman_final")
    )


def test_evaluate_target_names_label_the_rows(case):
    model, img, ref = case
    tl = [targets.ClassROI(1), targets.PredictedROI(1)]
    res = evaluate(
        model,
        img,
        tl,
        methods=("gradcam",),
        layers=("mid",),
        reference=ref,
        steps=2,
        metrics=("localisation", "deletion"),
        target_names=["WT-class", "WT"],
    )
    assert {r["target"] for r in res.rows} == {"WT-class", "WT"}
    assert {k[3] for k in res.curves} == {"WT-class", "WT"} and {k[3] for k in res.sweeps} == {"WT-class", "WT"}
    with pytest.raises(MedcamError, match="one per target"):
        evaluate(model, img, tl, metrics=("deletion",), target_names=["a"])
    with pytest.raises(MedcamError, match="not distinct"):
        evaluate(model, img, tl, metrics=("deletion",), target_names=["a", "a"])


def test_evaluate_bad_input_fails_early(case):
    model, img, ref = case
    with pytest.raises(MedcamError, match="reference"):
        evaluate(model, img, targets.ClassROI(1), metrics=("localisation",))
    with pytest.raises(MedcamError, match="unknown method"):
        evaluate(model, img, targets.ClassROI(1), methods=("gradkam",), metrics=("deletion",))
    with pytest.raises(MedcamError, match="unknown metrics"):
        evaluate(model, img, targets.ClassROI(1), metrics=("speed",))
    with pytest.raises(MedcamError, match="one 3D case"):
        evaluate(model, img.repeat(2, 1, 1, 1, 1), targets.ClassROI(1), metrics=("deletion",))


def test_write_results_atomic_and_refuses_overwrite(case, tmp_path):
    model, img, ref = case
    res = evaluate(model, img, targets.ClassROI(1), methods=("gradcam",), layers=("mid",), reference=ref, steps=4)
    res.rows.append(dict(case="case", method="x", layer="y", target="z", metric="nanmetric", value=math.nan))
    paths = write_results(res, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["metrics.csv", "metrics.json", "deletion_insertion.png", "threshold_sweep.png"]
    )
    with open(paths["csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(res.rows)
    dice = next(r for r in rows if r["metric"] == "dice")
    assert float(dice["value"]) == pytest.approx(res.value("gradcam", "mid", "class1", "dice"))
    js = json.loads(paths["json"].read_text())
    assert js["rows"][-1]["value"] is None  # NaN -> null (valid JSON)
    with pytest.raises(FileExistsError):
        write_results(res, tmp_path / "out")
    write_results(res, tmp_path / "out", overwrite=True, plots=False)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp")]


def test_evaluate_names_conventions_in_rows_and_json(case, tmp_path):
    model, img, ref = case
    res = evaluate(
        model, img, targets.ClassROI(1), methods=("hirescam",), layers=("mid",), reference=ref, steps=4,
        metrics=("localisation", "insertion"), insertion_protocol="baseline", hd95_convention="pooled",
    )  # fmt: skip
    names = {r["metric"] for r in res.rows}
    assert {"hd95_pooled_mm", "insertion_baseline_auc"} <= names
    assert not names & {"hd95_monai_mm", "hd95_mm", "insertion_rise_auc", "insertion_auc"}
    cam = medcam.SegHiResGradCAM(model, "mid")
    m = cam(img, [targets.ClassROI(1)])[0, 0]
    with torch.no_grad():
        w = targets.ClassROI(1).score_weights(model(img))
    ins = insertion_curve(img, m, make_score_fn(model, w), steps=4, protocol="baseline", baseline="zero")
    assert res.value("hirescam", "mid", "class1", "insertion_baseline_auc") == pytest.approx(ins.auc.item(), rel=1e-5)
    loc = localisation_scores(m[None], ref[None], "otsu", hd95_convention="pooled")
    assert res.value("hirescam", "mid", "class1", "hd95_pooled_mm") == pytest.approx(loc["hd95_pooled_mm"].item())
    assert res.settings["hd95_convention"] == "pooled" and res.settings["insertion_protocol"] == "baseline"
    paths = write_results(res, tmp_path / "o", plots=False)
    js = json.loads(paths["json"].read_text())
    assert js["settings"]["hd95_convention"] == "pooled" and js["settings"]["road_percentiles"][-1] == 90.0
    with pytest.raises(MedcamError, match="hd95_convention"):
        evaluate(model, img, targets.ClassROI(1), metrics=("deletion",), hd95_convention="medpy")
    with pytest.raises(MedcamError, match="insertion_protocol"):
        evaluate(model, img, targets.ClassROI(1), metrics=("deletion",), insertion_protocol="blur")
    with pytest.raises(MedcamError, match="output_activation must be 'sigmoid', 'softmax' or 'none', got 'relu'"):
        evaluate(model, img, targets.ClassROI(1), metrics=("deletion",), output_activation="relu")
    with pytest.raises(MedcamError, match="threshold method must be 'value', 'percentile' or 'otsu', got 'median'"):
        evaluate(model, img, targets.ClassROI(1), metrics=("deletion",), threshold=("median", None))


def test_evaluate_sanity_freezes_predicted_roi_literal_adebayo_reference(case):
    """evaluate()'s sanity rows against a literal cascade: same re-initialisation, the trained model's predicted
    region kept fixed as a MaskROI, Spearman from scipy."""
    import copy

    from scipy.stats import spearmanr

    model, img, _ = case
    with torch.no_grad():
        prob = torch.sigmoid(model(img)[:, 1])
    t = targets.PredictedROI(1, threshold=float(prob.quantile(0.7)))  # the trained model predicts 30 % of the volume
    with torch.no_grad():
        trained_roi = t.roi(model(img))
    assert 0 < trained_roi.sum() < trained_roi.numel()
    res = evaluate(model, img, t, methods=("hirescam",), layers=("mid",), metrics=("sanity",))
    m0 = medcam.SegHiResGradCAM(model, "mid")(img, [t])[0, 0]
    net = copy.deepcopy(model)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for name in ("head", "mid", "enc"):  # reverse execution order, cascading
            getattr(net, name).reset_parameters()
    frozen_map = medcam.SegHiResGradCAM(net, "mid")(img, [targets.MaskROI(trained_roi, 1)])[0, 0]
    moved_map = medcam.SegHiResGradCAM(net, "mid")(img, [t])[0, 0]  # region re-predicted: what must not happen

    def sp(a, b):
        if a.max() == a.min() or b.max() == b.min():
            return 0.0 if (a.max() == a.min()) != (b.max() == b.min()) else 1.0
        return spearmanr(a.reshape(-1).numpy(), b.reshape(-1).numpy()).statistic

    got = res.value("hirescam", "mid", "predicted1", "sanity_spearman_final")
    assert got == pytest.approx(sp(m0, frozen_map), abs=1e-5)
    assert abs(sp(m0, moved_map) - sp(m0, frozen_map)) > 1e-3  # the reference can tell the two protocols apart
    assert res.value("hirescam", "mid", "predicted1", "sanity_original_constant") == 0.0


def test_evaluate_activation_none_scores_the_outputs_as_probabilities(case):
    """A network ending in its own sigmoid: its outputs are the probabilities of average drop and RISE insertion."""
    from medcam.metrics import average_drop_increase

    model, img, _ = case
    prob_model = nn.Sequential(model, nn.Sigmoid()).eval()
    tl = [targets.BoxROI(1, (2, 2, 2), (8, 8, 8))]
    kw = dict(methods=("hirescam",), layers=("0.mid",), metrics=("insertion", "average_drop"), steps=5)
    res = evaluate(prob_model, img, tl, output_activation="none", **kw)
    m = medcam.SegHiResGradCAM(prob_model, "0.mid")(img, tl)[0, 0]
    with torch.no_grad():
        w = tl[0].score_weights(prob_model(img))

    def prob_sum(x):  # literal score: sum of the outputs as they are over the ROI
        with torch.no_grad():
            return (prob_model(x) * w).flatten(1).sum(1)

    ins = insertion_curve(img, m, lambda x: prob_sum(x) / w.sum(), steps=5, protocol="rise")
    ad = average_drop_increase(img, m, prob_sum)
    name = tl[0].name
    assert res.value("hirescam", "0.mid", name, "insertion_rise_auc") == pytest.approx(ins.auc.item(), rel=1e-5)
    assert res.value("hirescam", "0.mid", name, "average_drop_percent") == pytest.approx(
        ad["drop_percent"].item(), rel=1e-5, abs=1e-6
    )
    twice = evaluate(prob_model, img, tl, output_activation="sigmoid", **kw)  # a second sigmoid: other numbers
    assert abs(twice.value("hirescam", "0.mid", name, "insertion_rise_auc") - ins.auc.item()) > 1e-3
    with pytest.raises(MedcamError, match="'sigmoid', 'softmax' or 'none'"):
        evaluate(prob_model, img, tl, output_activation="identity", **kw)


def test_evaluate_synth_file_method_equals_its_builtin(case, tmp_path):
    model, img, ref = case
    expr = tmp_path / "gc.sycam"
    expr.write_text("# Seg-Grad-CAM as an expression\nsum(g) / N\n")
    tl = [targets.ClassROI(1)]
    res = evaluate(
        model, img, tl, methods=("gradcam", f"synth:{expr}"), layers=("mid",), reference=ref,
        metrics=("localisation", "average_drop"),
    )  # fmt: skip
    assert {r["method"] for r in res.rows} == {"gradcam", "synth-gc"}
    for metric in ("energy_pointing_game", "average_drop_percent"):
        want = res.value("gradcam", "mid", tl[0].name, metric)
        assert res.value("synth-gc", "mid", tl[0].name, metric) == pytest.approx(want, rel=1e-4, abs=1e-6)
