"""PNG overlays: axial, coronal and sagittal slices through the ROI centre with the heatmap over the image.

Drawn with matplotlib's object API on an Agg canvas (no pyplot global state, works headless). Arrays are shown
with their first axis horizontal and the third axis vertical for coronal/sagittal views; for RAS-ordered arrays
(``case.image``) this gives the neurological convention (patient's right on the right of the picture is NOT applied:
left-right follows the array axis, labelled on the plot).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import ndimage

from medcam.data.loading import MedcamDataError
from medcam.io.atomic import atomic_write, check_output_path

from ..types import PathLike

logger = logging.getLogger(__name__)


def _np(a) -> np.ndarray:
    return np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a)


def roi_centre(heatmap: np.ndarray, roi_mask: np.ndarray | None = None) -> tuple[int, int, int]:
    """Voxel index (i, j, k) the slices go through: the ROI's centre of mass (rounded) if the ROI is not empty,
    else the heatmap's maximum."""
    if roi_mask is not None and np.any(roi_mask):
        c = ndimage.center_of_mass(roi_mask.astype(bool))
        idx = tuple(int(round(v)) for v in c)
        if roi_mask[idx]:
            return idx
        pts = np.argwhere(roi_mask)  # non-convex ROI: nearest ROI voxel to the centre of mass
        return tuple(int(v) for v in pts[np.argmin(((pts - np.array(c)) ** 2).sum(1))])
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(heatmap)), heatmap.shape))


def save_overlay_png(
    image: np.ndarray,
    heatmap: np.ndarray,
    roi_mask: np.ndarray | None,
    out_path: PathLike,
    *,
    title: str,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    centre: Sequence[int] | None = None,
    alpha: float = 0.5,
    cmap: str = "inferno",
    vmin: float | None = None,
    vmax: float | None = None,
    dpi: int = 100,
    overwrite: bool = False,
) -> Path:
    """Save a 3-panel PNG (axial, coronal, sagittal) of ``heatmap`` over ``image`` with the ROI contour.

    Args:
        image: [X, Y, Z] intensities (one channel).
        heatmap: [X, Y, Z] map on the same grid.
        roi_mask: [X, Y, Z] bool ROI (contoured in cyan), or None.
        out_path: destination ``.png``.
        title: figure title, e.g. "Seg-Grad-CAM | target WT | layer decoder.3".
        spacing: voxel size (mm) along X, Y, Z, for the pixel aspect ratio.
        centre: voxel index of the slices; default :func:`roi_centre`.
        alpha: heatmap opacity.
        cmap, vmin, vmax: heatmap colour map and range (default the map's min/max).
        overwrite: replace an existing file.

    Returns:
        The written path.

    Raises:
        OutputExistsError: exists and not ``overwrite``; MedcamDataError: shapes disagree or are not 3D.
    """
    out_path = check_output_path(out_path, overwrite)
    image, heatmap = _np(image).astype(np.float32), _np(heatmap).astype(np.float32)
    mask = None if roi_mask is None else _np(roi_mask).astype(bool)
    if image.ndim != 3 or heatmap.shape != image.shape or (mask is not None and mask.shape != image.shape):
        raise MedcamDataError(
            f"save_overlay_png needs 3D arrays of one shape: image {image.shape}, heatmap {heatmap.shape}"
            + (f", roi {mask.shape}" if mask is not None else "")
        )
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or min(sp) <= 0:
        raise MedcamDataError(f"spacing must be 3 positive numbers (mm), got {spacing!r}")
    c = tuple(int(v) for v in (centre if centre is not None else roi_centre(heatmap, mask)))
    hm_fin = heatmap[np.isfinite(heatmap)]
    lo = float(vmin) if vmin is not None else (float(hm_fin.min()) if hm_fin.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(hm_fin.max()) if hm_fin.size else 1.0)
    if hi <= lo:
        hi = lo + 1e-6
    nz = image[image != 0]
    ilo, ihi = np.percentile(nz, [0.5, 99.5]) if nz.size else (0.0, 1.0)

    # (name, 2D slice as [rows, cols], aspect = row spacing / col spacing, axis labels)
    views = [
        ("axial", lambda a: a[:, :, c[2]].T, sp[1] / sp[0], ("X", "Y"), f"k={c[2]}"),
        ("coronal", lambda a: a[:, c[1], :].T, sp[2] / sp[0], ("X", "Z"), f"j={c[1]}"),
        ("sagittal", lambda a: a[c[0], :, :].T, sp[2] / sp[1], ("Y", "Z"), f"i={c[0]}"),
    ]
    fig = Figure(figsize=(13, 4.8), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    im_h = None
    for ax, (name, cut, aspect, (xl, yl), where) in zip(axes, views):
        ax.imshow(cut(image), cmap="gray", vmin=ilo, vmax=ihi, origin="lower", aspect=aspect, interpolation="nearest")
        im_h = ax.imshow(
            cut(heatmap),
            cmap=cmap,
            vmin=lo,
            vmax=hi,
            alpha=alpha,
            origin="lower",
            aspect=aspect,
            interpolation="nearest",
        )
        if mask is not None and cut(mask).any():
            ax.contour(cut(mask).astype(float), levels=[0.5], colors="cyan", linewidths=1.0, origin="lower")
        ax.set_title(f"{name} ({where})")
        ax.set_xlabel(f"{xl} (voxels)")
        ax.set_ylabel(f"{yl} (voxels)")
    fig.colorbar(im_h, ax=list(axes), shrink=0.8, label="heatmap")
    fig.suptitle(title)
    with atomic_write(out_path, overwrite=overwrite) as tmp:
        fig.savefig(str(tmp), format="png", dpi=dpi)
    logger.info("saved overlay %s", out_path)
    return out_path
