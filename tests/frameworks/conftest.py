"""Shared fixtures of the framework adapters' tests: nnU-Net v2 model folders built once per session.

Built from phantoms with nnU-Net's own entry points (tests/_nnunet_build.py): a region-based model (sigmoid, BraTS
regions, 2 folds, mirroring over 3 axes, patch 12^3 so that a case needs several tiles) and a label-based one
(softmax, 1 fold).
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "nnUNetTrainer__nnUNetPlans__3d_fullres"


@pytest.fixture(scope="session")
def nnunet_root(tmp_path_factory) -> Path:
    """Built once per run, shared by xdist workers (about 1 min on an idle 2-core machine).

    ``MEDCAM_TEST_NNUNET_ROOT`` reuses an earlier build (``python -m tests._nnunet_build ROOT --regions --patch 12
    12 12``).
    """
    import fcntl

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
                cwd=ROOT,
                check=True,
                capture_output=True,
                env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
            )
            (root / ".done").touch()
    return root


@pytest.fixture(scope="session")
def region_folder(nnunet_root) -> Path:
    return nnunet_root / "results" / "Dataset502_Phantom" / CONFIG


@pytest.fixture(scope="session")
def label_folder(nnunet_root) -> Path:
    return nnunet_root / "results" / "Dataset501_PhantomLabels" / CONFIG


@pytest.fixture(scope="session")
def case_files(nnunet_root) -> list[str]:
    return sorted(glob.glob(str(nnunet_root / "raw" / "Dataset502_Phantom" / "imagesTr" / "phantom_001_*.nii.gz")))
