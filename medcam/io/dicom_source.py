"""A scan that is not DICOM, written as a classic MR series in a NEW study, so that its DICOM outputs have a source.

Used by ``--dicom-out on`` for NIfTI/NRRD/MHA cases: the reference scan as medcam loaded it (voxels ``[X, Y, Z]``,
RAS affine, mm) becomes one MR Image Storage file per slice (int16 with a rescale slope, ImageType
DERIVED\\SECONDARY\\OTHER, DerivationDescription naming the source file), with new Study, Series, Frame of Reference and
SOP Instance UIDs and the case id as PatientID. Pixel (row r, column c) of slice k is voxel (c, r, k); positions and
orientation come from the affine (LPS). highdicom builds no single-frame MR image, so pydicom writes these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _base_dataset(case_id: str, study: str, frame: str, series: str, description: str) -> Any:
    import datetime

    import pydicom

    now = datetime.datetime.now(datetime.timezone.utc)
    ds = pydicom.Dataset()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = f"medcam^{case_id}"[:64], case_id[:64], "", ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.StudyDate, ds.StudyTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName, ds.PositionReferenceIndicator = "1", "", "", ""
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription = "MR", 1, description[:64]
    ds.Manufacturer, ds.ImageType = "medcam", ["DERIVED", "SECONDARY", "OTHER"]
    ds.Laterality, ds.PatientPosition = None, None  # type 2C: unknown
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "RM", "NONE", "", "3D"
    ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength, ds.MagneticFieldStrength = None, None, None, None
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    return ds


def write_scan_series(
    volume: np.ndarray, affine: np.ndarray, folder: Path, *, case_id: str, source_name: str
) -> list[Path]:
    """Write ``volume`` ``[X, Y, Z]`` (RAS ``affine``, mm) as a new-study MR series into ``folder`` (one file per
    slice, each written atomically); returns the files in slice order."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    data = np.asarray(volume, dtype=np.float64)
    lps = _LPS @ np.asarray(affine, dtype=float)
    sx, sy, sz = (float(np.linalg.norm(lps[:3, a])) for a in range(3))
    top = float(np.abs(data).max()) or 1.0
    slope = float(f"{top / 32000.0:.10g}")
    base = _base_dataset(case_id, generate_uid(), generate_uid(), generate_uid(), f"medcam source {source_name}")
    files = []
    for k in range(data.shape[2]):
        ds = pydicom.Dataset()
        ds.update(base)
        ds.file_meta = FileMetaDataset()
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
            MRImageStorage,
            ds.SOPInstanceUID,
        )
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.InstanceNumber = k + 1
        ds.DerivationDescription = f"converted from {source_name} by medcam"[:1024]
        ds.ImagePositionPatient = [float(v) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [float(v) for v in (*(lps[:3, 0] / sx), *(lps[:3, 1] / sy))]
        ds.PixelSpacing, ds.SliceThickness, ds.SpacingBetweenSlices = [sy, sx], sz, sz
        ds.Rows, ds.Columns = int(data.shape[1]), int(data.shape[0])
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, slope, "US"
        ds.PixelData = np.round(data[:, :, k].T / slope).astype(np.int16).tobytes()
        with atomic_write(folder / f"{k + 1:04d}.dcm") as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        files.append(folder / f"{k + 1:04d}.dcm")
    return files
