"""Fixtures shared by test modules of several folders (here: the nnU-Net v2 model folders)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def nnunet_models(tmp_path_factory) -> Path:
    """A region-based (sigmoid, 2 folds, patch 12^3) and a label-based (softmax) model folder, built once per run
    and shared by xdist workers; ``MEDCAM_TEST_NNUNET_ROOT`` reuses an earlier build."""
    pytest.importorskip("nnunetv2")
    if os.environ.get("MEDCAM_TEST_NNUNET_ROOT"):
        return Path(os.environ["MEDCAM_TEST_NNUNET_ROOT"])
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "nnunet_models"
    root.mkdir(exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".done").exists():
            subprocess.run(
                [sys.executable, "-m", "tests._nnunet_build", str(root), "--regions", "--patch", "12", "12", "12"],
                cwd=ROOT, check=True, capture_output=True,
                env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
            )  # fmt: skip
            (root / ".done").touch()
    return root
