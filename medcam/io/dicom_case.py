"""All DICOM outputs of one case (:mod:`medcam.io.dicom_out`, :mod:`medcam.io.dicom_overlay`), built and checked
in memory first, then written atomically into one folder."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MedcamDataError
from .dicom_out import FrameGeometry, check_written, parametric_map, read_source_series, save_dataset, segmentation
from .dicom_overlay import overlay_series

logger = logging.getLogger(__name__)

#: DICOM outputs: "auto" = for cases whose reference image is a DICOM series, "on" = required, "off" = never
DICOM_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class CaseMaps:
    """What the DICOM objects of a case show, all on the ORIGINAL grid ``[X, Y, Z]`` of the reference series.

    Attributes:
        maps: file stem (``<method>_<target>``) -> (map volume, description e.g. "Seg-HiRes-Grad-CAM of ET").
        regions: segment label -> 0/1 mask volume (predicted regions, target ROIs).
        background: the reference scan as loaded (for the overlays).
        affine: 4x4 RAS voxel->world affine (mm) of that grid.
        model: the model's description (ManufacturerModelName, algorithm name).
        scales: map name -> its colour scale (lo, hi) from the display spec (missing: 0 .. the map's maximum).
        ramp: the display spec's :class:`~medcam.io.display.Ramp` (None: the default).
    """

    maps: Mapping[str, tuple[np.ndarray, str]]
    regions: Mapping[str, np.ndarray]
    background: np.ndarray
    affine: np.ndarray
    model: str
    scales: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    ramp: Any = None


def wants_dicom(mode: str, reference: Path) -> bool:
    """Whether a case gets DICOM outputs: ``mode`` "on", or "auto" with a DICOM-series reference.

    Raises:
        MedcamDataError: unknown mode.
    """
    if mode not in DICOM_MODES:
        raise MedcamDataError(f"DICOM output mode {mode!r}: choose from {', '.join(DICOM_MODES)}")
    return mode == "on" or (mode == "auto" and reference.is_dir())


def _stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "map"


def build_case_objects(source_folder: Path, data: CaseMaps, cmap: str) -> dict[str, Any]:
    """Every DICOM object of the case: relative path -> pydicom dataset (built and validated by highdicom)."""
    source = read_source_series(source_folder)
    geom = FrameGeometry.from_affine(data.affine, data.background.shape)
    if len(source) != data.background.shape[2] or tuple(data.background.shape[:2]) != (
        int(source[0].Columns),
        int(source[0].Rows),
    ):
        raise MedcamDataError(
            f"the case grid {tuple(data.background.shape)} is not the grid of the series '{source_folder}' "
            f"({int(source[0].Columns)} x {int(source[0].Rows)} x {len(source)} slices)"
        )
    objects: dict[str, Any] = {}
    number = 9000
    for name, (vol, desc) in data.maps.items():
        number += 1
        objects[f"pm_{_stem(name)}.dcm"] = parametric_map(
            source, vol, geom, label="CAM", description=desc, model=data.model, series_number=number, cmap=cmap
        )
    if data.regions:
        objects["seg.dcm"] = segmentation(source, data.regions, geom, model=data.model, series_number=9000)
    for name, (vol, desc) in data.maps.items():
        number += 1
        sc = overlay_series(
            source, data.background, vol, geom, description=f"{desc} overlay", series_number=number,
            scale=data.scales.get(name), cmap=cmap, ramp=data.ramp,
        )  # fmt: skip
        objects.update({f"sc_{_stem(name)}/{k + 1:04d}.dcm": ds for k, ds in enumerate(sc)})
    return objects


def write_case_dicom(
    out_dir: Path, source_folder: Path, data: CaseMaps, *, cmap: str | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Build every DICOM object of a case, then write them into ``out_dir`` (each atomically) and read them back.

    Args:
        out_dir: the folder to fill (``<case>/dicom``).
        source_folder: the reference DICOM series the objects derive from.
        data: maps and regions on the series' grid.
        cmap: the display colour map named in the Parametric Maps (default: the overlays' colour map).

    Returns:
        ``{"source_series", "study", "objects": [{path (relative), sop_class, study, series, sop}]}``.
    """
    from .overlays import DEFAULT_CMAP

    objects = build_case_objects(Path(source_folder), data, cmap or DEFAULT_CMAP)
    paths = [save_dataset(ds, Path(out_dir) / rel, overwrite=overwrite) for rel, ds in objects.items()]
    records = check_written(paths)
    for r in records:
        r["path"] = str(Path(r["path"]).relative_to(out_dir))
    first = next(iter(objects.values()))
    logger.info("wrote %d DICOM objects into %s", len(records), out_dir)
    return {
        "source_series": str(first.ReferencedSeriesSequence[0].SeriesInstanceUID)
        if "ReferencedSeriesSequence" in first
        else "",
        "study": str(first.StudyInstanceUID),
        "objects": records,
    }


def case_dicom(
    out_dir: Path,
    case: Any,
    maps: Mapping[str, np.ndarray],
    regions: Mapping[str, np.ndarray],
    *,
    model: str,
    layer: str,
    mode: str | None,
    display: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The DICOM outputs of an explained case when ``mode`` asks for them (:func:`wants_dicom`), else None.

    Args:
        out_dir: the folder to write (``<staging>/dicom``).
        case: the loaded case (``reference_path`` = its reference DICOM folder, ``original_affine``).
        maps: ``"<method> <target>"`` -> map ``[X, Y, Z]`` on the original grid (the Slicer scene's maps).
        regions: segment label -> 0/1 mask ``[X, Y, Z]`` on the original grid.
        model, layer: recorded in the objects (model name, map descriptions).
        mode: "auto", "on", "off" or None (= "off").
        display: the case's display spec (``summary.json`` ``figures.display``): the overlays' colour map, ramp and
            each map's scale; None: the default colour map, each map on 0 .. its maximum.
    """
    from ..data.loading import read_volume

    ref = Path(case.reference_path)
    if mode is None or not wants_dicom(mode, ref):
        return None
    described = {name: (vol, f"{name} CAM, layer {layer}") for name, vol in maps.items()}
    background = read_volume(ref).numpy()
    affine = np.asarray(case.original_affine, dtype=float)
    scales, ramp, cmap = {}, None, None
    if display:
        from .display import spec_from_json

        spec = spec_from_json(display)
        scales = {f"{m.method.replace('+', 'pp')} {m.target}": m.scale for m in spec.maps}
        ramp, cmap = spec.ramp, spec.cmap
    data = CaseMaps(described, dict(regions), background, affine, model, scales, ramp)
    source, new_study = ref, not ref.is_dir()
    if new_study:  # the scan itself becomes the source series of a new study
        from .dicom_source import write_scan_series

        source = out_dir / "source"
        write_scan_series(background, affine, source, case_id=str(case.case_id), source_name=ref.name)
    record = write_case_dicom(out_dir, source, data, cmap=cmap)
    if new_study:
        scan = check_written(sorted(source.glob("*.dcm")))
        record["objects"] = [{**r, "path": str(Path(r["path"]).relative_to(out_dir))} for r in scan] + record["objects"]
    record["folder"], record["new_study"] = out_dir.name, new_study
    return record


def check_dicom_cases(cases: Sequence[Any], mode: str) -> None:
    """Before any work: the DICOM output mode is known (every case can have DICOM outputs: a case that is not DICOM
    gets them in a new study, see :mod:`medcam.io.dicom_source`).

    Raises:
        MedcamDataError: unknown mode.
    """
    wants_dicom(mode, Path("."))
    if mode == "on":
        n = sum(1 for c in cases if c.kind == "brats_folder" or not isinstance(c.source, (Mapping, list, tuple)))
        if n:
            logger.info("--dicom-out on: %d case(s) of image files get their DICOM outputs in a new study", n)
