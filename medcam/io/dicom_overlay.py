"""RGB secondary-capture overlay series (highdicom ``SCImage``): the scan in grey with a map blended in colour.

One image per frame of the source grid, same rows/columns/pixel spacing as the source slice it is derived from
(referenced in SourceImageSequence). The colours are those of the case's display spec (:mod:`medcam.io.display`:
its colour table with the opacity ramp, and each map's colour scale, the same as in the PNGs, the viewer and Slicer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from ..errors import MedcamDataError
from .dicom_out import MANUFACTURER, FrameGeometry, with_laterality

#: opacity of the map over the scan at full colour-map opacity
OPACITY = 0.6


def overlay_rgb(
    background: np.ndarray,
    heatmap: np.ndarray,
    *,
    scale: tuple[float, float] | None = None,
    cmap: str | None = None,
    ramp: Any = None,
) -> np.ndarray:
    """RGB uint8 ``[..., 3]`` of ``background`` (grey, windowed 1st-99th percentile of its non-zero voxels) with
    ``heatmap`` (same shape) blended in the display spec's colours (:func:`medcam.io.display.heat_lut` of ``cmap``
    and ``ramp``, :class:`medcam.io.display.Ramp`) on the colour ``scale`` (lo, hi) in map units (None: 0 .. the
    map's maximum); where the map is 0 the pixel is grey (R = G = B)."""
    from .display import DEFAULT_CMAP, Ramp, heat_lut
    from .overlays import foreground_window

    r = ramp if ramp is not None else Ramp()
    lo, hi = foreground_window(np.asarray(background, dtype=np.float64))
    grey = np.clip((np.asarray(background, dtype=np.float64) - lo) / ((hi - lo) or 1.0), 0.0, 1.0)
    hm = np.clip(np.asarray(heatmap, dtype=np.float64), 0.0, None)
    s_lo, s_hi = scale if scale is not None else (0.0, float(hm.max()) or 1.0)
    lut = heat_lut(cmap or DEFAULT_CMAP, r)  # 256 x RGBA, the PNGs' / viewer's / Slicer's table
    idx = np.clip(np.round((hm - s_lo) / ((s_hi - s_lo) or 1.0) * 255.0), 0, 255).astype(np.int64)
    rgba = lut[idx]
    alpha = np.where(hm > 0, rgba[..., 3], 0.0)[..., None] * r.opacity
    rgb = grey[..., None] * (1.0 - alpha) + rgba[..., :3] * alpha
    return np.round(rgb * 255.0).astype(np.uint8)


def patient_orientation(cosines: Sequence[float]) -> tuple[str, str]:
    """PatientOrientation letters (row direction, column direction) of LPS direction cosines, e.g. ("L", "P")."""
    out = []
    for vec in (np.asarray(cosines[:3], float), np.asarray(cosines[3:6], float)):
        letters = ""
        for axis in np.argsort(-np.abs(vec)):
            if abs(vec[axis]) > 1e-3:
                letters += ("LR", "PA", "HF")[axis][0 if vec[axis] > 0 else 1]
        out.append(letters)
    return out[0], out[1]


def match_sources(source: Sequence[Any], geometry: FrameGeometry) -> list[Any]:
    """The source slice of every frame of ``geometry`` (same position within a tenth of the slice spacing).

    Raises:
        MedcamDataError: a frame with no source slice at its position.
    """
    pos = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in source])
    out = []
    for k, p in enumerate(geometry.positions):
        d = np.linalg.norm(pos - p[None], axis=1)
        i = int(np.argmin(d))
        if d[i] > 0.1 * geometry.slice_spacing:
            raise MedcamDataError(f"frame {k} at {np.round(p, 3).tolist()} mm matches no slice of the source series")
        out.append(source[i])
    return out


def overlay_series(
    source: Sequence[Any],
    background: np.ndarray,
    heatmap: np.ndarray,
    geometry: FrameGeometry,
    *,
    description: str,
    series_number: int,
    scale: tuple[float, float] | None = None,
    cmap: str | None = None,
    ramp: Any = None,
) -> list[Any]:
    """The secondary-capture images (one per frame) of ``heatmap`` over ``background`` (both ``[X, Y, Z]``),
    coloured as :func:`overlay_rgb` (``scale``, ``cmap``, ``ramp``: the display spec's)."""
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    refs = match_sources(source, geometry)
    rgb = overlay_rgb(background, heatmap, scale=scale, cmap=cmap, ramp=ramp)  # [X, Y, Z, 3]
    series_uid = hd.UID()
    orientation = patient_orientation(geometry.orientation)
    out = []
    for k, ref in enumerate(refs):
        frame = np.ascontiguousarray(rgb[:, :, k, :].transpose(1, 0, 2))  # [rows (j), columns (i), 3]
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref, pixel_array=frame, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=series_number,
            sop_instance_uid=hd.UID(), instance_number=k + 1, manufacturer=MANUFACTURER,
            pixel_spacing=cast(Any, geometry.pixel_spacing), patient_orientation=orientation,
            series_description=description[:64],
        )  # fmt: skip
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ref.SOPClassUID, ref.SOPInstanceUID
        sc.SourceImageSequence = DicomSequence([item])
        sc.DerivationDescription = f"medcam overlay: {description}"[:1024]
        out.append(with_laterality(sc))
    return out
