"""The 3D Slicer scene of a case whose channels are DICOM series folders.

The scene folder holds its volumes as files Slicer opens from the scene; a DICOM folder cannot be copied in as one
file, so each DICOM channel is written as a NIfTI volume of the series as medcam loaded it (MONAI ``LoadImage``:
the same voxels and RAS affine the maps were computed on and mapped back to), in a temporary folder removed after
the scene is written.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ..data.loading import read_volume


def _as_nifti(src: Path, dest: Path) -> Path:
    vol = read_volume(src)
    nib.save(nib.Nifti1Image(np.asarray(vol.numpy(), dtype=np.float32), np.asarray(vol.affine, dtype=float)), dest)
    return dest


@contextlib.contextmanager
def scene_inputs(images: Mapping[str, Any], tmp: Path) -> Iterator[dict[str, Any]]:
    """``images`` (keyword arguments ``image_path``, ``image_name``, ``other_images`` of
    :func:`medcam.io.export_slicer_scene`) with every DICOM folder replaced by a NIfTI file ``tmp/<name>.nii.gz``
    of the loaded series; ``tmp`` is removed on exit. Cases without DICOM folders pass through unchanged."""
    out = dict(images)
    src = Path(out["image_path"])
    others = {str(k): Path(v) for k, v in (out.get("other_images") or {}).items()}
    if not src.is_dir() and not any(p.is_dir() for p in others.values()):
        yield out
        return
    tmp.mkdir(parents=True, exist_ok=False)
    try:
        if src.is_dir():
            out["image_path"] = _as_nifti(src, tmp / f"{out.get('image_name') or src.name}.nii.gz")
        out["other_images"] = {k: _as_nifti(p, tmp / f"{k}.nii.gz") if p.is_dir() else p for k, p in others.items()}
        yield out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
