"""Shared fixtures of the framework adapter tests: real nnU-Net v2 model folders built once per session with
nnU-Net's own entry points (tests/_nnunet_build.py), and nnU-Net's input layout of their phantom cases."""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "nnUNetTrainer__nnUNetPlans__3d_fullres"


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


@pytest.fixture(scope="session")
def region_model_folder(nnunet_models) -> Path:
    return nnunet_models / "results" / "Dataset502_Phantom" / CONFIG


@pytest.fixture(scope="session")
def label_model_folder(nnunet_models) -> Path:
    return nnunet_models / "results" / "Dataset501_PhantomLabels" / CONFIG


@pytest.fixture(scope="session")
def phantom_files(nnunet_models) -> list[Path]:
    """One case's four channel files, ``phantom_001_0000.nii.gz`` .. ``_0003``."""
    pattern = str(nnunet_models / "raw" / "Dataset502_Phantom" / "imagesTr" / "phantom_001_*.nii.gz")
    return [Path(p) for p in sorted(glob.glob(pattern))]


@pytest.fixture()
def nnunet_layout(nnunet_models, tmp_path) -> Path:
    """nnU-Net's input layout (as nnUNetv2_predict -i takes it): phantom_00{1,2,3}_000{0..3}.nii.gz."""
    inp = tmp_path / "imagesTs"
    shutil.copytree(nnunet_models / "raw" / "Dataset502_Phantom" / "imagesTr", inp)
    return inp
