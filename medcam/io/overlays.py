"""PNG overlays a radiologist reads at a glance: heatmaps over the ORIGINAL scan, in mm, radiological convention.

Geometry. A volume on its original grid (array + 4x4 voxel -> RAS mm affine, as nibabel/MONAI load it) is brought
to RAS axis order by permuting and flipping its voxel axes only (nibabel ``io_orientation``; no resampling, so every
pixel is a voxel of the file). Each view is then drawn with world coordinates (mm) on its axes and the patient's
right on the viewer's LEFT (radiological convention), anterior up in axial views, superior up in coronal and sagittal
views, anterior on the left in sagittal views; orientation letters (R/L/A/P/S/I) sit on the four sides of every
view. For an oblique grid the views are the voxel planes closest to the anatomical planes and the letters/axes name
the nearest anatomical direction (the obliquity is stated in the view's label).

Pictures. The background is the ORIGINAL intensities windowed on the 1st-99th percentile of the foreground
(non-zero voxels: the brain of a skull-stripped scan); the heatmap is drawn with a colour map whose zero is
transparent and a colour bar in map units; the ROI is contoured. Slices go through the ROI's centre of mass (or the
map's maximum). An all-zero map is drawn as such, with a visible "map is zero" note.

Drawn with matplotlib's object API on an Agg canvas (no pyplot global state, works headless).
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap, ListedColormap
from matplotlib.figure import Figure
from scipy import ndimage

from medcam.data.loading import MedcamDataError
from medcam.io.atomic import atomic_write, check_output_path
from medcam.io.display import DEFAULT_CMAP, UNIT, Ramp, heat_lut, lesion_window

from ..types import PathLike

logger = logging.getLogger(__name__)

VIEWS = ("axial", "coronal", "sagittal")
#: (left, right, top, bottom) letters of each view in radiological convention
VIEW_LETTERS: dict[str, tuple[str, str, str, str]] = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}
#: RAS axis held fixed by each view, and its name
_VIEW_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
_AXIS_NAME = ("x (R+)", "y (A+)", "z (S+)")
ZERO_NOTE = "map is zero"


def _np(a: Any) -> np.ndarray:
    return np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a)


# ---------------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class RasVolume:
    """A volume whose voxel axes are in RAS order (axis 0 towards the patient's Right, 1 Anterior, 2 Superior).

    Attributes:
        data: [X, Y, Z] array (a view of the original voxels, permuted/flipped, never resampled).
        affine: 4x4 voxel -> RAS (mm) of ``data``.
        oblique: largest angle (degrees) between a voxel axis and its anatomical axis (0 for a non-oblique grid).
    """

    data: np.ndarray
    affine: np.ndarray
    oblique: float = 0.0

    @classmethod
    def from_array(cls, array: Any, affine: Any) -> RasVolume:
        """Reorient ``array`` [X, Y, Z] with voxel -> RAS ``affine`` (any axis order/signs) to RAS voxel order."""
        arr = _np(array)
        aff = np.asarray(_np(affine), dtype=float)
        if arr.ndim != 3 or aff.shape != (4, 4):
            raise MedcamDataError(f"need a 3D array and a 4x4 affine, got shapes {arr.shape} and {aff.shape}")
        ornt = nib.orientations.io_orientation(aff)
        to_ras = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt("RAS"))
        data = nib.orientations.apply_orientation(arr, to_ras)
        new_aff = aff @ nib.orientations.inv_ornt_aff(to_ras, arr.shape)
        cols = new_aff[:3, :3] / np.linalg.norm(new_aff[:3, :3], axis=0)
        oblique = float(np.degrees(np.arccos(np.clip(np.diag(cols).min(), -1.0, 1.0))))
        return cls(np.ascontiguousarray(data), new_aff, oblique)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along x, y, z."""
        sx, sy, sz = (float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))
        return sx, sy, sz

    def axis_mm(self, axis: int) -> np.ndarray:
        """World coordinate (mm, RAS) of the voxel centres along ``axis`` (the dominant component; exact when the
        grid is not oblique)."""
        n = self.data.shape[axis]
        return self.affine[axis, 3] + self.affine[axis, axis] * np.arange(n)

    def world(self, index: Sequence[float]) -> np.ndarray:
        """RAS mm of voxel ``index`` (i, j, k) of :attr:`data`."""
        return (self.affine @ np.r_[np.asarray(index, float), 1.0])[:3]


@dataclass(frozen=True)
class Plane:
    """One view as it is displayed.

    Attributes:
        view: "axial", "coronal" or "sagittal".
        image: 2D array as displayed: row 0 at the top, column 0 on the viewer's left.
        extent: (left, right, bottom, top) in mm for matplotlib's ``imshow(..., origin="upper")``; left > right
            because the patient's right (larger x, or anterior in sagittal views) is on the viewer's left.
        position_mm: world coordinate of the slice along the view's axis.
        axes_names: names of the horizontal and vertical axes.
    """

    view: str
    image: np.ndarray
    extent: tuple[float, float, float, float]
    position_mm: float
    axes_names: tuple[str, str]


def plane(vol: RasVolume, view: str, index: int, data: np.ndarray | None = None) -> Plane:
    """The slice of ``vol`` (or of ``data``, an array on the same RAS grid) through voxel ``index`` along the view's
    axis, oriented for display in radiological convention.

    The two in-plane RAS axes (h, v) are both shown with their positive direction to the viewer's left / top:
    ``image = slice[::-1, ::-1].T`` so ``image[r, c] = slice[n_h - 1 - c, n_v - 1 - r]``.
    """
    if view not in _VIEW_AXIS:
        raise MedcamDataError(f"view must be one of {VIEWS}, got {view!r}")
    arr = vol.data if data is None else data
    ax = _VIEW_AXIS[view]
    idx = int(np.clip(index, 0, arr.shape[ax] - 1))
    s = np.take(arr, idx, axis=ax)  # [n_h, n_v], h < v are the remaining RAS axes
    h, v = [a for a in range(3) if a != ax]
    img = s[::-1, ::-1].T
    hm, vm = vol.axis_mm(h), vol.axis_mm(v)
    dh, dv = abs(vol.affine[h, h]) / 2, abs(vol.affine[v, v]) / 2
    extent = (float(hm[-1] + dh), float(hm[0] - dh), float(vm[0] - dv), float(vm[-1] + dv))
    return Plane(view, img, extent, float(vol.axis_mm(ax)[idx]), (_AXIS_NAME[h], _AXIS_NAME[v]))


def _ijk(values: Iterable[Any]) -> tuple[int, int, int]:
    """A 3D voxel index (i, j, k) as Python ints."""
    i, j, k = (int(v) for v in values)
    return i, j, k


def roi_centre(heatmap: np.ndarray, roi_mask: np.ndarray | None = None) -> tuple[int, int, int]:
    """Voxel index (i, j, k) the slices go through: the ROI's centre of mass (rounded; the nearest ROI voxel if the
    ROI is not convex) if the ROI is not empty, else the heatmap's maximum."""
    if roi_mask is not None and np.any(roi_mask):
        c = ndimage.center_of_mass(np.asarray(roi_mask).astype(bool))
        idx = _ijk(round(v) for v in c)
        if roi_mask[idx]:
            return idx
        pts = np.argwhere(roi_mask)  # non-convex ROI: nearest ROI voxel to the centre of mass
        return _ijk(pts[np.argmin(((pts - np.array(c)) ** 2).sum(1))])
    return _ijk(np.unravel_index(int(np.argmax(heatmap)), heatmap.shape))


def slice_centre(
    heatmap: np.ndarray, roi_mask: np.ndarray | None, at: str = "roi", background: np.ndarray | None = None
) -> tuple[int, int, int]:
    """``at="roi"``: :func:`roi_centre`; ``at="max"``: the map's maximum (the ROI centre if the map is zero).

    With an empty ROI and an all-zero map there is nothing to aim at: the centre of mass of ``background``'s
    non-zero voxels (the brain), else the middle of the grid."""
    if at not in ("roi", "max"):
        raise MedcamDataError(f"slice position must be 'roi' or 'max', got {at!r}")
    if at == "max" and np.max(heatmap) > 0:
        return _ijk(np.unravel_index(int(np.argmax(heatmap)), heatmap.shape))
    if np.max(heatmap) <= 0 and (roi_mask is None or not np.any(roi_mask)):
        fg = None if background is None else np.asarray(background) != 0
        if fg is not None and fg.any():
            return _ijk(round(v) for v in ndimage.center_of_mass(fg))
        return _ijk(int(n) // 2 for n in np.shape(heatmap))
    return roi_centre(heatmap, roi_mask)


def foreground_window(image: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.0)) -> tuple[float, float]:
    """Grey window (lo, hi): the given percentiles of the foreground (non-zero voxels; all voxels if none). The
    pictures of a case use :func:`medcam.io.display.lesion_window`, which also keeps the target's lesion readable."""
    return lesion_window(_np(image), None, brain=percentiles)


def foreground_box_mm(vol: RasVolume, margin_mm: float = 6.0) -> list[tuple[float, float]]:
    """Per RAS axis, the (low, high) world coordinates (mm) of the scan's non-zero voxels, widened by
    ``margin_mm`` and clipped to the field of view (the whole field of view for an all-zero scan)."""
    nz = np.nonzero(vol.data)
    out = []
    for a in range(3):
        mm = vol.axis_mm(a)
        half = abs(vol.affine[a, a]) / 2
        fov = (float(mm[0] - half), float(mm[-1] + half))
        if nz[0].size == 0:
            out.append(fov)
            continue
        lo, hi = float(mm[nz[a].min()] - half - margin_mm), float(mm[nz[a].max()] + half + margin_mm)
        out.append((max(lo, fov[0]), min(hi, fov[1])))
    return out


def heat_cmap(name: str = DEFAULT_CMAP, ramp: Ramp | None = None) -> Colormap:
    """The heatmap colour map of the display spec (:func:`medcam.io.display.heat_lut`): transparent below the
    ramp's threshold, opacity rising linearly to full at ``ramp.full_at`` of the scale; masked voxels transparent."""
    return ListedColormap(heat_lut(name, ramp), name=f"{name}_ramp").with_extremes(bad=(0.0, 0.0, 0.0, 0.0))


# ---------------------------------------------------------------------------------------------------- drawing
@dataclass
class OverlayLayer:
    """What one group of three views shows: background, map and ROI on one RAS grid.

    Attributes:
        background: the scan (original intensities) as a :class:`RasVolume`.
        heatmap: [X, Y, Z] map on the same RAS grid, or None (background only).
        roi: [X, Y, Z] bool ROI on the same grid, or None.
        window: grey window (lo, hi) of the background.
        roi_color: colour of the ROI contour (the predicted region's segment colour of the display spec).
    """

    background: RasVolume
    heatmap: np.ndarray | None
    roi: np.ndarray | None
    window: tuple[float, float]
    roi_color: Any = "cyan"


def _letters(ax: Any, view: str, fontsize: float) -> None:
    left, right, top, bottom = VIEW_LETTERS[view]
    style = {
        "color": "white",
        "fontsize": fontsize,
        "fontweight": "bold",
        "transform": ax.transAxes,
        "path_effects": [patheffects.withStroke(linewidth=2, foreground="black")],
    }
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)


def draw_views(
    axes: Iterable[Any],
    layer: OverlayLayer,
    centre: Sequence[int],
    *,
    vmin: float,
    vmax: float,
    cmap: str = DEFAULT_CMAP,
    ramp: Ramp | None = None,
    mm_axes: bool = True,
    fontsize: float = 9.0,
    margin_mm: float = 6.0,
) -> Any:
    """Draw axial, coronal, sagittal views of ``layer`` through RAS voxel ``centre`` on three matplotlib axes.

    Args:
        axes: three axes (axial, coronal, sagittal).
        layer: background, map and ROI on one RAS grid.
        centre: voxel index (i, j, k) on the RAS grid.
        vmin, vmax: the colour scale of the map (map units); voxels <= 0 are transparent.
        cmap, ramp: colour map and threshold/opacity ramp (:class:`medcam.io.display.Ramp`).
        mm_axes: label the axes in mm (world coordinates); else no ticks, the slice position inside the view.
        margin_mm: the views are cropped to the scan's foreground (non-zero voxels) plus this margin.

    Returns:
        The last heatmap image (for a colour bar), or None when nothing was drawn.
    """
    vol, r = layer.background, ramp or Ramp()
    cm = heat_cmap(cmap, r)
    box = foreground_box_mm(vol, margin_mm=margin_mm)
    zero = layer.heatmap is not None and not np.any(layer.heatmap > 0)
    im_h = None
    for ax, view in zip(axes, VIEWS):
        ci = centre[_VIEW_AXIS[view]]
        bg = plane(vol, view, ci)
        ax.imshow(bg.image, cmap="gray", vmin=layer.window[0], vmax=layer.window[1], extent=bg.extent, origin="upper")
        if layer.heatmap is not None and not zero:
            hm = plane(vol, view, ci, layer.heatmap).image
            im_h = ax.imshow(
                np.ma.masked_where(~(hm > 0), hm),
                cmap=cm,
                vmin=vmin,
                vmax=vmax,
                alpha=r.opacity,
                extent=bg.extent,
                origin="upper",
                interpolation="nearest",
            )
        if layer.roi is not None:
            roi = plane(vol, view, ci, layer.roi.astype(np.float32)).image
            if roi.any():
                ax.contour(
                    roi, levels=[0.5], colors=[layer.roi_color], linewidths=0.8, extent=bg.extent, origin="upper"
                )
        if zero:
            _zero_note(ax, fontsize)
        _letters(ax, view, fontsize)
        _frame_view(ax, view, bg, vol, box, mm_axes=mm_axes, fontsize=fontsize)
    return im_h


def _zero_note(ax: Any, fontsize: float) -> None:
    """The red "map is zero" note in the middle of a view whose map has no positive voxel (clear of the
    orientation letters at the edges)."""
    ax.text(
        0.5,
        0.5,
        ZERO_NOTE,
        transform=ax.transAxes,
        ha="center",
        va="center",
        color="red",
        fontsize=fontsize,
        fontweight="bold",
        bbox={"facecolor": "black", "alpha": 0.6, "edgecolor": "red", "pad": 1.5},
    )


def _frame_view(
    ax: Any,
    view: str,
    bg: Plane,
    vol: RasVolume,
    box: Sequence[tuple[float, float]],
    *,
    mm_axes: bool,
    fontsize: float,
) -> None:
    """Crop a view to the foreground box (radiological: patient's right on the left) and title/label it."""
    h_ax, v_ax = [a for a in range(3) if a != _VIEW_AXIS[view]]
    ax.set_xlim(box[h_ax][1], box[h_ax][0])  # descending: patient's right (or anterior) on the left
    ax.set_ylim(box[v_ax][0], box[v_ax][1])
    ax.set_facecolor("black")
    where = f"{view} {'xyz'[_VIEW_AXIS[view]]} = {bg.position_mm:.1f} mm"
    if vol.oblique > 0.5:
        where += f" (grid oblique {vol.oblique:.0f} deg)"
    if mm_axes:
        ax.set_title(where, fontsize=fontsize)
        ax.set_xlabel(f"{bg.axes_names[0]} mm", fontsize=fontsize - 1)
        ax.set_ylabel(f"{bg.axes_names[1]} mm", fontsize=fontsize - 1)
        ax.tick_params(labelsize=fontsize - 2)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(
            0.03,
            0.97,
            f"{'xyz'[_VIEW_AXIS[view]]} {bg.position_mm:.0f}",
            transform=ax.transAxes,
            ha="left",
            va="top",
            color="white",
            fontsize=fontsize - 1.5,
            path_effects=[patheffects.withStroke(linewidth=1.5, foreground="black")],
        )


def _colorbar(
    fig: Figure, im_h: Any, axes: Any, vmin: float, vmax: float, cmap: str, label: str, ramp: Ramp | None = None
) -> None:
    if im_h is None:  # no map drawn (all zero): still show the scale the figure uses
        im_h = _mappable(vmin, vmax, cmap, ramp)
    fig.colorbar(im_h, ax=axes, shrink=0.8, label=label, pad=0.02)


def _mappable(vmin: float, vmax: float, cmap: str, ramp: Ramp | None) -> Any:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    return ScalarMappable(norm=Normalize(vmin, vmax), cmap=heat_cmap(cmap, ramp))


def map_scale(maps: Sequence[np.ndarray]) -> tuple[float, float]:
    """Colour scale (0, max) shared by ``maps``; (0, 1) if they are all zero (nothing is drawn then)."""
    hi = max((float(np.max(m)) for m in maps if np.size(m)), default=0.0)
    return 0.0, (hi if hi > 0 else 1.0)


def save_overlay_png(
    image: np.ndarray,
    heatmap: np.ndarray,
    roi_mask: np.ndarray | None,
    out_path: PathLike,
    *,
    title: str,
    affine: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    centre: Sequence[int] | None = None,
    slice_at: str = "roi",
    alpha: float | None = None,
    cmap: str = DEFAULT_CMAP,
    vmin: float | None = None,
    vmax: float | None = None,
    window: tuple[float, float] | None = None,
    colorbar_label: str = f"map value ({UNIT})",
    dpi: int = 100,
    overwrite: bool = False,
    ramp: Ramp | None = None,
    roi_color: Any = "cyan",
) -> Path:
    """Save a 3-panel PNG (axial, coronal, sagittal) of ``heatmap`` over ``image`` with the ROI contour.

    Args:
        image: [X, Y, Z] intensities (one channel; original values are best: the window is the 1st-99th percentile
            of its non-zero voxels unless ``window`` is given).
        heatmap: [X, Y, Z] map on the same grid (map units; voxels <= 0 are transparent).
        roi_mask: [X, Y, Z] bool ROI (contoured in cyan), or None.
        out_path: destination ``.png``.
        title: figure title, e.g. "Seg-Grad-CAM | target WT | layer decoder.3 | map max 3.1 | ROI 12.5 ml".
        affine: 4x4 voxel -> RAS (mm) of the grid (from the NIfTI file); default ``diag(spacing)`` (RAS voxel
            order assumed).
        spacing: voxel size (mm), used only without ``affine``.
        centre: voxel index (of the given arrays) of the slices; default from ``slice_at``.
        slice_at: "roi" (the ROI's centre of mass) or "max" (the map's maximum).
        alpha, ramp: heatmap opacity (overrides ``ramp.opacity``), threshold/opacity ramp (:class:`~.display.Ramp`).
        cmap, vmin, vmax, roi_color: colour map and scale (default 0 .. the map's max), ROI contour colour.
        overwrite: replace an existing file.

    Returns the written path. Raises OutputExistsError (exists and not ``overwrite``), MedcamDataError (shapes
    disagree or are not 3D).
    """
    out_path = check_output_path(out_path, overwrite)
    image, heatmap = _np(image).astype(np.float32), _np(heatmap).astype(np.float32)
    mask = None if roi_mask is None else _np(roi_mask).astype(bool)
    if image.ndim != 3 or heatmap.shape != image.shape or (mask is not None and mask.shape != image.shape):
        raise MedcamDataError(
            f"save_overlay_png needs 3D arrays of one shape: image {image.shape}, heatmap {heatmap.shape}"
            + (f", roi {mask.shape}" if mask is not None else "")
        )
    if affine is None:
        sp = tuple(float(s) for s in spacing)
        if len(sp) != 3 or min(sp) <= 0:
            raise MedcamDataError(f"spacing must be 3 positive numbers (mm), got {spacing!r}")
        affine = np.diag([*sp, 1.0])
    fig = overlay_figure(
        image,
        heatmap,
        mask,
        affine,
        title=title,
        centre=centre,
        slice_at=slice_at,
        alpha=alpha,
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        window=window,
        colorbar_label=colorbar_label,
        dpi=dpi,
        ramp=ramp,
        roi_color=roi_color,
    )
    with atomic_write(out_path, overwrite=overwrite) as tmp:
        fig.savefig(str(tmp), format="png", dpi=dpi, facecolor="white")
    logger.info("saved overlay %s", out_path)
    return out_path


def overlay_figure(
    image: np.ndarray,
    heatmap: np.ndarray,
    roi_mask: np.ndarray | None,
    affine: np.ndarray,
    *,
    title: str,
    centre: Sequence[int] | None = None,
    slice_at: str = "roi",
    alpha: float | None = None,
    cmap: str = DEFAULT_CMAP,
    vmin: float | None = None,
    vmax: float | None = None,
    window: tuple[float, float] | None = None,
    colorbar_label: str = f"map value ({UNIT})",
    dpi: int = 100,
    ramp: Ramp | None = None,
    roi_color: Any = "cyan",
) -> Figure:
    """The figure :func:`save_overlay_png` writes (arrays on the grid of ``affine``, any orientation)."""
    bg = RasVolume.from_array(image, affine)
    ras = RasVolume.from_array
    hm = ras(heatmap, affine).data
    roi = None if roi_mask is None else ras(roi_mask, affine).data
    if centre is None:
        c = slice_centre(hm, roi, slice_at, bg.data)
    else:  # a voxel index of the given arrays -> RAS grid index
        c = _ijk(np.argwhere(ras(_index_volume(np.shape(image), centre), affine).data)[0])
    lo, hi = map_scale([hm])
    lo = lo if vmin is None else float(vmin)
    hi = hi if vmax is None else float(vmax)
    if hi <= lo:
        hi = lo + 1.0
    r = ramp or Ramp()
    r = r if alpha is None else Ramp(r.threshold, r.full_at, float(alpha))
    fig = Figure(figsize=(13, 4.5), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    layer = OverlayLayer(bg, hm, roi, window or foreground_window(image), roi_color)
    im_h = draw_views(axes, layer, c, vmin=lo, vmax=hi, cmap=cmap, ramp=r)
    _colorbar(fig, im_h, list(axes), lo, hi, cmap, colorbar_label, r)
    fig.suptitle("\n".join(textwrap.wrap(title, 150)), fontsize=10)
    return fig


def _index_volume(shape: Sequence[int], index: Sequence[int]) -> np.ndarray:
    v = np.zeros(tuple(shape), dtype=np.uint8)
    v[tuple(int(i) for i in index)] = 1
    return v
