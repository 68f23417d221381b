"""PNG overlays and the montage of an nnU-Net case folder, drawn like those of every other ``medcam explain`` case.

The maps are read back from the NIfTI files nnU-Net's writer has just written (so the picture shows exactly the file
on disk, in its own geometry), the background is the case's own scan file, and each target's ROI (on the network's
grid) is taken to the original grid by the same export as the maps (:meth:`NnUNetModel.to_original_grid`) and
written/read the same way. Drawn by :func:`medcam.io.case_figures.write_case_figures` (radiological convention, mm,
orientation letters, shared colour scale). Only for NIfTI cases: nnU-Net's other formats carry no affine nibabel reads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .nnunet import NnUNetModel

__all__ = ["has_figures", "write_nnunet_figures"]

_NIFTI = (".nii.gz", ".nii")


def has_figures(ending: str) -> bool:
    """Whether cases with this file ending get PNG overlays (NIfTI only)."""
    return ending in _NIFTI


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(voxels [X, Y, Z] float32, affine 4x4)`` of a NIfTI file, in nibabel's axis order."""
    from ..data.loading import load_nifti

    img = load_nifti(path)
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, float)


def _background_channel(names: Sequence[str]) -> int:
    """The channel whose name is a T1ce alias (contrast-enhanced T1, where tumour regions read best), else the
    first; names are matched as the cohort matches BraTS modalities to ``channel_names``."""
    from ..data.brats import MODALITY_ALIASES

    for i, n in enumerate(names):
        if MODALITY_ALIASES.get(re.sub(r"[^a-z0-9]", "", n.lower())) == "t1ce":
            return i
    return 0


def _original_rois(
    model: NnUNetModel, rois: torch.Tensor, props: dict[str, Any], staging: Path, ending: str
) -> list[np.ndarray]:
    """Bool ROIs ``[X, Y, Z]`` (nibabel order) on the original grid, from ROIs ``[K, *S']`` on the network's grid."""
    original = model.to_original_grid(rois.float(), props)  # [K, *original] in the reader's axis order
    out = []
    for k in range(original.shape[0]):
        tmp = staging / f".roi_{k}{ending}"
        model.write_map(original[k], props, tmp)
        out.append(_read(tmp)[0] > 0.5)
        tmp.unlink()
    return out


def write_nnunet_figures(
    staging: Path,
    model: NnUNetModel,
    files: Sequence[Path],
    rows: Sequence[dict[str, Any]],
    rois: torch.Tensor,
    props: dict[str, Any],
    ending: str,
    *,
    case_id: str,
    layer: str,
    figures: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Overlays ``overlays/<method>_<target>.png`` and ``montage.png`` in ``staging``; sets ``row["overlay"]``.

    Args:
        files: the case's channel files (``dataset.json`` order); rows: one per written map (``method``, ``target``,
            ``file``); rois: the targets' ROIs ``[K, *S']`` on the network's grid, in ``rows``' target order.
        figures: ``shared_scale``/``slice_at`` options of :func:`~medcam.io.case_figures.write_case_figures`.

    Returns:
        The record of :func:`~medcam.io.case_figures.write_case_figures`.
    """
    from ..io.case_figures import MapEntry, write_case_figures, zero_map_warnings
    from ..pipeline.run import METHOD_LABELS

    names = [str(n) for n in model.channel_names]
    bg = _background_channel(names)
    background, affine = _read(Path(files[bg]))
    targets = list(dict.fromkeys(r["target"] for r in rows))
    roi_arrays = dict(zip(targets, _original_rois(model, rois, props, staging, ending)))
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    entries = []
    for r in rows:
        stem = r["file"][: -len(ending)]
        r["overlay"] = f"overlays/{stem}.png"
        heatmap = _read(staging / r["file"])[0]
        entries.append(
            MapEntry(r["method"], METHOD_LABELS.get(r["method"], r["method"]), r["target"], heatmap, r["overlay"])
        )
    written = write_case_figures(
        staging,
        entries,
        case_id=case_id,
        affine=affine,
        backgrounds={names[bg]: background},
        target_background={t: names[bg] for t in targets},
        rois=roi_arrays,
        roi_ml={t: float(roi_arrays[t].sum()) * voxel_ml for t in targets},
        layer=layer,
        images={n: str(f) for n, f in zip(names, files)},
        **dict(figures or {}),
    )
    written["warnings"] = zero_map_warnings(case_id, entries)
    return written
