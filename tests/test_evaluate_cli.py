"""`medcam evaluate`: the metrics table of a phantom case, overwrite protection and one-line errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from click.testing import CliRunner

from medcam.cli import evaluate_cmd as evaluate_command
from tests._cli_helpers import assert_one_line_error, write_sigmoid_factory

TINY_SPACING = 12.0
TINY_ROI = (24, 24, 24)  # one window covers the whole phantom at 12 mm
FAST = ["--steps", "3", "--device", "cpu", "--quiet"]


def _tiny_net() -> torch.nn.Module:
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    return SegResNet(spatial_dims=3, in_channels=4, out_channels=3, init_filters=8, blocks_down=(1, 1, 1, 1)).eval()


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a small shared CPU, more threads spin against each other (10x slower here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_demo(monkeypatch):
    """The demo API with a random small SegResNet on a 12 mm grid with one 24^3 window (fast on 2 CPU cores).

    The shipped weights are several seconds per case on a CPU; the command's plumbing is what is tested here."""
    from medcam.models import demo

    monkeypatch.setattr(demo, "load_demo_model", lambda device="cpu": _tiny_net().to(device))
    monkeypatch.setattr(demo, "DEMO_ROI_SIZE", TINY_ROI)
    monkeypatch.setattr(demo, "DEMO_SPACING_MM", TINY_SPACING)
    monkeypatch.setattr(demo, "demo_preprocessing_kwargs", lambda: {
        "orientation": "RAS", "spacing": (TINY_SPACING,) * 3, "normalize": True, "crop_foreground": False,
        "divisible_by": None})  # fmt: skip
    return demo


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    from medcam.data.phantoms import write_phantom_case

    return write_phantom_case(tmp_path_factory.mktemp("cases"), seed=0, spacing_mm=3.0)


def run(args):
    return CliRunner().invoke(evaluate_command, [str(a) for a in args])


def read_rows(path):
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def test_evaluate_writes_table_with_case_labels_as_reference(tiny_demo, case_dir, tmp_path):
    out = tmp_path / "eval"
    args = [case_dir, "-o", out, "-M", "gradcam,hirescam", "-t", "WT", "-t", "ET:class", *FAST]
    r = run(args)
    assert r.exit_code == 0, (r.output, r.stderr)
    assert sorted(p.name for p in out.iterdir()) == [
        "deletion_insertion.png", "metrics.csv", "metrics.json", "threshold_sweep.png"]  # fmt: skip
    cols, rows = read_rows(out / "metrics.csv")
    assert cols == ["case", "method", "layer", "target", "metric", "value"]
    per_map = {"energy_pointing_game", "pointing_game", "dice", "iou", "threshold_fraction", "hd95_monai_mm",
               "deletion_auc", "insertion_rise_auc", "average_drop_percent", "increase_in_confidence", "tied_fraction"}  # fmt: skip
    assert {r_["metric"] for r_ in rows} == per_map
    assert len(rows) == 2 * 1 * 2 * len(per_map)  # methods x layers x targets x metrics
    assert {r_["case"] for r_ in rows} == {"Phantom_00000"}
    assert {r_["target"] for r_ in rows} == {"WT", "ET-class"}  # the spec names, not predicted1/class2
    assert {r_["layer"] for r_ in rows} == {"down_layers.3"}
    assert len(json.loads((out / "metrics.json").read_text())["rows"]) == len(rows)
    assert "evaluated 1 case(s), 44 rows" in r.output

    # independent recomputation of one cell: the reference of target WT is the case's own WT label
    import medcam
    from medcam.metrics import localisation_scores
    from medcam.pipeline import build_targets, load_case, load_model, make_inferer, parse_targets, spacing_of

    loaded = load_model("demo")
    case = load_case(case_dir, loaded)
    tl = build_targets(parse_targets(["WT"], loaded.regions), case)
    cam = medcam.SegHiResGradCAM(loaded.net, "down_layers.3", inferer=make_inferer(loaded.roi_size))
    m = cam(case.image.as_tensor()[None].float(), tl)[0, 0]
    wt = case.label.as_tensor()[1] > 0
    loc = localisation_scores(m[None], wt[None], "otsu", spacing=spacing_of(case.image.affine))
    got = next(
        float(r_["value"])
        for r_ in rows
        if (r_["method"], r_["target"], r_["metric"]) == ("hirescam", "WT", "energy_pointing_game")
    )
    assert got == pytest.approx(loc["energy_pointing_game"].item(), rel=1e-4, abs=1e-6)

    # outputs exist: refused without --overwrite (one line), replaced with it
    assert_one_line_error(run(args), "exists")
    r = run(
        [case_dir, "-o", out, "-M", "hirescam", "-t", "WT", "--metrics", "deletion", "--no-plots", "--overwrite", *FAST]
    )
    assert r.exit_code == 0, r.stderr
    assert {r_["metric"] for r_ in read_rows(out / "metrics.csv")[1]} == {"deletion_auc", "tied_fraction"}
    # the conventions are options and are named in the table and in metrics.json
    r = run([case_dir, "-o", out, "-M", "hirescam", "-t", "WT", "--metrics", "localisation,insertion", "--no-plots",
             "--overwrite", "--hd95-convention", "pooled", "--insertion-protocol", "baseline", *FAST])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    names = {r_["metric"] for r_ in read_rows(out / "metrics.csv")[1]}
    assert {"hd95_pooled_mm", "insertion_baseline_auc"} <= names and "hd95_monai_mm" not in names
    settings = json.loads((out / "metrics.json").read_text())["settings"]
    assert settings["hd95_convention"] == "pooled" and settings["insertion_protocol"] == "baseline"


def test_evaluate_sanity_and_reference_none(tiny_demo, case_dir, tmp_path):
    out = tmp_path / "eval"
    r = run(
        [
            case_dir,
            "-o",
            out,
            "-M",
            "hirescam",
            "-t",
            "ET",
            "--reference",
            "none",
            "--metrics",
            "default,sanity",
            "--sanity-steps",
            "2",
            "--no-plots",
            *FAST,
        ]
    )
    assert r.exit_code == 0, r.stderr
    metrics = {r_["metric"] for r_ in read_rows(out / "metrics.csv")[1]}
    assert "dice" not in metrics and "deletion_auc" in metrics  # no reference: localisation dropped
    assert {"sanity_spearman_final", "sanity_ssim_mean", "sanity_constant_steps"} <= metrics


def test_evaluate_cohort_with_a_broken_case(tiny_demo, case_dir, tmp_path):
    import shutil

    root = tmp_path / "cohort"
    shutil.copytree(case_dir, root / case_dir.name)
    bad = root / "Phantom_00009"
    shutil.copytree(case_dir, bad)
    for f in bad.iterdir():
        f.rename(bad / f.name.replace("00000", "00009"))
    (bad / "Phantom_00009_t1.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "eval"
    r = run([root, "-o", out, "-M", "hirescam", "-t", "WT", "--metrics", "deletion", "--no-plots", *FAST])
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    assert "1 of 2 case(s) failed: Phantom_00009" in r.stderr
    assert {r_["case"] for r_ in read_rows(out / "metrics.csv")[1]} == {"Phantom_00000"}  # the good case is kept


def test_evaluate_parts_cover_every_case_once_with_the_rows_of_one_run(tiny_demo, tmp_path):
    from medcam.data.phantoms import write_phantom_case

    root = tmp_path / "cohort"
    ids = [write_phantom_case(root, seed=s, spacing_mm=3.0, case_id=f"Phantom_{s:05d}").name for s in range(3)]
    common = ["-M", "gradcam", "-t", "WT", "--metrics", "localisation,deletion", "--no-plots", *FAST]
    whole, split = tmp_path / "whole", tmp_path / "split"
    r = run([root, "-o", whole, *common])
    assert r.exit_code == 0, r.stderr
    for part in (0, 1):
        r = run([root, "-o", split, "--num-parts", 2, "--part-id", part, *common])
        assert r.exit_code == 0, r.stderr
    # the parts share one folder: each writes its own tables, and no journal is left behind
    assert sorted(p.name for p in split.iterdir()) == [
        "metrics.part0-of-2.csv", "metrics.part0-of-2.json", "metrics.part1-of-2.csv", "metrics.part1-of-2.json"]  # fmt: skip
    cols, rows0 = read_rows(split / "metrics.part0-of-2.csv")
    _, rows1 = read_rows(split / "metrics.part1-of-2.csv")
    cases0, cases1 = {r_["case"] for r_ in rows0}, {r_["case"] for r_ in rows1}
    assert cases0 and cases1 and not cases0 & cases1 and cases0 | cases1 == set(ids)  # each case in exactly one part
    _, rows = read_rows(whole / "metrics.csv")
    assert len(rows) == len(rows0) + len(rows1)
    as_tuples = lambda rs: sorted(tuple(r_[c] for c in cols) for r_ in rs)  # noqa: E731
    assert as_tuples(rows0 + rows1) == as_tuples(rows)  # the same rows, value for value
    assert {r_["metric"] for r_ in rows} >= {"dice", "deletion_auc"}


def test_evaluate_part_options_checked_before_any_work(tiny_demo, case_dir, tmp_path):
    r = run([case_dir, "-o", tmp_path / "e", "--num-parts", 2, "--part-id", 2, *FAST])
    assert_one_line_error(r, "--part-id must be in 0..1")
    assert not (tmp_path / "e").exists()


def test_evaluate_synth_method_and_activation_none(case_dir, tmp_path):
    fac = write_sigmoid_factory(tmp_path / "sig.py")
    expr = tmp_path / "gc.sycam"
    expr.write_text("sum(g) / N\n")
    out = tmp_path / "eval"
    args = [case_dir, "-o", out, "--model", f"{fac}:build", "--regions", "lesion", "--spacing", "8", "-l", "feat",
            "-M", f"gradcam,synth:{expr}", "--activation", "none", "--metrics", "insertion,average_drop",
            "--no-plots", *FAST]  # fmt: skip
    r = run(args)
    assert r.exit_code == 0, r.stderr
    rows = read_rows(out / "metrics.csv")[1]
    assert {r_["method"] for r_ in rows} == {"gradcam", "synth-gc"}
    vals = {(r_["method"], r_["metric"]): float(r_["value"]) for r_ in rows}
    for metric in ("insertion_rise_auc", "average_drop_percent"):
        assert vals[("synth-gc", metric)] == pytest.approx(vals[("gradcam", metric)], rel=1e-4, abs=1e-6)
    assert 0 <= vals[("gradcam", "insertion_rise_auc")] <= 1  # mean probability of the outputs as they are
    assert json.loads((out / "metrics.json").read_text())["rows"]


def test_evaluate_is_registered_in_the_medcam_group():
    from medcam.cli import main

    r = CliRunner().invoke(main, ["evaluate", "--help"])
    assert r.exit_code == 0 and "--reference" in r.output and "--metrics" in r.output


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--metrics", "speed"], "unknown metric 'speed'"),
        (["-M", "gradkam"], "unknown method 'gradkam'"),
        (["--reference", "mask:nope.nii.gz"], "--reference"),
        (["--map-threshold", "median"], "--map-threshold"),
        (["-t", "NCR"], "unknown region 'NCR'"),
        (["-l", "no.such.layer"], "no.such.layer"),
    ],
)
def test_evaluate_bad_options_one_line(tiny_demo, case_dir, tmp_path, extra, needle):
    assert_one_line_error(run([case_dir, "-o", tmp_path / "e", *extra, *FAST]), needle)
    assert not (tmp_path / "e" / "metrics.csv").exists()


def test_evaluate_missing_input_is_a_clean_error(tmp_path):
    r = run([tmp_path / "no_such_case", "-o", tmp_path / "e", "--quiet"])
    assert r.exit_code != 0
    assert_one_line_error(r, "does not exist")
    assert not (tmp_path / "e").exists()
