"""All pictures of one explained case: one overlay PNG per (method, target) and a montage, from one display spec.

Everything is drawn on the ORIGINAL image grid (the maps as written to ``heatmaps/*.nii.gz``) over the ORIGINAL
intensities of the background modality of each target (see :mod:`medcam.io.overlays` for the conventions), with
the case's display spec (:mod:`medcam.io.display`: colour map, scale per method or per picture, ramp, window per
target, segment colours), which :func:`write_case_figures` returns for ``summary.json`` so that the HTML viewer and
the Slicer scene draw with the same numbers.

* An all-zero map is drawn as such ("map is zero" on the picture); :func:`zero_map_warnings` gives the warning lines
  the pipeline logs and records in ``summary.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medcam.data.loading import MedcamDataError
from medcam.geometry import parse_slice_at
from medcam.io.atomic import atomic_write
from medcam.io.display import (
    DEFAULT_CMAP,
    DisplaySpec,
    MapDisplay,
    Ramp,
    lesion_window,
    map_scales,
    segments_spec,
)
from medcam.io.montage import MontageCell, MontageColumn, MontageRow, montage_figure
from medcam.io.overlays import OverlayLayer, RasVolume, overlay_figure, slice_centre

logger = logging.getLogger(__name__)

MONTAGE_STEM = "montage"
MONTAGE_NAME = "montage.png"
#: formats of the montage written by default / accepted
MONTAGE_FORMATS: tuple[str, ...] = ("png", "pdf")
MONTAGE_FORMATS_ALL: tuple[str, ...] = ("png", "pdf", "svg")
#: resolution of the montage PNG (a figure for a paper)
MONTAGE_DPI = 300
#: resolution of the scan images embedded in the PDF/SVG montage (about one pixel per voxel; text and lines are
#: vectors)
VECTOR_IMAGE_DPI = 150


@dataclass(frozen=True)
class MapEntry:
    """One explanation map of a case.

    Attributes:
        method: method key (e.g. "gradcam"); method_label: its display name ("Seg-Grad-CAM").
        target: target name (e.g. "WT").
        heatmap: [X, Y, Z] map on the ORIGINAL grid (map units).
        png: path of its overlay, relative to the case folder (e.g. "overlays/gradcam_WT.png").
    """

    method: str
    method_label: str
    target: str
    heatmap: np.ndarray
    png: str


def zero_map_warnings(case_id: str, entries: Sequence[MapEntry]) -> list[str]:
    """One warning line per all-zero map (also logged with ``logging.warning``)."""
    out = []
    for e in entries:
        if not np.any(np.asarray(e.heatmap) > 0):
            msg = (
                f"case {case_id}: the {e.method_label} map of target {e.target} is zero everywhere (no positive "
                "evidence at this layer: try another layer or method)"
            )
            logger.warning(msg)
            out.append(msg)
    return out


def _fmt(v: float) -> str:
    return f"{v:.3g}"


@dataclass
class _RasCase:
    """A case's pictures' inputs on the RAS grid: backgrounds, maps (entry order), ROIs, and the display spec
    (scales, windows, slice centres: one per map, as RAS voxel indices in ``centres``)."""

    backgrounds: dict[str, RasVolume]
    maps: list[np.ndarray]
    rois: dict[str, np.ndarray | None]
    centres: list[tuple[int, int, int]]
    spec: DisplaySpec


@dataclass(frozen=True)
class _Labels:
    """What the pictures' titles name: the case, the layer, each target's ROI volume (ml)."""

    case_id: str
    layer: str
    roi_ml: Mapping[str, float]


def _centres(
    entries: Sequence[MapEntry],
    maps: Sequence[np.ndarray],
    rois: Mapping[str, Any],
    bgs: Mapping[str, RasVolume],
    target_background: Mapping[str, str],
    slice_at: str,
) -> list[tuple[int, int, int]]:
    """One RAS voxel per map: "roi": the target's ROI centre (all methods of a target cut at one place, so they
    compare); "max": each map's own maximum (every method shows its own peak); "x,y,z": that RAS point."""
    point = parse_slice_at(slice_at)
    out: list[tuple[int, int, int]] = []
    for e, m in zip(entries, maps):
        bg = bgs[target_background[e.target]]
        if point is not None:
            ijk = np.linalg.solve(bg.affine, np.r_[point, 1.0])[:3]
            i, j, k = (int(np.clip(round(float(v)), 0, n - 1)) for v, n in zip(ijk, m.shape))
            out.append((i, j, k))
        elif slice_at == "max":
            out.append(slice_centre(m, rois.get(e.target), "max", bg.data))
        else:
            t_maps = [mm for ee, mm in zip(entries, maps) if ee.target == e.target]
            out.append(slice_centre(np.maximum.reduce(t_maps), rois.get(e.target), "roi", bg.data))
    return out


def _ras_case(
    entries: Sequence[MapEntry],
    affine: np.ndarray,
    backgrounds: Mapping[str, np.ndarray],
    target_background: Mapping[str, str],
    rois: Mapping[str, np.ndarray | None],
    *,
    slice_at: str,
    scale_mode: str,
    cmap: str,
    segments: Sequence[str],
) -> _RasCase:
    """Reorient everything to RAS and compute the case's display spec."""
    ras_bg = {name: RasVolume.from_array(arr, affine) for name, arr in backgrounds.items()}
    for t, ch in target_background.items():
        if ch not in ras_bg:
            raise MedcamDataError(f"background {ch!r} of target {t!r} is not among {sorted(ras_bg)}")
    ras_maps = [RasVolume.from_array(e.heatmap, affine).data for e in entries]
    ras_rois = {t: None if r is None else RasVolume.from_array(r, affine).data.astype(bool) for t, r in rois.items()}
    centres = _centres(entries, ras_maps, ras_rois, ras_bg, target_background, slice_at)
    maxima = [float(np.max(m)) for m in ras_maps]
    scales = map_scales([(e.method, mx) for e, mx in zip(entries, maxima)], scale_mode)
    maps = []
    for e, m, mx, (sc, own), c in zip(entries, ras_maps, maxima, scales, centres):
        vol = ras_bg[target_background[e.target]]
        x, y, z = (round(float(v), 3) for v in vol.world(c))
        peak = tuple(int(v) for v in np.unravel_index(int(np.argmax(m)), m.shape))
        px, py, pz = (round(float(v), 3) for v in vol.world(peak))
        seen = mx <= 0 or any(peak[a] == c[a] for a in range(3))
        maps.append(
            MapDisplay(e.method, e.method_label, e.target, mx, sc, own, mx <= 0, (x, y, z), Path(e.png).stem,
                       (px, py, pz), seen)
        )  # fmt: skip
    bgs: dict[str, dict[str, Any]] = {}
    for t in dict.fromkeys(e.target for e in entries):
        ch = target_background[t]
        lo, hi = lesion_window(ras_bg[ch].data, ras_rois.get(t))
        bgs[t] = {"channel": ch, "window": [lo, hi]}
    spec = DisplaySpec(cmap, scale_mode, slice_at, Ramp(), maps, bgs, segments_spec(segments))
    return _RasCase(ras_bg, ras_maps, ras_rois, centres, spec)


def _save(fig: Any, path: Path, dpi: int) -> None:
    """Write ``fig`` atomically; PNGs as opaque RGB (a white figure has no transparency to keep: 10 % smaller)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".")
    with atomic_write(path) as tmp:
        if fmt != "png":
            fig.savefig(str(tmp), format=fmt, dpi=dpi, facecolor="white", metadata={"Creator": None})
            return
        from PIL import Image

        fig.set_dpi(dpi)
        fig.set_facecolor("white")
        fig.canvas.draw()
        rgb = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
        rgb.save(str(tmp), format="PNG", optimize=True, dpi=(dpi, dpi))


def _roi_colour(spec: DisplaySpec, target: str, target_region: Mapping[str, str]) -> Any:
    """The ROI contour colour of a target: the segment colour of its region, else cyan."""
    region = target_region.get(target)
    for s in spec.segments:
        if region is not None and str(s["name"]).split()[-1:] == [region]:
            return tuple(s["color"])
    return "cyan"


def _write_overlays(
    out_dir: Path,
    entries: Sequence[MapEntry],
    ras: _RasCase,
    labels: _Labels,
    target_region: Mapping[str, str],
    dpi: int,
) -> None:
    """One overlay PNG per entry, drawn with the spec's scale, window, ramp and slice centre of that map."""
    spec = ras.spec
    for e, m, md, c in zip(entries, ras.maps, spec.maps, ras.centres):
        bg = spec.backgrounds[e.target]
        vol = ras.backgrounds[bg["channel"]]
        scale_note = "own scale" if md.own_scale else f"scale shared by the {e.method_label} maps"
        title = (
            f"{labels.case_id} | {e.method_label} | target {e.target} | layer {labels.layer} | map max {_fmt(md.max)}"
            f"{' (map is zero)' if md.zero else ''} | ROI {labels.roi_ml.get(e.target, float('nan')):.2f} ml"
            f" | background {bg['channel']} | {scale_note}{_peak_note(md)}"
        )
        fig = overlay_figure(
            vol.data,
            m,
            ras.rois.get(e.target),
            vol.affine,
            title=title,
            centre=c,
            vmin=md.scale[0],
            vmax=md.scale[1],
            window=(bg["window"][0], bg["window"][1]),
            cmap=spec.cmap,
            ramp=spec.ramp,
            roi_color=_roi_colour(spec, e.target, target_region),
            colorbar_label=f"{e.method_label} ({spec.unit})",
        )
        _save(fig, out_dir / e.png, dpi)


def _peak_note(md: MapDisplay, short: bool = False) -> str:
    """ " | peak off these slices at (x, y, z) mm" when no shown slice goes through the map's maximum."""
    if md.peak_in_view or md.peak_mm is None:
        return ""
    where = ", ".join(f"{v:.0f}" for v in md.peak_mm)
    return f"\npeak off-slice ({where})" if short else f" | peak off these slices, at RAS ({where}) mm"


def _montage_title(labels: _Labels, spec: DisplaySpec) -> str:
    scale = "one colour scale per method" if spec.scale_mode == "method" else "each panel on its own scale"
    where = {"roi": "the ROI centre", "max": "each map's maximum"}.get(spec.slice_at, f"RAS ({spec.slice_at}) mm")
    return (
        f"{labels.case_id} | layer {labels.layer} | rows: targets, columns: methods (axial, coronal, sagittal) | "
        f"{scale} | slices through {where} | outline: target ROI"
    )


def _write_montage(
    out_dir: Path,
    ras: _RasCase,
    labels: _Labels,
    target_region: Mapping[str, str],
    formats: Sequence[str],
) -> dict[str, Any]:
    """The montage (rows = targets, columns = methods) in every format of ``formats``; returns format -> path and
    ``panels``: "target/method" -> (left, top, right, bottom) of its three views, fractions of the image."""
    spec = ras.spec
    rows = []
    for t, bg in spec.backgrounds.items():
        cells = {}
        for m, md, c in zip(ras.maps, spec.maps, ras.centres):
            if md.target == t:
                own = " (own scale)" if md.own_scale else ""
                cap = f"{md.method_label}\n{'map is zero' if md.zero else 'max ' + _fmt(md.max)}{own}{_peak_note(md, True)}"
                cells[md.method] = MontageCell(m, cap, c, md.scale, md.own_scale, md.method_label)
        win = (bg["window"][0], bg["window"][1])
        layer = OverlayLayer(
            ras.backgrounds[bg["channel"]], None, ras.rois.get(t), win, _roi_colour(spec, t, target_region)
        )
        rows.append(MontageRow(layer, f"{t} ({labels.roi_ml.get(t, float('nan')):.1f} ml)\non {bg['channel']}", cells))
    scales = spec.method_scales()
    columns = list(
        {md.method: MontageColumn(md.method, md.method_label, scales[md.method]) for md in spec.maps}.values()
    )
    fig = montage_figure(rows, columns, title=_montage_title(labels, spec), cmap=spec.cmap, ramp=spec.ramp)
    out: dict[str, Any] = {}
    row_names = list(spec.backgrounds)
    out["panels"] = {
        f"{row_names[r]}/{m}": [round(v, 5) for v in box]
        for (r, m), box in fig.medcam_panels.items()  # type: ignore[attr-defined]
    }
    for fmt in formats:
        rel = f"{MONTAGE_STEM}.{fmt}"
        _save(fig, out_dir / rel, MONTAGE_DPI if fmt == "png" else VECTOR_IMAGE_DPI)
        out[fmt] = rel
    return out


def write_case_figures(
    out_dir: Path,
    entries: Sequence[MapEntry],
    *,
    case_id: str,
    affine: np.ndarray,
    backgrounds: Mapping[str, np.ndarray],
    target_background: Mapping[str, str],
    rois: Mapping[str, np.ndarray | None],
    roi_ml: Mapping[str, float],
    layer: str,
    shared_scale: bool = True,
    slice_at: str = "roi",
    cmap: str = DEFAULT_CMAP,
    montage: bool = True,
    images: Mapping[str, Any] | None = None,
    dpi: int = 100,
    segments: Sequence[str] = (),
    target_region: Mapping[str, str] | None = None,
    montage_formats: Sequence[str] = MONTAGE_FORMATS,
) -> dict[str, Any]:
    """Write every overlay of ``entries`` and the montage into ``out_dir`` (files must not exist yet), all drawn
    from one display spec (:mod:`medcam.io.display`), which the returned record holds.

    Args:
        out_dir: the case folder (staging folder of the pipeline).
        entries: the maps (original grid) and their overlay paths.
        case_id: for titles and warnings.
        affine: 4x4 voxel -> RAS (mm) of the original grid.
        backgrounds: channel name -> ORIGINAL intensities [X, Y, Z] on that grid.
        target_background: target name -> channel name drawn behind it.
        rois: target name -> bool ROI [X, Y, Z] on the original grid (contour, slice centre, lesion window), or None.
        roi_ml: target name -> ROI volume in ml (for titles).
        layer: explained layer (for titles).
        shared_scale: one colour scale per method shared by its targets (else one per picture); never across methods.
        slice_at: "roi" (the target's ROI centre of mass), "max" (each map's own maximum) or "x,y,z" (RAS mm).
        cmap: heatmap colour map (matplotlib name).
        montage: also write the montage in ``montage_formats`` ("png" at 300 dpi, "pdf", "svg").
        images: channel -> original file of every scan of the case (recorded for the HTML report).
        dpi: resolution of the overlay PNGs.
        segments: names of the predicted regions (e.g. "predicted TC"; their colours go into the spec).
        target_region: target -> the region whose segment colour its ROI contour takes (else cyan).

    Returns:
        ``{"display": the spec (JSON), "scale": {method: [lo, hi]}, "shared_scale", "slice_at", "montage": PNG path
        or None, "montage_files": {format: path}, "montage_panels": {"target/method": [left, top, right, bottom]
        fractions of the montage image}, "background": {target: channel}, "images": {channel: file},
        "centres_mm": {target: [x, y, z]} (slices of the target's first map)}``.
    """
    if not entries:
        raise MedcamDataError("write_case_figures needs at least one map")
    bad = sorted(set(montage_formats) - set(MONTAGE_FORMATS_ALL))
    if bad:
        raise MedcamDataError(f"montage formats must be among {MONTAGE_FORMATS_ALL}, got {bad}")
    mode = "method" if shared_scale else "picture"
    ras = _ras_case(
        entries, affine, backgrounds, target_background, rois,
        slice_at=slice_at, scale_mode=mode, cmap=cmap, segments=segments,
    )  # fmt: skip
    labels = _Labels(case_id, layer, roi_ml)
    _write_overlays(out_dir, entries, ras, labels, target_region or {}, dpi)
    files = _write_montage(out_dir, ras, labels, target_region or {}, montage_formats) if montage else {}
    panels = files.pop("panels", None)
    centres: dict[str, list[float]] = {}
    for md in ras.spec.maps:
        centres.setdefault(md.target, list(md.centre_mm))
    return {
        "display": ras.spec.to_json(),
        "scale": {k: list(v) for k, v in ras.spec.method_scales().items()},
        "shared_scale": bool(shared_scale),
        "slice_at": slice_at,
        "montage": files.get("png"),
        "montage_files": files,
        "montage_panels": panels,
        "background": dict(target_background),
        "images": {k: str(v) for k, v in (images or {}).items()},
        "centres_mm": centres,
    }


def _background_channel(case: Any) -> str:
    names = [str(n) for n in case.channel_names]
    return "t1ce" if "t1ce" in names else names[0]


def figure_inputs(
    case: Any,
    targets: Sequence[Any],
    target_regions: Sequence[str],
    roi_masks: Sequence[np.ndarray],
    overlay_channel: Any,
) -> dict[str, Any]:
    """What :func:`write_case_figures` needs from a loaded case (original intensities and grid, ROIs on it).

    Args:
        case: a loaded case (``paths``, ``channel_names``, ``original_affine``, ``invert``).
        targets: the target specs (``.name``); target_regions: the output region of each target.
        roi_masks: bool ROIs [X', Y', Z'] on the PREPROCESSED grid, one per target (mapped back here).
        overlay_channel: ``(case, region) -> channel index`` drawn behind a region.
    """
    from medcam.data.loading import read_volume

    target_background = {
        t.name: str(case.channel_names[overlay_channel(case, r)]) for t, r in zip(targets, target_regions)
    }
    backgrounds = {ch: read_volume(case.paths[ch]).numpy() for ch in dict.fromkeys(target_background.values())}
    rois = {t.name: case.invert(np.asarray(m, np.float32), nearest=True) > 0.5 for t, m in zip(targets, roi_masks)}
    return {
        "case_id": case.case_id,
        "affine": np.asarray(case.original_affine, float),
        "backgrounds": backgrounds,
        "target_background": target_background,
        "rois": rois,
        "images": {str(n): str(case.paths[n]) for n in case.channel_names},
        "target_region": {t.name: str(r) for t, r in zip(targets, target_regions)},
    }


def scene_images(case: Any) -> dict[str, Any]:
    """Slicer scene volumes of a case: ``image_path`` (background: T1ce, else the first channel) and
    ``other_images`` (every other channel), keyword arguments of :func:`medcam.io.export_slicer_scene`."""
    bg = _background_channel(case)
    names = [str(n) for n in case.channel_names]
    return {
        "image_path": Path(case.paths[bg]),
        "image_name": bg,
        "other_images": {n: Path(case.paths[n]) for n in names if n != bg},
    }
