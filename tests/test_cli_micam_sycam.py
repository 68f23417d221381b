"""Command line: -M micam and -M synth:FILE (issue 18)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from tests._cli_helpers import assert_one_line_error
from tests.test_cli import SMALL, run
from tests.test_pipeline import cases_root, tiny_demo, tiny_net  # noqa: F401 - fixtures


def test_micam_and_synth_file_on_the_command_line(tiny_demo, cases_root, tmp_path):  # noqa: F811
    expr = tmp_path / "gc.sycam"
    expr.write_text("# Seg-Grad-CAM as an expression\nsum(g) / N\n")
    out = tmp_path / "out"
    args = ["explain", cases_root / "Phantom_00003", "-o", out, "-M", f"micam,gradcam,synth:{expr}", "--target", "WT"]
    r = run([*args, *SMALL])
    assert r.exit_code == 0, (r.output, r.stderr)
    case = out / "Phantom_00003"
    s = json.loads((case / "summary.json").read_text())
    hm = s["targets"][0]["heatmaps"]
    assert set(hm) == {"micam", "gradcam", "synth-gc"}
    a = nib.load(str(case / hm["gradcam"])).get_fdata()
    b = nib.load(str(case / hm["synth-gc"])).get_fdata()
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max())
    assert nib.load(str(case / hm["micam"])).get_fdata().max() > 0


def test_bad_synth_file_is_one_line_error(tiny_demo, cases_root, tmp_path):  # noqa: F811
    bad = tmp_path / "bad.sycam"
    bad.write_text("sum(g) / (sum(A) - sum(A))\n")
    base = ["explain", cases_root / "Phantom_00003", "-o", tmp_path / "o", "--target", "WT", *SMALL]
    assert_one_line_error(run([*base, "-M", f"synth:{bad}"]), "divides by zero everywhere")
    assert_one_line_error(run([*base, "-M", f"synth:{tmp_path / 'missing.sycam'}"]), "does not exist")
    assert not (tmp_path / "o").exists()
