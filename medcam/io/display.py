"""One display spec per case: the numbers every picture of the case is drawn with.

Computed once (:func:`build_display_spec`), stored in ``summary.json`` (``figures.display``) and read by every
renderer: the PNG overlays and the montage (:mod:`medcam.io.case_figures`), the HTML viewer (:mod:`medcam.report`)
and the 3D Slicer scene (:mod:`medcam.io.slicer`). It holds

* ``cmap`` and ``lut``: the heatmap colour map as 256 RGBA entries (0..1) with the threshold/opacity ramp built in
  (``ramp``: transparent below ``threshold`` x scale, opacity rising linearly to full at ``full_at`` x scale, drawn
  at ``opacity`` over the scan);
* ``unit``: the unit of every map value and colour bar (:data:`UNIT`);
* ``scale_mode`` and one colour scale per map (``maps[i].scale``): ``"method"`` (default) shares one scale
  ``0 .. max`` across the targets of a method, never across methods (methods have different units); ``"picture"``
  gives every map its own ``0 .. max``. A non-zero map whose maximum is below :data:`VISIBLE_FRACTION` of its
  method's scale gets its own scale (``own_scale: true``, stated on the picture), so no non-zero map is invisible;
  an all-zero map is flagged ``zero: true`` and said so on every picture;
* ``maps[i].centre_mm``: the RAS point (mm) its three views cut through (``slice_at``); ``peak_mm`` and
  ``peak_in_view``: where its maximum is and whether a shown slice goes through it (pictures say "peak off these
  slices at ..." otherwise: a map strong elsewhere never looks empty);
* ``backgrounds``: per target, the channel drawn behind it and its grey window (:func:`lesion_window`);
* ``segments``: name and RGB colour (0..1) of each predicted region (Slicer segments, viewer outlines).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import matplotlib
import numpy as np

#: the unit of every heatmap value (colour bars, captions)
UNIT = "score units per voxel"
DEFAULT_CMAP = "turbo"
#: a non-zero map whose maximum is below this fraction of its method's scale is drawn on its own scale
VISIBLE_FRACTION = 0.25
#: outline colours of predicted regions (RGB 0..1): none of them occurs in the turbo colour map
REGION_COLOURS: dict[str, tuple[float, float, float]] = {
    "TC": (1.0, 0.0, 1.0),
    "WT": (0.0, 1.0, 0.0),
    "ET": (1.0, 1.0, 1.0),
}
_SPARE_COLOURS = ((1.0, 0.55, 0.75), (0.6, 0.6, 1.0), (1.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 1.0, 1.0))


@dataclass(frozen=True)
class Ramp:
    """Threshold/opacity ramp of the heatmap (fractions of the map's colour scale; ``opacity`` 0..1 overall)."""

    threshold: float = 0.02
    full_at: float = 0.10
    opacity: float = 0.6


def heat_lut(cmap: str = DEFAULT_CMAP, ramp: Ramp | None = None) -> np.ndarray:
    """256 RGBA entries (0..1) of the heatmap colour map; alpha 0 below ``ramp.threshold``, rising linearly to 1
    at ``ramp.full_at`` (entry i stands for the value ``lo + i / 255 * (hi - lo)`` of the map's scale)."""
    r = ramp or Ramp()
    x = np.linspace(0.0, 1.0, 256)
    rgba = np.asarray(matplotlib.colormaps[cmap](x), float)
    span = max(r.full_at - r.threshold, 1e-6)
    rgba[:, 3] = np.where(x < r.threshold, 0.0, np.clip((x - r.threshold) / span, 0.0, 1.0))
    rgba[0, 3] = 0.0
    return rgba


def region_colour(name: str, index: int) -> tuple[float, float, float]:
    """RGB (0..1) of a predicted region: by its BraTS name (the last word, e.g. "predicted TC"), else a spare."""
    key = str(name).split()[-1].upper() if str(name).split() else ""
    return REGION_COLOURS.get(key, _SPARE_COLOURS[index % len(_SPARE_COLOURS)])


def lesion_window(
    image: np.ndarray, lesion: np.ndarray | None = None, *, brain: tuple[float, float] = (1.0, 99.0)
) -> tuple[float, float]:
    """Grey window (lo, hi) that keeps a lesion readable: the ``brain`` percentiles of the non-zero voxels (the
    brain of a skull-stripped scan), the top raised to the 99.5th percentile of the ``lesion`` voxels when that is
    higher, so about 0.5 % of the lesion at most saturates (a 1st-99th brain window saturates a bright FLAIR lesion)."""
    img = np.asarray(image, float)
    fg = img[(img != 0) & np.isfinite(img)]
    if fg.size == 0:
        fg = img[np.isfinite(img)]
    if fg.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(fg, brain))
    if lesion is not None and np.shape(lesion) == img.shape:
        les = img[np.asarray(lesion, bool) & np.isfinite(img)]
        if les.size:
            hi = max(hi, float(np.percentile(les, 99.5)))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


@dataclass
class MapDisplay:
    """How one map is drawn: its scale (lo, hi in :data:`UNIT`), whether that is its own (not its method's), whether
    it is all zero, the RAS point (mm) of its slices, its file stem (``gradcam_WT``), the RAS point (mm) of its
    maximum and whether one of the three shown slices goes through it (else the pictures say where it is)."""

    method: str
    method_label: str
    target: str
    max: float
    scale: tuple[float, float]
    own_scale: bool
    zero: bool
    centre_mm: tuple[float, float, float]
    stem: str
    peak_mm: tuple[float, float, float] | None = None
    peak_in_view: bool = True


@dataclass
class DisplaySpec:
    """The display spec of a case (see the module docstring); :meth:`to_json` is what ``summary.json`` holds."""

    cmap: str
    scale_mode: str
    slice_at: str
    ramp: Ramp
    maps: list[MapDisplay]
    backgrounds: dict[str, dict[str, Any]]
    segments: list[dict[str, Any]] = field(default_factory=list)
    unit: str = UNIT

    def method_scales(self) -> dict[str, tuple[float, float]]:
        """Method -> its shared scale (the largest scale of its maps that are not on their own scale)."""
        out: dict[str, tuple[float, float]] = {}
        for m in self.maps:
            if not m.own_scale and (m.method not in out or m.scale[1] > out[m.method][1]):
                out[m.method] = m.scale
        for m in self.maps:
            out.setdefault(m.method, m.scale)
        return out

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (floats rounded to 6 significant digits; ``lut``: 256 x RGBA in 0..1)."""
        d = asdict(self)
        d["lut"] = [[round(float(v), 4) for v in row] for row in heat_lut(self.cmap, self.ramp)]
        d["method_scales"] = {k: list(v) for k, v in self.method_scales().items()}
        return _round(d)


def _round(x: Any) -> Any:
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_round(v) for v in x]
    return x


def map_scales(maxima: Sequence[tuple[str, float]], scale_mode: str) -> list[tuple[tuple[float, float], bool]]:
    """The (scale, own_scale) of each map given as (method, max): see the module docstring."""
    if scale_mode not in ("method", "picture"):
        raise ValueError(f"scale_mode must be 'method' or 'picture', got {scale_mode!r}")
    top: dict[str, float] = {}
    for method, mx in maxima:
        top[method] = max(top.get(method, 0.0), float(mx))
    out = []
    for method, mx in maxima:
        own = (0.0, float(mx) if mx > 0 else 1.0)
        if scale_mode == "picture":
            out.append((own, True))
        elif 0 < mx < VISIBLE_FRACTION * top[method]:
            out.append((own, True))
        else:
            out.append(((0.0, top[method] if top[method] > 0 else 1.0), False))
    return out


def segments_spec(names: Sequence[str], colours: Sequence[Sequence[float]] | None = None) -> list[dict[str, Any]]:
    """``[{"name", "color"}]`` of the predicted regions (colours by :func:`region_colour` unless given)."""
    cols = colours or [region_colour(n, i) for i, n in enumerate(names)]
    return [{"name": str(n), "color": [float(c) for c in col]} for n, col in zip(names, cols)]


def spec_from_json(d: Mapping[str, Any]) -> DisplaySpec:
    """The :class:`DisplaySpec` of a ``summary.json`` ``figures.display`` record."""
    maps = [
        MapDisplay(
            **{
                **m,
                "scale": tuple(m["scale"]),
                "centre_mm": tuple(m["centre_mm"]),
                "peak_mm": None if m.get("peak_mm") is None else tuple(m["peak_mm"]),
            }
        )
        for m in d["maps"]
    ]
    return DisplaySpec(
        cmap=d["cmap"],
        scale_mode=d["scale_mode"],
        slice_at=d["slice_at"],
        ramp=Ramp(**d["ramp"]),
        maps=maps,
        backgrounds={k: dict(v) for k, v in d["backgrounds"].items()},
        segments=list(d.get("segments") or []),
        unit=d.get("unit", UNIT),
    )
