"""The `medcam` command line: help, layers, explain (single case, cohort, resume), demo, and the error policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from click.testing import CliRunner

from medcam.cli import main
from tests._cli_helpers import assert_one_line_error
from tests.test_pipeline import cases_root, tiny_demo, tiny_net  # noqa: F401 - fixtures

SMALL = ["--quiet", "--no-png", "--no-slicer", "--device", "cpu"]


def run(args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def test_help_teaches():
    r = run(["--help"])
    assert r.exit_code == 0 and all(c in r.output for c in ("layers", "explain", "demo"))
    r = run(["explain", "--help"])
    assert r.exit_code == 0
    for text in (
        "PREDICTED ET region",
        "ET:class",
        "component=largest",
        "mask:",
        "--num-parts",
        "--channel-order",
        "original image grid",
        "--roi-size",
    ):
        assert text in " ".join(r.output.split()), text


def test_layers_lists_shapes_strides_and_the_auto_choice():
    r = run(["layers", "--size", "16,16,16"])
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("down_layers.3 "))
    assert "(1, 64, 2, 2, 2)" in line and "8x8x8" in line and "default" in line
    assert any("head" in ln for ln in r.output.splitlines() if ln.startswith("conv_final"))
    r = run(["layers", "--size", "16", "--json"])
    data = json.loads(r.output)
    assert data["input_shape"] == [1, 4, 16, 16, 16]
    auto = [x["name"] for x in data["layers"] if "auto" in x["flags"]]
    assert len(auto) == 1 and auto[0].startswith("down_layers.3")


def test_explain_single_case_then_resume(tiny_demo, cases_root, tmp_path):
    out = tmp_path / "out"
    args = [
        "explain",
        cases_root / "Phantom_00003",
        "-o",
        out,
        "-M",
        "hirescam",
        "--target",
        "WT",
        "--target",
        "TC:component=largest",
        *SMALL,
    ]
    r = run(args)
    assert r.exit_code == 0, (r.output, r.stderr)
    s = json.loads((out / "Phantom_00003" / "summary.json").read_text())
    assert [t["name"] for t in s["targets"]] == ["WT", "TC-component1"]
    assert s["targets"][1]["roi_voxels"] <= s["predicted_voxels"]["TC"]
    hm = nib.load(str(out / "Phantom_00003" / s["targets"][0]["heatmaps"]["hirescam"]))
    assert hm.shape == nib.load(str(cases_root / "Phantom_00003" / "Phantom_00003_t1.nii.gz")).shape
    assert "1 case(s) explained" in r.output
    r2 = run(args)
    assert r2.exit_code == 0 and "0 case(s) explained, 1 skipped" in r2.output


def test_explain_cohort_with_a_failing_case_exits_nonzero(tiny_demo, cases_root, tmp_path):
    import shutil

    root = tmp_path / "cohort"
    shutil.copytree(cases_root / "Phantom_00004", root / "Phantom_00004")
    bad = root / "Bad_00001"
    shutil.copytree(cases_root / "Phantom_00003", bad)
    for f in bad.iterdir():  # rename to the bad id, then corrupt one modality
        f.rename(bad / f.name.replace("Phantom_00003", "Bad_00001"))
    (bad / "Bad_00001_flair.nii.gz").write_bytes(b"\x1f\x8b garbage")
    out = tmp_path / "out"
    r = run(["explain", root, "-o", out, "--target", "ET:class", *SMALL])
    assert r.exit_code == 1
    run_summary = json.loads((out / "cohort_summary.json").read_text())
    assert (run_summary["ok"], run_summary["failed"]) == (1, 1)
    assert "Bad_00001_flair" in run_summary["cases"][0]["error"]
    assert "FAILED Bad_00001" in r.output and (out / "Phantom_00004" / "summary.json").is_file()


def test_bad_input_is_one_line_without_traceback(tiny_demo, cases_root, tmp_path):
    case = cases_root / "Phantom_00003"
    assert_one_line_error(run(["explain", tmp_path / "nope", "-o", tmp_path / "o1", *SMALL]), "does not exist")
    assert_one_line_error(
        run(["explain", case, "-o", tmp_path / "o2", "--layer", "down_layer.3", *SMALL]),
        "unknown layer 'down_layer.3'",
        "down_layers.3",
    )
    assert_one_line_error(
        run(["explain", case, "-o", tmp_path / "o3", "--target", "NCR", *SMALL]), "unknown region 'NCR'"
    )
    assert_one_line_error(run(["explain", case, "-o", tmp_path / "o4", "-M", "gradcam3", *SMALL]), "unknown method")
    net = torch.nn.Sequential(torch.nn.Conv3d(4, 3, 1))
    ts = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(net), str(ts))
    assert_one_line_error(run(["explain", case, "-o", tmp_path / "o5", "--model", ts, *SMALL]), "TorchScript")
    # a corrupt NIfTI in a single-case run: the case fails -> one error line, exit 1
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08 truncated")
    r = run(["explain", bad, "-o", tmp_path / "o6", *SMALL])
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "bad.nii.gz" in err[0] and err[0].startswith("medcam: error:")
    # --debug shows the real exception instead
    r = run(["explain", case, "-o", tmp_path / "o7", "--target", "NCR", "--debug", *SMALL])
    assert r.exit_code != 0 and r.exception is not None and type(r.exception).__name__ == "TargetError"


def test_explain_with_factory_model_and_regions(cases_root, tmp_path):
    fac = tmp_path / "nets.py"
    fac.write_text(
        "from monai.networks.nets import SegResNet\n"
        "def build():\n    return SegResNet(spatial_dims=3, in_channels=4, out_channels=2, init_filters=8,"
        " blocks_down=(1, 1, 1, 1))\n"
    )
    torch.manual_seed(0)
    out = tmp_path / "out"
    r = run(
        [
            "explain",
            cases_root / "Phantom_00003",
            "-o",
            out,
            "--model",
            f"{fac}:build",
            "--regions",
            "bg,tumour",
            "--activation",
            "softmax",
            "--spacing",
            "8",
            "--crop-foreground",
            "--divisible-by",
            "8",
            "--target",
            "tumour",
            "--target",
            "channel:0:class",
            "--layer",
            "auto",
            *SMALL,
        ]
    )
    assert r.exit_code == 0, (r.output, r.stderr)
    s = json.loads((out / "Phantom_00003" / "summary.json").read_text())
    assert s["sliding_window"] is None and s["layer"].startswith("down_layers.3")
    assert s["preprocessed_shape"] == [v for v in s["preprocessed_shape"] if v % 8 == 0]
    assert [t["name"] for t in s["targets"]] == ["tumour", "bg-class"]
    assert s["model"]["activation"] == "softmax" and s["predicted_voxels"]["bg"] + s["predicted_voxels"][
        "tumour"
    ] == int(np.prod(s["preprocessed_shape"]))


def test_demo_writes_everything(tiny_demo, tmp_path):
    out = tmp_path / "medcam-demo"
    r = run(["demo", "--output", out, "--quiet", "--device", "cpu"])
    assert r.exit_code == 0, (r.output, r.stderr)
    case = out / "Phantom_00000"
    s = json.loads((case / "summary.json").read_text())
    assert [t["name"] for t in s["targets"]] == ["TC", "WT", "ET"] and set(s["methods"]) == {"gradcam", "hirescam"}
    assert len(list((case / "heatmaps").glob("*.nii.gz"))) == 6 and len(list((case / "overlays").glob("*.png"))) == 6
    assert (case / "slicer" / "scene.mrml").is_file() and (out / "input" / "Phantom_00000").is_dir()
    assert "scene.mrml" in r.output
    r2 = run(["demo", "--output", out, "--quiet", "--device", "cpu"])  # re-run reuses everything
    assert r2.exit_code == 0 and "1 skipped" in r2.output


def test_console_script_error_policy(tmp_path):
    exe = Path(sys.executable).with_name("medcam")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "medcam.cli"]
    p = subprocess.run(
        [*cmd, "explain", str(tmp_path / "missing_case"), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert p.returncode == 1
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("medcam: error: input")
    assert "Traceback" not in p.stderr
