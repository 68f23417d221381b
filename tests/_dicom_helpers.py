"""Test set-up for the DICOM tests: real BraTS NIfTI volumes written as classic MR series (pydicom), cropped and
downsampled so the demo model runs in seconds; dciodvfy; an Orthanc server with its DICOMweb plugin."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from tests._data_fixtures import B23, B23_FILES

#: the crop of the shared case (voxel index ranges of the 240x240x155 grid, every 2nd voxel: 2 mm) around its tumour
CROP = (slice(60, 188, 2), slice(70, 198, 2), slice(30, 126, 2))
MODALITIES = ("t1", "t1ce", "t2", "flair")


def small_case(dest: Path) -> dict[str, Path]:
    """The shared 2023-layout case cropped and downsampled to 64x64x48 voxels of 2 mm, as NIfTI files
    ``dest/<modality>.nii.gz`` (and ``seg``); the affine is the source's with the 2 mm step and the crop offset."""
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for mod, fname in B23_FILES.items():
        img = nib.load(str(B23 / fname))
        data = np.asarray(img.dataobj)[CROP]
        aff = img.affine.copy()
        start = np.array([s.start for s in CROP], dtype=float)
        aff[:3, 3] = img.affine[:3, :3] @ start + img.affine[:3, 3]
        aff[:3, :3] = img.affine[:3, :3] * 2
        dtype = np.int16 if mod == "seg" else np.float32
        out[mod] = dest / f"{mod}.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(dtype), aff), str(out[mod]))
    return out


def nifti_to_series(
    nifti: Path,
    folder: Path,
    *,
    study_uid: str,
    frame_uid: str,
    description: str,
    series_number: int = 1,
    patient: tuple[str, str] = ("BRATS^Test", "medcam-test-1"),
) -> list[Path]:
    """Write a NIfTI volume as a classic MR series (one file per axial slice, int16, rescaled), geometry from the
    NIfTI affine: pixel (row r, column c) of slice k is voxel (c, r, k)."""
    img = nib.load(str(nifti))
    data = np.asarray(img.dataobj, dtype=np.float64)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    sx, sy, sz = (float(np.linalg.norm(lps[:3, a])) for a in range(3))
    row, col = lps[:3, 0] / sx, lps[:3, 1] / sy
    hi = float(np.abs(data).max()) or 1.0
    slope = hi / 32000.0
    series_uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID = patient
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20240101", "120000", "A1", ""
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", series_number, k + 1
        ds.Modality, ds.Manufacturer, ds.SeriesDescription = "MR", "medcam-tests", description
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "3D"
        ds.EchoTrainLength = 1
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [float(v) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
        ds.PixelSpacing = [sy, sx]
        ds.SliceThickness = sz
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, f"{slope:.10g}", "US"
        ds.PixelData = np.round(data[:, :, k].T / float(f"{slope:.10g}")).astype(np.int16).tobytes()
        files.append(folder / f"slice{k:04d}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    return files


def case_series(dest: Path, modalities=MODALITIES) -> tuple[dict[str, Path], dict[str, Path], str]:
    """The small case as NIfTI (``dest/nifti``) and as four MR series of one study (``dest/dicom/<modality>``);
    returns (NIfTI files, series folders, StudyInstanceUID)."""
    nifti = small_case(dest / "nifti")
    study, frame = generate_uid(), generate_uid()
    folders = {}
    for i, mod in enumerate(modalities):
        folders[mod] = dest / "dicom" / mod
        nifti_to_series(
            nifti[mod], folders[mod], study_uid=study, frame_uid=frame, description=f"BraTS {mod}", series_number=i + 1
        )
    return nifti, folders, study


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines of dciodvfy (dicom3tools) on one DICOM file."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy (Debian dicom3tools) is not installed") if os.environ.get("CI") else pytest.skip(
            "dciodvfy not installed"
        )
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


# ---------------------------------------------------------------------------------------------------- Orthanc
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dicomweb_plugin() -> str | None:
    for d in ("/usr/share/orthanc/plugins", "/usr/lib/orthanc"):
        for p in sorted(Path(d).glob("libOrthancDicomWeb*")) if Path(d).is_dir() else []:
            return str(p)
    return None


@contextlib.contextmanager
def orthanc_server(root: Path) -> Iterator[str]:
    """A real Orthanc with its DICOMweb plugin on a free localhost port (temporary storage and config); yields the
    DICOMweb root URL (``http://127.0.0.1:PORT/dicom-web``); stopped after. Missing Orthanc: skip (fail with CI)."""
    exe, plugin = shutil.which("Orthanc"), _dicomweb_plugin()
    if exe is None or plugin is None:
        msg = "Orthanc with its DICOMweb plugin (Debian orthanc, orthanc-dicomweb) is not installed"
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)
    http, dicom = _free_port(), _free_port()
    config = {
        "Name": "medcam-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
        "HttpPort": http, "DicomPort": dicom, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([exe, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http}"
    try:
        for _ in range(300):
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(root / 'orthanc.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(url + "/dicom-web/studies", timeout=1).read()
                break
            time.sleep(0.1)
        yield url + "/dicom-web"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
