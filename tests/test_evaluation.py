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
from medcam.metrics import deletion_curve, localisation_scores, make_score_fn


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
    per_map = {"energy_pointing_game", "pointing_game", "dice", "iou", "threshold_fraction", "hd95_mm",
               "deletion_auc", "insertion_auc", "average_drop_percent", "increase_in_confidence"}  # fmt: skip
    assert {r["metric"] for r in res.rows} == per_map
    assert len(res.rows) == 3 * 2 * 2 * len(per_map)  # (2 methods + metacam) x 2 layers x 2 targets
    # independent recomputation of one cell
    cam = medcam.SegHiResGradCAM(model, "mid")
    m = cam(img, [tl[1]])[0, 0]
    with torch.no_grad():
        w = tl[1].score_weights(model(img))
    d = deletion_curve(img, m, make_score_fn(model, w), steps=5)
    assert res.value("hirescam", "mid", tl[1].name, "deletion_auc") == pytest.approx(d.auc.item(), rel=1e-5)
    loc = localisation_scores(m[None], ref[None], "otsu", spacing=(1.0, 1.0, 2.0))
    assert res.value("hirescam", "mid", tl[1].name, "dice") == pytest.approx(loc["dice"].item())
    assert res.value("hirescam", "mid", tl[1].name, "hd95_mm") == pytest.approx(loc["hd95_mm"].item())
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
