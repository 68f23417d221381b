"""All pictures of one explained case: one overlay PNG per (method, target) and a montage, on one colour scale.

Everything is drawn on the ORIGINAL image grid (the maps as written to ``heatmaps/*.nii.gz``) over the ORIGINAL
intensities of the background modality of each target (see :mod:`medcam.io.overlays` for the conventions).

* ``shared_scale=True`` (default): every picture of the case uses 0 .. the largest map value over all methods and
  targets, so colours compare across pictures; otherwise each overlay uses 0 .. its own maximum (the montage always
  shares one scale: one colour bar).
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
from medcam.io.atomic import atomic_write
from medcam.io.overlays import (
    DEFAULT_CMAP,
    MontageCell,
    MontageRow,
    OverlayLayer,
    RasVolume,
    foreground_window,
    map_scale,
    montage_figure,
    overlay_figure,
    slice_centre,
)

logger = logging.getLogger(__name__)

MONTAGE_NAME = "montage.png"


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
    """A case's pictures' inputs on the RAS grid: backgrounds and their grey windows, maps (entry order), ROIs,
    the slice centre of each target and the colour scale of all maps."""

    backgrounds: dict[str, RasVolume]
    windows: dict[str, tuple[float, float]]
    maps: list[np.ndarray]
    rois: dict[str, np.ndarray | None]
    centres: dict[str, tuple[int, int, int]]
    scale: tuple[float, float]


@dataclass(frozen=True)
class _Labels:
    """What the pictures' titles name: the case, the layer, each target's background channel and ROI volume (ml)."""

    case_id: str
    layer: str
    target_background: Mapping[str, str]
    roi_ml: Mapping[str, float]


def _ras_case(
    entries: Sequence[MapEntry],
    affine: np.ndarray,
    backgrounds: Mapping[str, np.ndarray],
    target_background: Mapping[str, str],
    rois: Mapping[str, np.ndarray | None],
    slice_at: str,
) -> _RasCase:
    """Reorient everything to RAS and place one slice position per target (all methods of a target are cut at the
    same place, so they compare)."""
    ras_bg = {name: RasVolume.from_array(arr, affine) for name, arr in backgrounds.items()}
    for t, ch in target_background.items():
        if ch not in ras_bg:
            raise MedcamDataError(f"background {ch!r} of target {t!r} is not among {sorted(ras_bg)}")
    windows = {name: foreground_window(arr) for name, arr in backgrounds.items()}
    ras_maps = [RasVolume.from_array(e.heatmap, affine).data for e in entries]
    ras_rois = {t: None if r is None else RasVolume.from_array(r, affine).data.astype(bool) for t, r in rois.items()}
    centres = {}
    for t in dict.fromkeys(e.target for e in entries):
        t_maps = [m for e, m in zip(entries, ras_maps) if e.target == t]
        bg_t = ras_bg[target_background[t]].data
        centres[t] = slice_centre(np.maximum.reduce(t_maps), ras_rois.get(t), slice_at, bg_t)
    return _RasCase(ras_bg, windows, ras_maps, ras_rois, centres, map_scale(ras_maps))


def _save_png(fig: Any, path: Path, dpi: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        fig.savefig(str(tmp), format="png", dpi=dpi, facecolor="white")


def _write_overlays(
    out_dir: Path,
    entries: Sequence[MapEntry],
    ras: _RasCase,
    labels: _Labels,
    *,
    shared_scale: bool,
    dpi: int,
) -> None:
    """One overlay PNG per entry, on the case's scale or (``shared_scale=False``) 0 .. the map's own maximum."""
    lo, hi = ras.scale
    for e, m in zip(entries, ras.maps):
        ch = labels.target_background[e.target]
        mmax = float(np.max(m))
        title = (
            f"{labels.case_id} | {e.method_label} | target {e.target} | layer {labels.layer} | map max {_fmt(mmax)}"
            f"{' (map is zero)' if mmax <= 0 else ''} | ROI {labels.roi_ml.get(e.target, float('nan')):.2f} ml"
            f" | background {ch}" + (" | shared scale" if shared_scale else "")
        )
        vmax = hi if shared_scale else (mmax if mmax > 0 else 1.0)
        bg, roi, centre = ras.backgrounds[ch], ras.rois.get(e.target), ras.centres[e.target]
        fig = _figure_on_ras(bg, m, roi, centre, ras.windows[ch], title, lo, vmax)
        _save_png(fig, out_dir / e.png, dpi)


def _write_montage(
    out_dir: Path,
    entries: Sequence[MapEntry],
    ras: _RasCase,
    labels: _Labels,
    *,
    cmap: str,
    dpi: int,
) -> str:
    """``montage.png`` (rows = targets, columns = methods, one colour scale); returns its relative path."""
    lo, hi = ras.scale
    rows = []
    for t in ras.centres:
        ch = labels.target_background[t]
        cells = {
            e.method: MontageCell(m, f"{e.method_label}\nmax {_fmt(float(np.max(m)))}")
            for e, m in zip(entries, ras.maps)
            if e.target == t
        }
        layer_t = OverlayLayer(ras.backgrounds[ch], None, ras.rois.get(t), ras.windows[ch])
        rows.append(
            MontageRow(layer_t, ras.centres[t], f"{t} ({labels.roi_ml.get(t, float('nan')):.1f} ml)\non {ch}", cells)
        )
    fig = montage_figure(
        rows,
        list(dict.fromkeys(e.method for e in entries)),
        title=f"{labels.case_id} | layer {labels.layer} | rows: targets, columns: methods (axial, coronal, sagittal) | "
        f"one scale 0..{_fmt(hi)} | ROI contour cyan",
        vmin=lo,
        vmax=hi,
        cmap=cmap,
        dpi=dpi,
    )
    _save_png(fig, out_dir / MONTAGE_NAME, dpi)
    return MONTAGE_NAME


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
) -> dict[str, Any]:
    """Write every overlay of ``entries`` and the montage into ``out_dir`` (files must not exist yet).

    Args:
        out_dir: the case folder (staging folder of the pipeline).
        entries: the maps (original grid) and their overlay paths.
        case_id: for titles and warnings.
        affine: 4x4 voxel -> RAS (mm) of the original grid.
        backgrounds: channel name -> ORIGINAL intensities [X, Y, Z] on that grid.
        target_background: target name -> channel name drawn behind it.
        rois: target name -> bool ROI [X, Y, Z] on the original grid (contoured; slice centre), or None.
        roi_ml: target name -> ROI volume in ml (for titles).
        layer: explained layer (for titles).
        shared_scale: one colour scale for the whole case (else per overlay).
        slice_at: "roi" (ROI centre of mass) or "max" (map maximum) for the slice positions.
        montage: also write ``montage.png`` (rows = targets, columns = methods).
        images: channel -> original file of every scan of the case (recorded for the HTML report).

    Returns:
        ``{"scale": [lo, hi] or None, "shared_scale", "slice_at", "montage": path or None, "background": {target:
        channel}, "images": {channel: file}, "centres_mm": {target: [x, y, z] RAS mm of the slices}}``.
    """
    if not entries:
        raise MedcamDataError("write_case_figures needs at least one map")
    ras = _ras_case(entries, affine, backgrounds, target_background, rois, slice_at)
    labels = _Labels(case_id, layer, target_background, roi_ml)
    _write_overlays(out_dir, entries, ras, labels, shared_scale=shared_scale, dpi=dpi)
    montage_rel = _write_montage(out_dir, entries, ras, labels, cmap=cmap, dpi=dpi) if montage else None
    lo, hi = ras.scale
    first_bg = next(iter(ras.backgrounds.values()))
    return {
        "scale": [lo, hi] if hi > 0 else None,
        "shared_scale": bool(shared_scale),
        "slice_at": slice_at,
        "montage": montage_rel,
        "background": dict(target_background),
        "images": {k: str(v) for k, v in (images or {}).items()},
        "centres_mm": {t: [round(float(v), 3) for v in first_bg.world(c)] for t, c in ras.centres.items()},
    }


def _figure_on_ras(
    bg: RasVolume,
    heat: np.ndarray,
    roi: np.ndarray | None,
    centre: tuple[int, int, int],
    window: tuple[float, float],
    title: str,
    vmin: float,
    vmax: float,
) -> Any:
    """Overlay figure of arrays already on the RAS grid of ``bg`` (its affine makes the reorientation a no-op)."""
    return overlay_figure(
        bg.data,
        heat,
        roi,
        bg.affine,
        title=title,
        centre=centre,
        vmin=vmin,
        vmax=vmax,
        window=window,
    )


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
