"""Checking a DICOM series folder before any voxel data is read (pydicom, headers only).

A folder given as one image channel must hold exactly ONE classic single-frame series whose slices form a regular
3D grid: one orientation, no duplicate or missing slice, uniform slice spacing, slices stacked along the normal of
the image plane (no gantry tilt). Enhanced multi-frame objects (one file holding the whole volume) are refused with
the conversion to use. Channels given as several series must share one orientation.

Geometry follows DICOM: ImagePositionPatient / ImageOrientationPatient in the patient (LPS) coordinate system, mm.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MedcamDataError
from ..types import PathLike

logger = logging.getLogger(__name__)

#: tolerance on direction cosines and on positions relative to the slice spacing
ORIENTATION_ATOL = 1e-4
SPACING_RTOL = 0.01


@dataclass(frozen=True)
class DicomSeries:
    """One checked single-frame DICOM series.

    Attributes:
        folder: the series folder.
        files: slice files sorted by position along the slice normal (ascending).
        study_uid, series_uid, frame_of_reference_uid: the series' UIDs.
        sop_instance_uids: per slice (order of ``files``).
        orientation: ImageOrientationPatient (row cosines, column cosines; LPS).
        slice_spacing: distance between neighbouring slices (mm).
        description: SeriesDescription ("" when absent).
        modality: Modality (e.g. "MR").
    """

    folder: Path
    files: tuple[Path, ...]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...]
    orientation: tuple[float, ...]
    slice_spacing: float
    description: str
    modality: str


def _read_headers(folder: Path) -> list[tuple[Path, Any]]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    out = []
    for f in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError):  # not a DICOM file (a README, a DICOMDIR's junk...)
            continue
        if "SeriesInstanceUID" in ds and "SOPClassUID" in ds:
            out.append((f, ds))
    return out


def _check_one_series(folder: Path, headers: Sequence[tuple[Path, Any]]) -> None:
    if not headers:
        raise MedcamDataError(
            f"Folder '{folder}' contains no DICOM series (no DICOM image files). Give a folder holding the .dcm files "
            "of ONE series."
        )
    series: dict[str, list[str]] = {}
    for f, ds in headers:
        series.setdefault(str(ds.SeriesInstanceUID), []).append(f.name)
    if len(series) > 1:
        parts = [f"{uid} ({len(names)} files, e.g. {names[0]})" for uid, names in series.items()]
        raise MedcamDataError(
            f"Folder '{folder}' holds {len(series)} DICOM series: {'; '.join(parts)}. Move each series into its own "
            "folder and give each as one channel."
        )
    for f, ds in headers:
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
            raise MedcamDataError(
                f"'{f}' is an enhanced multi-frame DICOM object ({frames} frames in one file), but medcam expects a "
                "classic series (one file per slice). Convert it, e.g. with dcm4che's emf2sf or dcmtk's "
                "dcmconv, or export the series as single-frame images from your PACS."
            )
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in ds]
        if missing:
            raise MedcamDataError(f"DICOM file '{f}' lacks {', '.join(missing)}; it is not a 3D image slice.")


def _slice_positions(folder: Path, headers: Sequence[tuple[Path, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(orientation [6], sorted pairs) after checking that every slice has the same orientation."""
    orients = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in headers])
    bad = np.flatnonzero(np.abs(orients - orients[0]).max(axis=1) > ORIENTATION_ATOL)
    if bad.size:
        raise MedcamDataError(
            f"DICOM series '{folder}' mixes slice orientations: '{headers[int(bad[0])][0].name}' has "
            f"{np.round(orients[bad[0]], 4).tolist()}, '{headers[0][0].name}' has {np.round(orients[0], 4).tolist()}. "
            "Give a series with one orientation (one acquisition)."
        )
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in headers])
    return orients[0], positions


def _check_stacking(folder: Path, names: Sequence[str], normal: np.ndarray, positions: np.ndarray) -> float:
    """Slice spacing (mm) after the duplicate/missing/uniform/tilt checks; ``positions`` sorted along ``normal``."""
    d = positions @ normal
    steps = np.diff(d)
    pixel_tol = 1e-3
    dup = np.flatnonzero(steps < pixel_tol)
    if dup.size:
        i = int(dup[0])
        raise MedcamDataError(
            f"DICOM series '{folder}' has duplicate slices: '{names[i]}' and '{names[i + 1]}' lie at the same "
            f"position ({d[i]:.3f} mm along the normal). Remove the duplicates (or split repeated acquisitions)."
        )
    if steps.size == 0:
        raise MedcamDataError(f"DICOM series '{folder}' has one slice; medcam needs a 3D volume (>= 2 slices).")
    spacing = float(np.median(steps))
    off = np.flatnonzero(np.abs(steps - spacing) > SPACING_RTOL * spacing)
    if off.size:
        i = int(off[0])
        ratio = steps[i] / spacing
        if abs(ratio - round(ratio)) < SPACING_RTOL * 5 and round(ratio) >= 2:
            raise MedcamDataError(
                f"DICOM series '{folder}' is missing {round(ratio) - 1} slice(s) between '{names[i]}' and "
                f"'{names[i + 1]}' ({steps[i]:.3f} mm apart, the other slices {spacing:.3f} mm). Re-export the "
                "complete series."
            )
        raise MedcamDataError(
            f"DICOM series '{folder}' has non-uniform slice spacing: {steps[i]:.3f} mm between '{names[i]}' and "
            f"'{names[i + 1]}', {spacing:.3f} mm elsewhere. Resample it to a regular grid first."
        )
    offset = positions[-1] - positions[0]
    in_plane = offset - (offset @ normal) * normal
    if float(np.linalg.norm(in_plane)) > SPACING_RTOL * spacing * max(1, len(names) - 1) ** 0.5 + 1e-3:
        raise MedcamDataError(
            f"DICOM series '{folder}' has a gantry tilt (or sheared stack): the slices are shifted "
            f"{np.linalg.norm(in_plane):.2f} mm within the image plane from first to last. Resample it to an "
            "orthogonal grid first (e.g. a tilt-correcting DICOM-to-NIfTI converter such as dcm2niix)."
        )
    return spacing


def read_dicom_series(folder: PathLike) -> DicomSeries:
    """Check the DICOM series in ``folder`` from its headers and return its sorted slices and UIDs.

    Raises:
        MedcamDataError: no DICOM files, several series, an enhanced multi-frame object, a slice without geometry,
            mixed orientations, duplicate or missing slices, non-uniform slice spacing, gantry tilt.
    """
    folder = Path(folder)
    headers = _read_headers(folder)
    _check_one_series(folder, headers)
    orientation, positions = _slice_positions(folder, headers)
    normal = np.cross(orientation[:3], orientation[3:])
    order = np.argsort(positions @ normal, kind="stable")
    headers = [headers[int(i)] for i in order]
    names = [f.name for f, _ in headers]
    spacing = _check_stacking(folder, names, normal, positions[order])
    ds0 = headers[0][1]
    tilt = float(getattr(ds0, "GantryDetectorTilt", 0.0) or 0.0)
    if abs(tilt) > 1e-3:
        raise MedcamDataError(
            f"DICOM series '{folder}' was acquired with a gantry tilt of {tilt} degrees; resample it to an "
            "orthogonal grid first (e.g. dcm2niix corrects the tilt)."
        )
    return DicomSeries(
        folder=folder,
        files=tuple(f for f, _ in headers),
        study_uid=str(getattr(ds0, "StudyInstanceUID", "")),
        series_uid=str(getattr(ds0, "SeriesInstanceUID", "")),
        frame_of_reference_uid=str(getattr(ds0, "FrameOfReferenceUID", "")),
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for _, ds in headers),
        orientation=tuple(float(v) for v in orientation),
        slice_spacing=spacing,
        description=str(getattr(ds0, "SeriesDescription", "")),
        modality=str(getattr(ds0, "Modality", "")),
    )


def check_channel_series(series: Sequence[DicomSeries]) -> None:
    """Channels given as DICOM series must share one slice orientation.

    Raises:
        MedcamDataError: naming the first series whose orientation differs from the first one's.
    """
    for s in series[1:]:
        if not np.allclose(s.orientation, series[0].orientation, atol=ORIENTATION_ATOL):
            raise MedcamDataError(
                f"DICOM series '{s.folder}' has slice orientation {np.round(s.orientation, 4).tolist()}, but "
                f"'{series[0].folder}' has {np.round(series[0].orientation, 4).tolist()}: all channels must share "
                "one orientation and grid. Resample/register them onto a common grid first."
            )
