"""Shared helpers for the data/io test modules (not a conftest: imported explicitly)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL = SHARED / "data" / "brats_real_cases"
TCGA = REAL / "tcga_fg_6692"
B23 = REAL / "brats_glioma_case_brainlesion"

needs_real = pytest.mark.skipif(
    not REAL.is_dir(), reason="shared BraTS cases (../shared beside the repo) not available"
)

TCGA_FILES = {
    "t1": "t1.nii.gz",
    "t1ce": "t1ce.nii.gz",
    "t2": "t2.nii.gz",
    "flair": "flair.nii.gz",
    "seg": "seg_fused_simple.nii.gz",
}
B23_FILES = {
    "t1": "t1n.nii.gz",
    "t1ce": "t1c.nii.gz",
    "t2": "t2w.nii.gz",
    "flair": "t2f.nii.gz",
    "seg": "seg_brats25_2.nii.gz",
}
SUFFIX = {
    "brats2021": {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"},
    "brats2023": {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg"},
}


def _link(src: Path, dst: Path) -> None:
    try:
        os.symlink(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def arrange_case(src_dir: Path, files: dict, dest_root: Path, layout: str, case_id: str, skip=()) -> Path:
    """Symlink a shared case into an official BraTS layout folder ``dest_root/case_id``."""
    case = dest_root / case_id
    case.mkdir(parents=True)
    for mod, fname in files.items():
        if mod in skip:
            continue
        _link(src_dir / fname, case / f"{case_id}{SUFFIX[layout][mod]}.nii.gz")
    return case


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype=np.float32, codes=(1, 1)) -> Path:
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_sform(affine, code=codes[0])
    img.set_qform(affine, code=codes[1])
    nib.save(img, str(path))
    return path


def voxel_to_world(affine: np.ndarray, ijk) -> np.ndarray:
    return (np.asarray(affine, float) @ np.r_[np.asarray(ijk, float), 1.0])[:3]


def weighted_centroid(vol: np.ndarray) -> np.ndarray:
    idx = np.indices(vol.shape).reshape(3, -1).astype(float)
    w = np.asarray(vol, float).ravel()
    return (idx * w).sum(1) / w.sum()
