"""Issue 19 on the command line: reused layers refused before any case, plain-named folders, probability outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from medcam.cli import main
from tests import test_pipeline as _fixtures
from tests._cli_helpers import assert_one_line_error, write_sigmoid_factory

# fixtures shared with test_pipeline (assigned, not imported, so that using them as arguments is no redefinition)
cases_root = _fixtures.cases_root
tiny_demo = _fixtures.tiny_demo

SMALL = ["--quiet", "--no-png", "--no-slicer", "--device", "cpu"]


def run(args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def plain_case(src: Path, dest: Path) -> Path:
    """A phantom case re-arranged with plain file names (t1.nii.gz, ...), like ../shared/data/brats_real_cases."""
    dest.mkdir(parents=True)
    cid = src.name
    for m in ("t1", "t1ce", "t2", "flair"):
        shutil.copyfile(src / f"{cid}_{m}.nii.gz", dest / f"{m}.nii.gz")
    return dest


# ----------------------------------------------------------------------------------------------- item 9
def test_layers_flags_reused_modules_and_explain_refuses_them_before_any_case(
    tiny_demo, cases_root, tmp_path, monkeypatch
):
    r = run(["layers", "--size", "16", "--json"])
    assert r.exit_code == 0, r.output
    rows = {x["name"]: x for x in json.loads(r.output)["layers"]}
    assert len(rows) == len(json.loads(r.output)["layers"])  # each module once
    assert "runs-2x:not-explainable" in rows["down_layers.3.1.act"]["flags"]
    assert not any(f.startswith("runs-") for f in rows["down_layers.3"]["flags"])

    import medcam.pipeline.run as prun

    loaded = []
    monkeypatch.setattr(prun, "load_case", lambda *a, **k: loaded.append(a) or (_ for _ in ()).throw(AssertionError))
    r = run(["explain", cases_root / "Phantom_00003", "-o", tmp_path / "o", "--layer", "down_layers.3.1.act", *SMALL])
    assert_one_line_error(r, "down_layers.3.1.act", "runs 2 times")
    assert not loaded and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------- item 10
def test_plain_named_folder_explains_with_the_folder_as_case_id(tiny_demo, cases_root, tmp_path):
    case = plain_case(cases_root / "Phantom_00003", tmp_path / "patient_fg")
    out = tmp_path / "out"
    r = run(["explain", case, "-o", out, "--target", "WT", *SMALL])
    assert r.exit_code == 0, (r.output, r.stderr)
    s = json.loads((out / "patient_fg" / "summary.json").read_text())
    assert s["case_id"] == "patient_fg" and not (out / "t1").exists()


def test_no_case_found_error_names_command_line_remedies(tmp_path):
    (tmp_path / "case").mkdir()
    (tmp_path / "case" / "image.nii.gz").write_bytes(b"x")
    r = run(["explain", tmp_path / "case", "-o", tmp_path / "o", *SMALL])
    assert_one_line_error(r, "manifest")
    assert "{'t1'" not in r.stderr.split("Python")[0]  # the Python-only advice is labelled as such


def test_usage_errors_exit_2_as_documented():
    r = run(["explain"])  # missing INPUTS: click's usage error
    assert r.exit_code == 2
    docs = (Path(__file__).resolve().parents[1] / "docs" / "cohorts.md").read_text()  # the README's former section
    assert "exit code 2" in docs


# ----------------------------------------------------------------------------------------------- item 12
def test_activation_none_on_the_command_line(cases_root, tmp_path):
    fac = write_sigmoid_factory(tmp_path / "sig.py")
    common = ["--model", f"{fac}:build", "--regions", "lesion", "--spacing", "8", "--layer", "feat", *SMALL[1:]]
    out = tmp_path / "o1"
    r = run(["explain", cases_root / "Phantom_00003", "-o", out, *common])
    assert r.exit_code == 0, r.stderr
    assert "probabilities" in r.stderr and "--activation none" in r.stderr  # the silent failure is now said
    s1 = json.loads((out / "Phantom_00003" / "summary.json").read_text())
    out2 = tmp_path / "o2"
    r = run(["explain", cases_root / "Phantom_00003", "-o", out2, "--activation", "none", *common])
    assert r.exit_code == 0, r.stderr
    assert "probabilities" not in r.stderr
    s2 = json.loads((out2 / "Phantom_00003" / "summary.json").read_text())
    total = 1
    for v in s2["preprocessed_shape"]:
        total *= v
    assert s1["targets"][0]["roi_voxels"] == total  # sigmoid(p) > 0.5 everywhere
    assert 0 < s2["targets"][0]["roi_voxels"] < total and s2["model"]["activation"] == "none"
