"""Issue 19, cohorts: resume keyed on the inputs, per-case masks, refused runs touch nothing, clean stops (SIGTERM /
SIGINT in a subprocess), writability checked first, honest size errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from medcam.cli import main
from tests import test_pipeline as _fixtures
from tests._cli_helpers import assert_one_line_error

# fixtures shared with test_pipeline (assigned, not imported, so that using them as arguments is no redefinition)
cases_root = _fixtures.cases_root
tiny_demo = _fixtures.tiny_demo

SMALL = ["--quiet", "--no-png", "--no-slicer", "--device", "cpu"]
MODS = ("t1", "t1ce", "t2", "flair")
REPO = Path(__file__).resolve().parents[1]


def run(args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def plain_files(src: Path, dest: Path) -> list[Path]:
    """The 4 modalities of a phantom case copied as dest/t1.nii.gz, ... (plain names, like the shared real cases)."""
    dest.mkdir(parents=True)
    out = []
    for m in MODS:
        shutil.copyfile(src / f"{src.name}_{m}.nii.gz", dest / f"{m}.nii.gz")
        out.append(dest / f"{m}.nii.gz")
    return out


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------------------------- item 1
def test_resume_is_keyed_on_the_inputs_not_the_id(tiny_demo, cases_root, tmp_path):
    fg = plain_files(cases_root / "Phantom_00003", tmp_path / "fg")
    du = plain_files(cases_root / "Phantom_00004", tmp_path / "du")
    out = tmp_path / "O"
    r = run(["explain", *fg, "-o", out, "--target", "WT", *SMALL])
    assert r.exit_code == 0, r.stderr
    assert (out / "fg" / "summary.json").is_file() and not (out / "t1").exists()  # id from the folder, not "t1"
    s = json.loads((out / "fg" / "summary.json").read_text())
    assert s["inputs"]["ch0"]["path"] == str(fg[0].resolve()) and s["inputs"]["ch0"]["size"] == fg[0].stat().st_size
    # the same files again: done, skipped
    r = run(["explain", *fg, "-o", out, "--target", "WT", *SMALL])
    assert r.exit_code == 0 and "0 case(s) explained, 1 skipped" in r.output
    # another patient under the same id: an error naming both, nothing touched
    before = snapshot(out)
    r = run(["explain", *du, "-o", out, "--case-id", "fg", "--target", "WT", *SMALL])
    assert_one_line_error(r, "already used", str(tmp_path / "fg"), str(tmp_path / "du"))
    assert snapshot(out) == before
    # edited inputs: not "done" either
    os.utime(fg[2], ns=(time.time_ns(), time.time_ns() + 10**9))
    assert_one_line_error(run(["explain", *fg, "-o", out, "--target", "WT", *SMALL]), "changed", "t2.nii.gz")
    assert snapshot(out) == before
    # --overwrite redoes it, and records the new inputs
    r = run(["explain", *du, "-o", out, "--case-id", "fg", "--target", "WT", "--overwrite", *SMALL])
    assert r.exit_code == 0, r.stderr
    s = json.loads((out / "fg" / "summary.json").read_text())
    assert s["inputs"]["ch0"]["path"] == str(du[0].resolve()) and s["case_id"] == "fg"
    assert not [p for p in out.iterdir() if p.name.startswith((".partial-", ".old-"))]


def test_case_id_is_for_one_case_only(tiny_demo, cases_root, tmp_path):
    assert_one_line_error(run(["explain", cases_root, "-o", tmp_path / "o", "--case-id", "x", *SMALL]), "ONE case")


def test_folders_whose_files_share_a_prefix_do_not_resume_each_other(tiny_demo, cases_root, tmp_path):
    cohort_a, cohort_b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(cases_root / "Phantom_00003", cohort_a / "Phantom_00003")
    shutil.copytree(cases_root / "Phantom_00004", cohort_b / "Phantom_00003")  # same file names, other patient
    for f in (cohort_b / "Phantom_00003").iterdir():
        f.rename(f.with_name(f.name.replace("Phantom_00004", "Phantom_00003")))
    out = tmp_path / "O"
    assert run(["explain", cohort_a / "Phantom_00003", "-o", out, "--target", "WT", *SMALL]).exit_code == 0
    r = run(["explain", cohort_b / "Phantom_00003", "-o", out, "--target", "WT", *SMALL])
    assert_one_line_error(r, "already used", str(cohort_a / "Phantom_00003"), str(cohort_b / "Phantom_00003"))


# ----------------------------------------------------------------------------------------------- item 2
def test_per_case_masks_template_manifest_column_and_label(tiny_demo, cases_root, tmp_path):
    from medcam.pipeline import discover_cases, load_case, load_model

    out = tmp_path / "O"
    r = run(["explain", cases_root, "-o", out, "--target", "mask:{folder}/{case}_seg.nii.gz:WT", *SMALL])
    assert r.exit_code == 0, (r.output, r.stderr)
    rows = {}
    for cid in ("Phantom_00003", "Phantom_00004"):
        s = json.loads((out / cid / "summary.json").read_text())
        (row,) = s["targets"]
        assert row["name"] == "mask-seg-WT"
        assert s["inputs"]["mask0"]["path"] == str((cases_root / cid / f"{cid}_seg.nii.gz").resolve())
        rows[cid] = row["roi_voxels"]
    assert rows["Phantom_00003"] != rows["Phantom_00004"]  # each case its own mask

    # label:WT = the case's own reference WT, through the case's preprocessing
    out2 = tmp_path / "O2"
    r = run(["explain", cases_root, "-o", out2, "--target", "label:WT", *SMALL])
    assert r.exit_code == 0, (r.output, r.stderr)
    loaded = load_model("demo")
    for src in discover_cases([cases_root]):
        case = load_case(src, loaded)
        s = json.loads((out2 / src.case_id / "summary.json").read_text())
        assert s["targets"][0]["roi_voxels"] == int((case.label[1] > 0.5).sum()) > 0
        assert s["targets"][0]["name"] == "label-WT-WT"

    # a manifest column fills {mask}
    man = tmp_path / "cases.csv"
    man.write_text(
        "case_id,folder,mask\n"
        + "".join(f"{c},{cases_root / c},{cases_root / c / (c + '_seg.nii.gz')}\n" for c in ("Phantom_00003",))
    )
    out3 = tmp_path / "O3"
    r = run(["explain", man, "-o", out3, "--target", "mask:{mask}:WT", *SMALL])
    assert r.exit_code == 0, (r.output, r.stderr)
    s = json.loads((out3 / "Phantom_00003" / "summary.json").read_text())
    assert s["targets"][0]["roi_voxels"] == rows["Phantom_00003"]


def test_one_mask_file_for_a_cohort_is_refused(tiny_demo, cases_root, tmp_path):
    seg = cases_root / "Phantom_00003" / "Phantom_00003_seg.nii.gz"
    r = run(["explain", cases_root, "-o", tmp_path / "O", "--target", f"mask:{seg}:WT", *SMALL])
    assert_one_line_error(r, "one mask file for 2 cases", "{case}")
    assert not (tmp_path / "O").exists()


def test_missing_per_case_mask_fails_that_case_only(tiny_demo, cases_root, tmp_path):
    root = tmp_path / "cohort"
    for c in ("Phantom_00003", "Phantom_00004"):
        shutil.copytree(cases_root / c, root / c)
    (root / "Phantom_00004" / "Phantom_00004_seg.nii.gz").unlink()
    r = run(["explain", root, "-o", tmp_path / "O", "--target", "mask:{folder}/{case}_seg.nii.gz:WT", *SMALL])
    assert r.exit_code == 1
    summ = json.loads((tmp_path / "O" / "cohort_summary.json").read_text())
    st = {c["case_id"]: c for c in summ["cases"]}
    assert st["Phantom_00003"]["status"] == "ok" and "does not exist" in st["Phantom_00004"]["error"]


# ----------------------------------------------------------------------------------------------- item 4
def test_a_refused_rerun_touches_nothing(tiny_demo, cases_root, tmp_path):
    out = tmp_path / "O"
    r = run(["explain", cases_root, "-o", out, "--target", "WT", *SMALL])
    assert r.exit_code == 0, r.stderr
    before = snapshot(out)
    listing = sorted(p.name for p in out.rglob("*"))
    time.sleep(0.01)
    r = run(["explain", cases_root, "-o", out, "--target", "WT:class", *SMALL])  # other settings
    assert_one_line_error(r, "other settings", "Nothing was run or written")
    assert snapshot(out) == before and sorted(p.name for p in out.rglob("*")) == listing
    summary = json.loads((out / "cohort_summary.json").read_text())
    assert summary["ok"] == 2 and summary["failed"] == 0


# ----------------------------------------------------------------------------------------------- item 6
def test_output_folder_writability_is_checked_before_the_first_case(tiny_demo, cases_root, tmp_path, monkeypatch):
    import medcam.pipeline.run as prun

    calls = []
    monkeypatch.setattr(prun, "load_case", lambda *a, **k: calls.append(a))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    r = run(["explain", cases_root, "-o", blocker / "out", "--target", "WT", *SMALL])
    assert_one_line_error(r, "not writable", str(blocker / "out"))
    assert calls == []


# ----------------------------------------------------------------------------------------------- item 7
def test_size_mismatch_gets_the_divisible_by_hint(cases_root, tmp_path):
    fac = tmp_path / "nets.py"
    fac.write_text(
        "from monai.networks.nets import SegResNet\n"
        "def build():\n    return SegResNet(spatial_dims=3, in_channels=4, out_channels=2, init_filters=8,"
        " blocks_down=(1, 1, 1, 1))\n"
    )
    common = ["--model", f"{fac}:build", "--regions", "a,b", "--target", "b:class", "--spacing", "7", *SMALL]
    r = run(["explain", cases_root / "Phantom_00003", "-o", tmp_path / "o", *common])
    assert_one_line_error(r, "--divisible-by")
    r = run(["explain", cases_root / "Phantom_00003", "-o", tmp_path / "o2", "--divisible-by", "8", *common])
    assert r.exit_code == 0, r.stderr


def test_python_size_error_has_no_channel_hint():
    import medcam
    from medcam.targets import ClassROI

    net = _fixtures.tiny_net()
    with pytest.raises(medcam.ModelError) as e:
        medcam.SegHiResGradCAM(net, layer="down_layers.3")(torch.randn(1, 4, 20, 20, 20), ClassROI(0))
    assert "DivisiblePad" in str(e.value) and "takes 4 channels" not in str(e.value)


# ----------------------------------------------------------------------------------------------- item 5
SLOW_NET = """
import time
import torch

class Slow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.feat = torch.nn.Sequential(torch.nn.Conv3d(4, 4, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Conv3d(4, 3, 1)

    def forward(self, x):
        time.sleep(float(__import__("os").environ.get("SLOW_S", "0")))
        return self.head(self.feat(x))

def build():
    return Slow()
"""


def _medcam_cmd(args, env):
    code = "import sys\nfrom medcam.cli import main\nsys.argv = ['medcam'] + sys.argv[1:]\nmain()\n"
    return subprocess.Popen(
        [sys.executable, "-c", code, *[str(a) for a in args]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_a_running_cohort_cleanly(cases_root, tmp_path, sig, status):
    (tmp_path / "slow.py").write_text(SLOW_NET)
    root = tmp_path / "cohort"
    for c in ("Phantom_00003", "Phantom_00004"):
        shutil.copytree(cases_root / c, root / c)
    first, second = "Phantom_00003", "Phantom_00004"
    out = tmp_path / "O"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "SLOW_S": "1.5"}
    args = ["explain", root, "-o", out, "--model", f"{tmp_path / 'slow.py'}:build", "--regions", "TC,WT,ET"]
    args += ["--spacing", "8", "--layer", "feat", "--target", "WT:class", "--device", "cpu", "-q", "--no-png"]
    p = _medcam_cmd(args, env)
    deadline = time.time() + 120
    while not (out / first / "summary.json").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.1)
    assert (out / first / "summary.json").exists(), p.communicate()
    time.sleep(0.5)  # inside the second case's forward passes
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == status, (stdout, stderr)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "interrupted by" in lines[0] and "Traceback" not in stderr, stderr
    assert not list(out.glob(".partial-*")) and not (out / second).exists()
    from medcam.pipeline.resume import _host

    stale = out / f".partial-999999999@{_host()}-0123abcd-{second}"  # what a SIGKILLed run leaves behind
    (stale / "heatmaps").mkdir(parents=True)
    # the next run resumes: C0 skipped, the others done, the stale staging folder of the dead run removed
    env["SLOW_S"] = "0"
    p = _medcam_cmd(args, env)
    stdout, stderr = p.communicate(timeout=180)
    assert p.returncode == 0, stderr
    assert "1 case(s) explained, 1 skipped" in stdout
    assert not list(out.glob(".partial-*"))


def test_debug_prints_the_traceback_of_a_failed_case(tiny_demo, cases_root, tmp_path):
    root = tmp_path / "cohort"
    shutil.copytree(cases_root / "Phantom_00004", root / "Phantom_00004")
    bad = root / "Bad_00001"
    bad.mkdir()
    for m in MODS:
        (bad / f"Bad_00001_{m}.nii.gz").write_bytes(b"\x1f\x8b garbage")
    r = run(["explain", root, "-o", tmp_path / "O", "--target", "WT", "--debug", *SMALL[1:]])
    assert r.exit_code == 1
    assert "Traceback (most recent call last)" in r.stderr and "Bad_00001" in r.stderr


def test_interrupt_while_writing_removes_the_staging_folder(tiny_demo, cases_root, tmp_path, monkeypatch):
    import medcam.io
    from medcam.pipeline import discover_cases, explain_cohort, load_model, make_inferer, parse_targets

    def interrupted(*a, **k):
        assert any(p.name.startswith(".partial-") for p in (tmp_path / "O").iterdir())  # staging exists now
        raise KeyboardInterrupt

    monkeypatch.setattr(medcam.io, "save_heatmap", interrupted)
    model = load_model("demo")
    with pytest.raises(KeyboardInterrupt):
        explain_cohort(
            discover_cases([cases_root]),
            model,
            ["hirescam"],
            parse_targets(["WT"], model.regions),
            None,
            make_inferer(model.roi_size),
            tmp_path / "O",
            png=False,
            slicer=False,
            progress=False,
        )
    assert list((tmp_path / "O").iterdir()) == []


def test_mask_template_fields_and_relative_paths(cases_root, tmp_path, monkeypatch):
    from medcam.errors import TargetError
    from medcam.pipeline import CaseSource, discover_cases, parse_targets
    from medcam.pipeline.target_specs import case_specs

    specs = parse_targets(["mask:{case}/{case}_seg.nii.gz:WT", "ET"], ("TC", "WT", "ET"))
    assert specs[0].is_template and specs[0].name == "mask-seg-WT"
    monkeypatch.chdir(tmp_path)  # not the cohort folder: the template is found beside the case folders
    for src in discover_cases([cases_root]):
        filled = case_specs(specs, src)
        assert Path(filled[0].path) == cases_root / src.case_id / f"{src.case_id}_seg.nii.gz"
        assert filled[0].name == "mask-seg-WT" and filled[1] == specs[1]
    monkeypatch.chdir(cases_root)  # from the cohort folder itself
    (src,) = discover_cases([cases_root / "Phantom_00003"])
    assert case_specs(specs, src)[0].path == "Phantom_00003/Phantom_00003_seg.nii.gz"
    src = CaseSource("X", "volumes", [cases_root / "Phantom_00003" / "Phantom_00003_t1.nii.gz"], (("mask", "m.nii"),))
    with pytest.raises(TargetError, match="has no field 'nope'"):
        case_specs(parse_targets(["mask:{nope}:WT"], ("TC", "WT", "ET")), src)
    with pytest.raises(TargetError, match="does not exist"):
        case_specs(parse_targets(["mask:{mask}:WT"], ("TC", "WT", "ET")), src)
