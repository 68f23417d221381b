"""Shared fixtures of the framework adapter tests: real nnU-Net v2 model folders built once per session with
nnU-Net's own entry points (tests/_nnunet_build.py), and nnU-Net's input layout of their phantom cases."""

from __future__ import annotations

import glob
import shutil
from pathlib import Path

import pytest

CONFIG = "nnUNetTrainer__nnUNetPlans__3d_fullres"


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
