"""The montage of a case as a figure for a paper: rows = targets, columns = methods (axial, coronal, sagittal each).

Laid out in inches (no grid of equal boxes): every view is as wide and high as its cropped field of view at one
mm-per-inch scale, captions sit in their own band above each cell, the row label in a band on the left, so nothing
overlaps and no canvas is left blank. One colour bar per method (its scale, shared by the targets of the method;
label "<method> (<unit>)"); a cell on its own scale (``--no-shared-scale``, or a map too faint for its method's
scale) gets its own colour bar under it. Written as vector PDF (and SVG on request) plus a 300-dpi PNG.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medcam.io.display import DEFAULT_CMAP, UNIT, Ramp
from medcam.io.overlays import OverlayLayer, _mappable, draw_views, foreground_box_mm

#: layout constants (inches)
_GAP_VIEW, _GAP_CELL, _GAP_ROW, _MARGIN = 0.03, 0.14, 0.1, 0.06
_LABEL_W, _CBAR_H, _CBAR_BAND = 0.3, 0.08, 0.5


@dataclass
class MontageCell:
    """One (target, method) cell: map on the RAS grid of its row's background, caption, slice centre (RAS voxel),
    colour scale (lo, hi) and whether that scale is the cell's own (then it gets its own colour bar)."""

    heatmap: np.ndarray
    label: str
    centre: tuple[int, int, int]
    scale: tuple[float, float]
    own_scale: bool = False
    method_label: str = ""


@dataclass
class MontageRow:
    """One target: background layer (scan, ROI, window, ROI colour), row label, cells per method key."""

    layer: OverlayLayer
    label: str
    cells: Mapping[str, MontageCell]


@dataclass
class MontageColumn:
    """One method: key, display name and its shared colour scale (lo, hi)."""

    key: str
    label: str
    scale: tuple[float, float]


def _view_sizes(row: MontageRow, inch_per_mm: float) -> tuple[list[tuple[float, float]], float]:
    """(width, height) in inches of the row's axial, coronal, sagittal views and the row's view height."""
    (x0, x1), (y0, y1), (z0, z1) = foreground_box_mm(row.layer.background)
    xr, yr, zr = x1 - x0, y1 - y0, z1 - z0
    sizes = [(xr * inch_per_mm, yr * inch_per_mm), (xr * inch_per_mm, zr * inch_per_mm)]
    sizes.append((yr * inch_per_mm, zr * inch_per_mm))
    return sizes, max(h for _, h in sizes)


@dataclass
class _Layout:
    """Positions (inches from the top-left corner) computed before drawing."""

    width: float
    height: float
    title_lines: list[str]
    cell_w: float
    row_top: list[float]
    row_h: list[float]
    has_row_bar: list[bool]
    bottom_bars: bool


def _ref_mm(rows: Sequence[MontageRow]) -> float:
    """The widest R-L extent (mm) of the rows' cropped fields of view (it is drawn ``view_inches`` wide)."""
    return max(hi - lo for lo, hi in (foreground_box_mm(r.layer.background)[0] for r in rows))


def _layout(
    rows: Sequence[MontageRow], columns: Sequence[MontageColumn], title: str, view_in: float, fs: float
) -> _Layout:
    inch_per_mm = view_in / _ref_mm(rows)
    sizes = [_view_sizes(r, inch_per_mm) for r in rows]
    cell_w = max(sum(w for w, _ in s) + 2 * _GAP_VIEW for s, _ in sizes)
    width = 2 * _MARGIN + _LABEL_W + len(columns) * cell_w + (len(columns) - 1) * _GAP_CELL
    line_h = fs * 1.35 / 72
    title_lines = textwrap.wrap(title, max(20, int(width * 72 / (fs * 0.6))))
    y = _MARGIN + len(title_lines) * line_h * 1.1 + 0.04
    tops, heights, bars = [], [], []
    for r, (_, h) in zip(rows, sizes):
        cap = max(c.label.count("\n") + 1 for c in r.cells.values()) * line_h * 1.1
        own = any(c.own_scale for c in r.cells.values())
        tops.append(y + cap)
        heights.append(h)
        bars.append(own)
        y += cap + h + (_CBAR_BAND if own else 0.0) + _GAP_ROW
    bottom = any(not c.own_scale for r in rows for c in r.cells.values())
    height = y + (_CBAR_BAND if bottom else 0.0) + _MARGIN
    return _Layout(width, height, title_lines, cell_w, tops, heights, bars, bottom)


def _axes(fig: Figure, lay: _Layout, x: float, y: float, w: float, h: float) -> Any:
    return fig.add_axes((x / lay.width, 1 - (y + h) / lay.height, w / lay.width, h / lay.height))


def _colour_bar(
    fig: Figure, lay: _Layout, x: float, y: float, w: float, scale: tuple[float, float], label: str, st: dict
) -> None:
    cax = _axes(fig, lay, x + 0.1 * w, y, 0.8 * w, _CBAR_H)
    cb = fig.colorbar(_mappable(scale[0], scale[1], st["cmap"], st["ramp"]), cax=cax, orientation="horizontal")
    cb.ax.tick_params(labelsize=st["fs"] - 1, length=2, pad=1)
    cb.set_label(label, fontsize=st["fs"] - 0.5, labelpad=1)


def _draw_cell(fig: Figure, lay: _Layout, r: int, row: MontageRow, cell: MontageCell, x: float, st: dict) -> None:
    sizes, h = _view_sizes(row, st["view_in"] / st["ref_mm"])
    x0 = x + (lay.cell_w - sum(w for w, _ in sizes) - 2 * _GAP_VIEW) / 2
    axes = []
    for w, vh in sizes:
        axes.append(_axes(fig, lay, x0, lay.row_top[r] + (h - vh) / 2, w, vh))
        x0 += w + _GAP_VIEW
    layer = OverlayLayer(row.layer.background, cell.heatmap, row.layer.roi, row.layer.window, row.layer.roi_color)
    draw_views(
        axes, layer, cell.centre, vmin=cell.scale[0], vmax=cell.scale[1], cmap=st["cmap"], ramp=st["ramp"],
        mm_axes=False, fontsize=st["fs"],
    )  # fmt: skip
    for ax in axes:
        ax.set_aspect("auto")
    top, bottom = lay.row_top[r], lay.row_top[r] + h
    st["panels"].append((x / lay.width, top / lay.height, (x + lay.cell_w) / lay.width, bottom / lay.height))
    cap_y = lay.row_top[r] - 0.03
    fig.text(x / lay.width + lay.cell_w / 2 / lay.width, 1 - cap_y / lay.height, cell.label, ha="center",
             va="bottom", fontsize=st["fs"], linespacing=1.1)  # fmt: skip
    if cell.own_scale:
        y = lay.row_top[r] + lay.row_h[r] + 0.06
        _colour_bar(fig, lay, x, y, lay.cell_w, cell.scale, f"{cell.method_label}, own scale ({UNIT})", st)


def montage_figure(
    rows: Sequence[MontageRow],
    columns: Sequence[MontageColumn],
    *,
    title: str,
    cmap: str = DEFAULT_CMAP,
    ramp: Ramp | None = None,
    view_inches: float = 1.15,
    fontsize: float = 7.0,
) -> Figure:
    """The montage figure (see the module docstring); ``view_inches``: width of an axial view in inches.

    The figure's ``medcam_panels`` maps (row index, method key) to the box (left, top, right, bottom) of that cell's
    three views, as fractions of the figure (origin top-left), e.g. to crop one panel out of the saved image."""
    ref_mm = _ref_mm(rows)
    lay = _layout(rows, columns, title, view_inches, fontsize)
    panels: dict[tuple[int, str], tuple[float, float, float, float]] = {}
    fig = Figure(figsize=(lay.width, lay.height))
    FigureCanvasAgg(fig)
    st: dict[str, Any] = {"cmap": cmap, "ramp": ramp or Ramp(), "fs": fontsize, "view_in": view_inches}
    st["ref_mm"] = ref_mm
    fig.text(0.5, 1 - _MARGIN / lay.height, "\n".join(lay.title_lines), ha="center", va="top", fontsize=fontsize + 1)
    for r, row in enumerate(rows):
        fig.text(
            (_MARGIN + _LABEL_W / 2) / lay.width, 1 - (lay.row_top[r] + lay.row_h[r] / 2) / lay.height, row.label,
            rotation=90, ha="center", va="center", fontsize=fontsize, fontweight="bold", linespacing=1.1,
        )  # fmt: skip
        for c, col in enumerate(columns):
            cell = row.cells.get(col.key)
            if cell is not None:
                st["panels"] = []
                _draw_cell(fig, lay, r, row, cell, _MARGIN + _LABEL_W + c * (lay.cell_w + _GAP_CELL), st)
                panels[(r, col.key)] = st["panels"][0]
    if lay.bottom_bars:
        y = lay.height - _MARGIN - _CBAR_BAND + 0.08
        for c, col in enumerate(columns):
            x = _MARGIN + _LABEL_W + c * (lay.cell_w + _GAP_CELL)
            _colour_bar(fig, lay, x, y, lay.cell_w, col.scale, f"{col.label} ({UNIT})", st)
    fig.medcam_panels = panels  # type: ignore[attr-defined]
    return fig
