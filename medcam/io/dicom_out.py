"""DICOM outputs of a case (highdicom): a Parametric Map per map, one SEG of the regions, RGB overlay series.

Objects written into ``<case>/dicom/`` (every file through :func:`medcam.io.atomic.atomic_write`):

* ``pm_<method>_<target>.dcm`` - a **Parametric Map** (float32 frames, one per slice of the source grid; Real World
  Value Mapping identity, unit "no units"; window 0..max; the display colour map named in ContentDescription).
* ``seg.dcm`` - one binary **Segmentation** with a labelled segment per region (predicted region of every output
  channel, then the ROI of every target), algorithm type AUTOMATIC, algorithm identification = medcam + the model.
* ``sc_<method>_<target>/NNNN.dcm`` - a **secondary-capture** RGB series, one image per source slice: the scan in
  grey with the map blended in the colour map of the PNG overlays (for viewers that show neither PM nor SEG).

All reference the source series (study, series, frame of reference, derivation images), take the per-frame
geometry (ImagePositionPatient, ImageOrientationPatient, PixelSpacing, slice spacing) from the source grid, get new
UIDs, and identify medcam (Manufacturer, SoftwareVersions). Volumes are on the ORIGINAL grid ``[X, Y, Z]`` of the
source series as loaded (RAS affine, mm): frame ``k`` holds voxels ``[:, :, k]`` with rows along ``j``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MedcamDataError
from .atomic import atomic_write

logger = logging.getLogger(__name__)

MANUFACTURER = "medcam"
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class FrameGeometry:
    """Per-frame geometry of a grid in DICOM terms (patient LPS, mm).

    Attributes:
        positions: [Z, 3] ImagePositionPatient of frame k (voxel (0, 0, k)).
        orientation: row and column direction cosines (6 floats).
        pixel_spacing: (between rows, between columns) mm.
        slice_spacing: distance between frames, mm.
    """

    positions: np.ndarray
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    slice_spacing: float

    @classmethod
    def from_affine(cls, affine: np.ndarray, shape: Sequence[int]) -> FrameGeometry:
        """From a 4x4 RAS voxel->world affine and the grid shape (X, Y, Z)."""
        lps = _LPS @ np.asarray(affine, dtype=float)
        sx, sy, sz = (float(np.linalg.norm(lps[:3, a])) for a in range(3))
        row, col = lps[:3, 0] / sx, lps[:3, 1] / sy
        ks = np.arange(int(shape[2]), dtype=float)
        positions = (lps[:3, 2][None] * ks[:, None]) + lps[:3, 3][None]
        return cls(positions, tuple(float(v) for v in (*row, *col)), (sy, sx), sz)

    def highdicom(self) -> dict[str, Any]:
        """``pixel_measures``, ``plane_orientation``, ``plane_positions`` keyword arguments of highdicom."""
        import highdicom as hd

        return {
            "pixel_measures": hd.PixelMeasuresSequence(
                pixel_spacing=self.pixel_spacing,
                slice_thickness=self.slice_spacing,
                spacing_between_slices=self.slice_spacing,
            ),
            "plane_orientation": hd.PlaneOrientationSequence("PATIENT", self.orientation),
            "plane_positions": [hd.PlanePositionSequence("PATIENT", [float(v) for v in p]) for p in self.positions],
        }


def frames_of(volume: np.ndarray) -> np.ndarray:
    """``[X, Y, Z]`` volume -> ``[Z, Y, X]`` frames (frame k, row j, column i)."""
    return np.ascontiguousarray(np.asarray(volume).transpose(2, 1, 0))


def read_source_series(folder: Path) -> list[Any]:
    """The pydicom datasets (with pixels) of a checked series, sorted along the slice normal."""
    import pydicom

    from ..data.dicom_series import read_dicom_series

    return [pydicom.dcmread(f) for f in read_dicom_series(folder).files]


def _device(model: str) -> dict[str, Any]:
    from .. import __version__

    return {
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": model[:64] or "medcam",
        "software_versions": f"medcam {__version__}",
        "device_serial_number": "0",
    }


def parametric_map(
    source: Sequence[Any],
    volume: np.ndarray,
    geometry: FrameGeometry,
    *,
    label: str,
    description: str,
    model: str,
    series_number: int,
    cmap: str,
) -> Any:
    """A float Parametric Map of ``volume`` ``[X, Y, Z]`` (map values, no units) on ``geometry``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    frames = frames_of(volume).astype(np.float32)
    hi = float(frames.max()) if frames.size and float(frames.max()) > 0 else 1.0
    rwvm = hd.pm.RealWorldValueMapping(
        lut_label="CAM",
        lut_explanation=description[:64],
        unit=codes.UCUM.NoUnits,
        value_range=(float(min(frames.min(), 0.0)), hi),
        slope=1.0,
        intercept=0.0,
    )
    pm = hd.pm.ParametricMap(
        source_images=list(source), pixel_array=frames, series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, **_device(model),
        contains_recognizable_visual_features=False, real_world_value_mappings=[rwvm],
        window_center=hi / 2, window_width=hi, content_label=label[:16].upper().replace(" ", "_") or "CAM",
        content_description=f"{description}; display colour map {cmap}"[:64],
        **geometry.highdicom(),
    )  # fmt: skip
    return with_laterality(pm)


def segmentation(
    source: Sequence[Any],
    masks: Mapping[str, np.ndarray],
    geometry: FrameGeometry,
    *,
    model: str,
    series_number: int,
) -> Any:
    """One binary SEG with a segment per entry of ``masks`` (label -> bool ``[X, Y, Z]``)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algo = hd.AlgorithmIdentificationSequence(
        name=f"medcam {model}"[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=_device(model)["software_versions"],
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=name[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
        )  # fmt: skip
        for i, name in enumerate(masks)
    ]
    pixels = np.stack([frames_of(m > 0) for m in masks.values()], axis=-1).astype(bool)
    return hd.seg.Segmentation(
        source_images=list(source), pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, **_device(model), omit_empty_frames=False,
        series_description="medcam regions", **geometry.highdicom(),
    )  # fmt: skip


def with_laterality(ds: Any) -> Any:
    """``ds`` with the General Series' Laterality (type 2C) present, empty (unknown) unless the source had it."""
    if "Laterality" not in ds and "ImageLaterality" not in ds:
        ds.Laterality = None
    return ds


def save_dataset(ds: Any, path: Path, overwrite: bool = False) -> Path:
    """Write one DICOM object atomically (temporary file + rename), as a DICOM file (preamble + meta)."""
    with atomic_write(path, overwrite=overwrite) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def check_written(paths: Sequence[Path]) -> list[dict[str, str]]:
    """Read every written object back (pydicom) and return ``{path, sop_class, study, series, sop}`` each.

    Raises:
        MedcamDataError: a file that does not read back as DICOM with its UIDs.
    """
    import pydicom

    out = []
    for p in paths:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            out.append(
                {
                    "path": str(p),
                    "sop_class": str(ds.SOPClassUID),
                    "study": str(ds.StudyInstanceUID),
                    "series": str(ds.SeriesInstanceUID),
                    "sop": str(ds.SOPInstanceUID),
                }
            )
        except Exception as e:  # noqa: BLE001 - any failure means the object is not usable
            raise MedcamDataError(f"DICOM output '{p}' does not read back ({type(e).__name__}: {e})") from e
    return out
