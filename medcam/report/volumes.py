"""Volumes of a case folder, packed for the HTML report: gzip'd NIfTI bytes, uint8-quantised, base64 in a .js file.

Chromium blocks ``fetch``/XHR of ``file://`` URLs, so the report cannot load ``.nii.gz`` files next to the page; each
case's volumes are embedded in ``report/data/<case>.js`` (loaded by a classic ``<script>``, which file:// allows).
To keep that small:

* every volume is quantised to uint8 with its scale stored in the NIfTI header (``scl_slope``/``scl_inter``), so
  the viewer shows values in the original units: maps ``q = round(255 * v / max)`` (max = the map's maximum, step
  max/255 map units; zero stays exactly zero), scans ``q = round(255 * clip(v, 0, p99.9) / p99.9)`` over the
  foreground (values above the 99.9th percentile are clipped; the window shown is the 1st-99th percentile);
* a volume with more than ``max_voxels`` voxels is subsampled by the smallest integer stride that fits (every
  s-th voxel, affine scaled accordingly; BraTS' 240 x 240 x 155 = 8.9 M voxels is kept at full resolution with the
  default 10 M); maps are also subsampled down to the model's working grid (:func:`map_stride`: stride 2 for the
  demo's 2 mm grid on 1 mm scans), which they carry no finer detail than;
* every predicted region is its own 0/1 label volume (:func:`pack_region`), drawn as its own outline layer in its
  segment colour, so nested regions (BraTS ET inside TC inside WT) never overwrite each other;
* each scan and map lives in its own ``data/<case>/<key>.js`` file that the viewer loads when it is first shown
  (:func:`volume_js`), so a case page is ready after one scan and one map.
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ..errors import MedcamError

DEFAULT_MAX_VOXELS = 10_000_000


@dataclass
class PackedVolume:
    """One embedded volume: name, base64 of the gzip'd uint8 NIfTI, display range and what it holds."""

    name: str
    b64: str
    cal_min: float
    cal_max: float
    info: dict[str, Any]

    def js(self) -> dict[str, Any]:
        return {"name": self.name, "b64": self.b64, "cal_min": self.cal_min, "cal_max": self.cal_max, **self.info}


def _stride(shape: Sequence[int], max_voxels: int) -> int:
    s = 1
    while int(np.prod([-(-n // s) for n in shape])) > max_voxels:
        s += 1
    return s


def _nifti_b64(q: np.ndarray, affine: np.ndarray, slope: float, inter: float, label: bool = False) -> str:
    img = nib.Nifti1Image(np.ascontiguousarray(q.astype(np.uint8)), affine)
    if label:
        img.header.set_intent("label")  # NiiVue draws NIFTI_INTENT_LABEL volumes as atlases (outlines)
    img.header.set_slope_inter(slope, inter)
    img.header.set_xyzt_units("mm")
    return base64.b64encode(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)).decode("ascii")


def _sub(arr: np.ndarray, affine: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray]:
    if stride == 1:
        return arr, affine
    return arr[::stride, ::stride, ::stride], affine @ np.diag([stride, stride, stride, 1.0])


def pack_map(
    name: str,
    arr: np.ndarray,
    affine: np.ndarray,
    *,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    min_stride: int = 1,
    **info: Any,
):
    """A heatmap [X, Y, Z] (map units, >= 0) as uint8 with ``scl_slope = max / 255``.

    ``min_stride``: subsample at least this much (a map computed on a coarser working grid and interpolated onto the
    original grid carries no detail finer than that grid: :func:`map_stride`)."""
    stride = max(_stride(arr.shape, max_voxels), int(min_stride))
    full = np.asarray(arr, np.float32)
    hi = float(np.max(full)) if full.size else 0.0  # the map's maximum on the original grid, before subsampling
    a, aff = _sub(full, affine, stride)
    if hi > 0:
        q, slope = np.rint(np.clip(a, 0, None) / hi * 255.0), hi / 255.0
    else:
        q, slope = np.zeros(a.shape), 1.0
    info = {**info, "max": hi, "step": slope, "stride": stride}
    return PackedVolume(name, _nifti_b64(q, aff, slope, 0.0), 0.0, hi, info)


def map_stride(original_spacing: Sequence[float], working_spacing: Sequence[float] | None) -> int:
    """Largest integer stride not finer than the model's working grid: ``floor(min(working / original))``, >= 1."""
    if not working_spacing:
        return 1
    ratio = min(float(w) / float(o) for w, o in zip(working_spacing, original_spacing))
    return max(1, int(np.floor(ratio + 1e-6)))


def pack_scan(name: str, arr: np.ndarray, affine: np.ndarray, *, max_voxels: int = DEFAULT_MAX_VOXELS):
    """A scan [X, Y, Z] as uint8 over 0..p99.9 of its foreground; display window = 1st-99th percentile."""
    stride = _stride(arr.shape, max_voxels)
    a, aff = _sub(np.asarray(arr, np.float32), affine, stride)
    fg = a[a != 0]
    if fg.size == 0:
        fg = a.ravel()
    lo1, hi99, top = (float(v) for v in np.percentile(fg, [1, 99, 99.9]))
    base = min(0.0, float(fg.min()))
    top = top if top > base else base + 1.0
    slope = (top - base) / 255.0
    q = np.rint((np.clip(a, base, top) - base) / slope)
    return PackedVolume(name, _nifti_b64(q, aff, slope, base), lo1, hi99 if hi99 > lo1 else lo1 + 1, {"stride": stride})


def pack_region(
    mask: np.ndarray,
    name: str,
    color: Sequence[float],
    affine: np.ndarray,
    *,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    min_stride: int = 1,
):
    """One predicted region [X, Y, Z] as a 0/1 uint8 label volume (NIfTI label intent: NiiVue draws it as an
    outline), with its segment colour (RGB 0..1, the display spec's). ``min_stride``: as :func:`pack_map` (a region
    predicted on the model's working grid carries no finer detail)."""
    m = (np.asarray(mask) > 0).astype(np.uint8)
    q, aff = _sub(m, affine, max(_stride(m.shape, max_voxels), int(min_stride)))
    info = {"label": str(name), "color": [float(c) for c in color]}
    return PackedVolume(f"{name}.nii.gz", _nifti_b64(q, aff, 1.0, 0.0, label=True), 0.0, 1.0, info)


def volume_js(key: str, entry: dict[str, Any]) -> str:
    """The text of ``data/<case>/<key>.js``: ``window.MEDCAM_VOLUME("<key>", {...});`` (loaded on demand by a
    ``<script>`` tag, which file:// pages allow)."""
    return f"window.MEDCAM_VOLUME({json.dumps(key)}, " + json.dumps(entry, separators=(",", ":")) + ");\n"


def case_js(payload: dict[str, Any]) -> str:
    """The ``report/data/<case>.js`` text: ``window.MEDCAM_CASE = {...};``."""
    return "window.MEDCAM_CASE = " + json.dumps(payload, separators=(",", ":")) + ";\n"


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(float32 data [X, Y, Z] with scaling applied, 4x4 affine) of a NIfTI file."""
    img = nib.load(str(path))
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise MedcamError(f"{path}: not a NIfTI image ({type(img).__name__})")
    return np.asarray(img.get_fdata(dtype=np.float32)), np.asarray(img.affine, float)
