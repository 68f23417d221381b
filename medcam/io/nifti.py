"""Writing heatmaps as NIfTI on the grid of the original image.

The heatmap is written with a FRESH header (never the MRI's): float32, scl_slope 1 / scl_inter 0, cal_min/cal_max set
to the map's range, qform = sform = the reference affine, the reference's sform/qform codes, intent 1001 (estimate)
with a name, and a ``descrip`` naming method/target/layer. nibabel and SimpleITK both read back the reference's shape,
spacing, origin and direction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medcam.data.loading import MedcamDataError, is_nifti, load_nifti, read_header
from medcam.io.atomic import atomic_write, check_output_path

from ..types import PathLike

logger = logging.getLogger(__name__)


NIFTI_INTENT_ESTIMATE = 1001
_DESCRIP_LEN = 79  # 80-byte field, NUL-terminated
_INTENT_NAME_LEN = 15  # 16-byte field


@dataclass(frozen=True)
class ReferenceGeometry:
    """Voxel grid of a reference image.

    Attributes:
        shape: (X, Y, Z) voxels.
        affine: 4x4 voxel -> RAS world (mm).
        sform_code, qform_code: NIfTI codes to write (1 scanner, 2 aligned, ...); both >= 1.
        xyz_unit: spatial unit string for nibabel ("mm").
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    sform_code: int = 1
    qform_code: int = 1
    xyz_unit: str = "mm"


def reference_geometry(reference: PathLike) -> ReferenceGeometry:
    """Read the grid of a reference image (NIfTI via nibabel, other formats / DICOM folders via SimpleITK).

    For NIfTI the affine is nibabel's (sform if its code > 0, else qform) and the codes are copied; a code of 0 is
    replaced by the other one (or 1, scanner) so that both transforms are set and agree.

    Raises:
        MedcamDataError: missing/unreadable reference or not 3D.
    """
    hdr = read_header(reference)
    sform_code = qform_code = 1
    unit = "mm"
    if is_nifti(hdr.path):
        h = load_nifti(hdr.path).header
        sform_code, qform_code = int(h["sform_code"]), int(h["qform_code"])
        sform_code = sform_code or qform_code or 1
        qform_code = qform_code or sform_code
        unit = h.get_xyzt_units()[0] or "mm"
        if unit == "unknown":
            unit = "mm"
    return ReferenceGeometry(hdr.shape, hdr.affine, sform_code, qform_code, unit)


def _as_3d(volume: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    arr = np.asarray(volume.detach().cpu().numpy() if hasattr(volume, "detach") else volume)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.shape != tuple(shape):
        raise MedcamDataError(
            f"{what} has shape {arr.shape} but the reference image has shape {tuple(shape)}: map it to the original "
            "grid first (e.g. with case.invert(volume))."
        )
    return arr


def describe(method: str, target: str, layer: str) -> str:
    """The ``descrip`` text: 'medcam <method> target=<target> layer=<layer>' cut to 79 characters."""
    text = f"medcam {method} target={target} layer={layer}"
    if len(text) > _DESCRIP_LEN:
        logger.warning("NIfTI description cut to %d characters: %r", _DESCRIP_LEN, text)
    return text[:_DESCRIP_LEN]


def _new_image(data: np.ndarray, geom: ReferenceGeometry) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, None)
    hdr = img.header
    hdr.set_data_dtype(data.dtype)
    img.set_sform(geom.affine, code=int(geom.sform_code))
    img.set_qform(geom.affine, code=int(geom.qform_code))
    hdr.set_xyzt_units(xyz=geom.xyz_unit, t="sec")
    hdr["scl_slope"] = 1.0
    hdr["scl_inter"] = 0.0
    return img


def save_heatmap(
    heatmap: np.ndarray,
    reference: PathLike,
    out_path: PathLike,
    *,
    method: str,
    target: str,
    layer: str,
    overwrite: bool = False,
    intent_name: str = "medcam heatmap",
) -> Path:
    """Save a heatmap as float32 NIfTI on the grid of the ORIGINAL reference image.

    Args:
        heatmap: [X, Y, Z] (or [1, X, Y, Z]) float array already on the reference grid (see ``case.invert``).
        reference: the original image file (or DICOM folder) whose shape and affine are used.
        out_path: destination ``.nii.gz`` / ``.nii``.
        method, target, layer: written to the ``descrip`` field (e.g. "seg-grad-cam", "WT", "decoder.3").
        overwrite: replace an existing file.
        intent_name: NIfTI intent name (intent code 1001, "estimate"), at most 15 characters kept.

    Returns:
        The written path.

    Raises:
        OutputExistsError: the output exists and ``overwrite`` is False (checked first).
        MedcamDataError: reference unreadable, shape mismatch, NaN/Inf in the heatmap, not a NIfTI file name.
    """
    out_path = check_output_path(out_path, overwrite)
    if not is_nifti(out_path):
        raise MedcamDataError(f"Heatmap output '{out_path}' must end in .nii.gz or .nii.")
    geom = reference_geometry(reference)
    arr = _as_3d(heatmap, geom.shape, "Heatmap")
    if not np.all(np.isfinite(arr)):
        raise MedcamDataError("Heatmap contains NaN or Inf values; fix the explanation method output first.")
    data = np.ascontiguousarray(arr, dtype=np.float32)
    img = _new_image(data, geom)
    hdr = img.header
    hdr["cal_min"] = float(data.min()) if data.size else 0.0
    hdr["cal_max"] = float(data.max()) if data.size else 0.0
    hdr.set_intent(NIFTI_INTENT_ESTIMATE, (), name=intent_name[:_INTENT_NAME_LEN])
    hdr["descrip"] = describe(method, target, layer).encode("ascii", "replace")
    with atomic_write(out_path, overwrite=overwrite) as tmp:
        nib.save(img, str(tmp))
    logger.info("saved heatmap %s (%s, target %s, layer %s)", out_path, method, target, layer)
    return out_path


def save_label_map(
    label: np.ndarray, reference: PathLike, out_path: PathLike, *, overwrite: bool = False, description: str = ""
) -> Path:
    """Save an integer label map [X, Y, Z] (values 0..255) as uint8 NIfTI on the reference grid.

    Raises:
        OutputExistsError, MedcamDataError: as :func:`save_heatmap`; also for values outside 0..255.
    """
    out_path = check_output_path(out_path, overwrite)
    geom = reference_geometry(reference)
    arr = _as_3d(label, geom.shape, "Label map")
    if arr.size and (arr.min() < 0 or arr.max() > 255 or not np.array_equal(arr, np.round(arr))):
        raise MedcamDataError("Label map must hold integers 0..255.")
    img = _new_image(np.ascontiguousarray(arr, dtype=np.uint8), geom)
    img.header["descrip"] = description[:_DESCRIP_LEN].encode("ascii", "replace")
    with atomic_write(out_path, overwrite=overwrite) as tmp:
        nib.save(img, str(tmp))
    return out_path


def read_geometry_sitk(
    path: PathLike,
) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(size, spacing mm, origin mm LPS, direction 3x3 row-major) as SimpleITK reads ``path`` (for checks)."""
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    return tuple(r.GetSize()), tuple(r.GetSpacing()), tuple(r.GetOrigin()), tuple(r.GetDirection())
