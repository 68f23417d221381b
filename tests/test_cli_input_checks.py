"""Input errors of ``medcam explain`` / ``medcam evaluate`` are reported before torch and MONAI are imported (issue
30): a BraTS case folder missing a modality, and a folder without a case, answer in a fraction of a second instead
of after the imports (several seconds on a CPU box)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def case_missing_t1ce(tmp_path_factory) -> Path:
    from medcam.data.phantoms import write_phantom_case

    case = write_phantom_case(tmp_path_factory.mktemp("cases"), seed=0, spacing_mm=8.0)
    next(case.glob("*_t1ce.nii.gz")).unlink()
    return case


def _cli_in_fresh_python(args: list[str]) -> tuple[int, str, str]:
    """The command in a fresh interpreter: (exit code, its stderr, which of torch/monai it imported)."""
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom medcam.cli import main\n"
        f"r = CliRunner().invoke(main, {args!r})\n"
        "print(r.exit_code)\nprint(' '.join(m for m in ('torch', 'monai') if m in sys.modules) or '-')\n"
        "print(r.stderr, end='')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert p.returncode == 0, p.stderr
    status, imported, stderr = p.stdout.split("\n", 2)
    return int(status), imported, stderr


@pytest.mark.parametrize("command", ["explain", "evaluate"])
def test_a_missing_modality_is_reported_before_torch_is_imported(command, case_missing_t1ce, tmp_path):
    out = tmp_path / "out"
    status, imported, stderr = _cli_in_fresh_python([command, str(case_missing_t1ce), "-o", str(out)])
    expected = case_missing_t1ce / f"{case_missing_t1ce.name}_t1ce.nii.gz"
    assert status == 1 and f"has no T1CE image: expected file '{expected}'" in stderr, stderr
    assert imported == "-" and not out.exists()


def test_a_cohort_folder_without_a_case_is_reported_before_torch_is_imported(case_missing_t1ce, tmp_path):
    root = tmp_path / "cohort"
    shutil.copytree(case_missing_t1ce, root / case_missing_t1ce.name)
    status, imported, stderr = _cli_in_fresh_python(["explain", str(root), "-o", str(tmp_path / "out")])
    assert status == 1 and f"no BraTS case in '{root}' nor in its sub-folders" in stderr, stderr
    assert imported == "-"
