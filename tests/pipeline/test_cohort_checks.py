"""Issue 30 items 9-10: errors found before any case and named right; progress bars of long commands."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from medcam.cli import main
from medcam.pipeline import PipelineError, RunSettings, prepare
from medcam.pipeline import settings as settings_mod
from medcam.pipeline.resume import case_conflict, fingerprint
from tests import test_pipeline as _fixtures

tiny_demo = _fixtures.tiny_demo
cases_root = _fixtures.cases_root


def test_a_bad_channel_order_is_refused_before_the_model_is_loaded(cases_root, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the channel order was checked")

    monkeypatch.setattr(settings_mod, "load_model", no_model)
    with pytest.raises(PipelineError, match=r"--channel-order t1,t1ce,t2,pd: channel_order must be a permutation"):
        prepare([str(cases_root)], RunSettings(channel_order=["t1", "t1ce", "t2", "pd"]))


def test_a_per_case_mask_added_to_an_existing_case_is_named_not_called_another_case(tmp_path):
    files = {m: tmp_path / f"C_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")}
    for f in [*files.values(), tmp_path / "C_mask.nii.gz"]:
        f.write_bytes(b"x")
    old = fingerprint(files)
    new = fingerprint({**files, "mask0": tmp_path / "C_mask.nii.gz"})
    why = case_conflict(tmp_path / "C", {"inputs": old}, new, "sig")
    assert why == "case 'C' was explained from other files (this run adds C_mask.nii.gz)"
    assert "another case" not in why


def test_an_evaluate_run_whose_every_case_failed_leaves_no_journal(tiny_demo, cases_root, tmp_path):
    root = tmp_path / "cohort"
    shutil.copytree(cases_root / "Phantom_00003", root / "Phantom_00003")
    for f in (root / "Phantom_00003").glob("*_flair.nii.gz"):
        f.write_bytes(b"\x1f\x8b garbage")
    out = tmp_path / "e"
    r = CliRunner().invoke(main, ["evaluate", str(root), "-o", str(out), "--quiet", "--device", "cpu", "--no-plots"])
    assert r.exit_code == 1 and "all 1 case(s) failed" in r.stderr, r.output
    assert not (out / ".medcam-journal").exists()


def test_report_and_layers_show_progress_unless_quiet(tiny_demo, cases_root, tmp_path):
    out = tmp_path / "o"
    args = ["explain", str(cases_root), "-o", str(out), "--no-png", "--no-slicer", "--device", "cpu", "--quiet"]
    assert CliRunner().invoke(main, args).exit_code == 0
    r = CliRunner().invoke(main, ["report", str(out)])
    assert r.exit_code == 0 and "medcam report" in r.stderr and "2/2" in r.stderr, r.stderr
    r = CliRunner().invoke(main, ["report", str(out), "--quiet"])
    assert r.exit_code == 0 and "medcam report" not in r.stderr
    r = CliRunner().invoke(main, ["layers", "--size", "24,24,24"])
    assert r.exit_code == 0 and "medcam layers" in r.stderr and "one forward pass" in r.stderr, r.stderr
    assert "medcam layers" not in CliRunner().invoke(main, ["layers", "--size", "24,24,24", "--quiet"]).stderr


def test_resume_signature_ignores_the_graph_budget_only():
    """The graph budget decides which network calls are recomputed, not the maps (tests/test_one_pass.py: bit-equal
    for every budget), so a run resumed with another budget skips the finished cases; any other setting still
    counts."""
    from medcam.pipeline.cohort import RESULT_NEUTRAL_SETTINGS, settings_signature

    base = {"methods": ["hirescam"], "threshold": 0.5, "graph_budget": None}
    assert RESULT_NEUTRAL_SETTINGS == ("graph_budget",)
    assert settings_signature({**base, "graph_budget": 0}) == settings_signature(base)
    assert settings_signature({**base, "graph_budget": 4 << 30}) == settings_signature(base)
    assert settings_signature({**base, "threshold": 0.4}) != settings_signature(base)
