"""Look at an explained case in a notebook: :func:`show` gives the NiiVue viewer as a widget (ipyniivue), or the
static montage where widgets are not available.

The widget needs the optional extra ``pip install "medcam[viewer]"`` (ipyniivue, ipywidgets) and a notebook front
end; ``show`` never downloads anything (volumes are read from the case folder).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcam.errors import MedcamError

logger = logging.getLogger(__name__)


class ViewerError(MedcamError):
    """``show`` was given something that is not an explained case."""


def case_folder(case_dir_or_result: Any) -> Path:
    """The case folder (holding ``summary.json``) of a path, an output folder with one case, or the run summary
    returned by :func:`medcam.pipeline.explain_cohort` (its first finished case)."""
    x = case_dir_or_result
    if isinstance(x, Mapping):
        if "output" in x and "cases" in x:  # explain_cohort's run summary
            done = [c for c in x["cases"] if c.get("status") in ("ok", "skipped")]
            if not done:
                raise ViewerError("the run summary has no finished case to show")
            return case_folder(Path(x["output"]) / str(done[0]["case_id"]))
        if "case_dir" in x:
            return case_folder(x["case_dir"])
        raise ViewerError(
            "show() got a case summary without its folder; pass the case folder instead, e.g. show('OUT/<case_id>')"
        )
    p = Path(x)
    if (p / "summary.json").is_file():
        return p
    subs = sorted(d for d in p.iterdir() if (d / "summary.json").is_file()) if p.is_dir() else []
    if len(subs) == 1:
        return subs[0]
    if subs:
        raise ViewerError(f"'{p}' holds {len(subs)} cases; pass one case folder, e.g. '{subs[0]}'")
    raise ViewerError(f"'{p}' is not a medcam case folder (no summary.json); pass OUT/<case_id> of medcam explain")


def _widgets_available() -> bool:
    try:
        import ipyniivue  # noqa: F401
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


@dataclass(frozen=True)
class _Map:
    """One heatmap for the widget: label, file, colour scale (the display spec's), background scan and window."""

    label: str
    path: Path
    scale: tuple[float, float]
    scan: Path | None
    window: tuple[float, float] | None


def _maps(case: Path, summary: dict[str, Any]) -> list[_Map]:
    """Every heatmap of the case with the display spec's scale and its target's background (summary.json
    ``figures.display``; without it: 0 .. the map's maximum over the T1ce scan)."""
    display = (summary.get("figures") or {}).get("display") or {}
    spec = {(m["method"], m["target"]): m for m in display.get("maps", [])}
    out = []
    for row in summary.get("targets", []):
        bg = (display.get("backgrounds") or {}).get(row["name"]) or {}
        scan = _scan(case, summary, bg.get("channel"))
        window = tuple(bg["window"]) if bg.get("window") else None
        for m, rel in (row.get("heatmaps") or {}).items():
            label = (summary.get("methods") or {}).get(m, m)
            mx = float((row.get("map_max") or {}).get(m, 0.0))
            lo, hi = (spec.get((m, row["name"])) or {}).get("scale") or (0.0, mx if mx > 0 else 1.0)
            out.append(_Map(f"{label} | {row['name']}", case / rel, (float(lo), float(hi)), scan, window))
    return out


def _scan(case: Path, summary: dict[str, Any], channel: str | None = None) -> Path | None:
    slicer = case / "slicer"
    first = [channel] if channel else []
    for ch in first + ["t1ce"] + [str(c) for c in summary.get("channels", [])]:
        hits = sorted(slicer.glob(f"image_{ch}.*")) if slicer.is_dir() else []
        if hits:
            return hits[0]
    images = (summary.get("figures") or {}).get("images") or {}
    for ch in [*first, "t1ce", *images]:
        if ch in images and Path(images[ch]).exists():
            return Path(images[ch])
    return None


def show(case_dir_or_result: Any, *, height: int = 420, widget: bool | None = None) -> Any:
    """Show an explained case.

    Args:
        case_dir_or_result: ``OUT/<case_id>`` of ``medcam explain``, an output folder holding one case, or the run
            summary of :func:`medcam.pipeline.explain_cohort`.
        height: widget height in pixels.
        widget: force (True) or refuse (False) the interactive widget; default: the widget when ipyniivue and a
            notebook kernel are available, else the montage.

    Returns:
        An ipywidgets ``VBox`` (heatmap chooser method x target, threshold slider in map units, NiiVue viewer in
        radiological convention), or an ``IPython.display.Image`` of ``montage.png`` (or its path without IPython).
    """
    case = case_folder(case_dir_or_result)
    summary = json.loads((case / "summary.json").read_text(encoding="utf-8"))
    use_widget = _widgets_available() if widget is None else widget
    maps = [m for m in _maps(case, summary) if m.scan is not None]
    if use_widget and maps:
        return _widget(maps, height)
    if use_widget:
        logger.warning("case %s: no scan or no map in the folder for the viewer; showing the montage", case.name)
    return _montage(case, summary)


def _montage(case: Path, summary: dict[str, Any]) -> Any:
    rel = (summary.get("figures") or {}).get("montage")
    if not rel or not (case / rel).is_file():
        raise ViewerError(f"case '{case}' has no montage.png (explained with --no-png?); nothing to show")
    try:
        from IPython.display import Image
    except ImportError:
        return case / rel
    return Image(filename=str(case / rel))


def _widget(maps: list[_Map], height: int) -> Any:
    """Chooser (method x target), threshold slider (map units, 0 .. the shown map's scale) and NiiVue: each map over
    its target's background with the display spec's window and colour scale."""
    import ipywidgets as W
    from ipyniivue import NiiVue

    nv = NiiVue(height=height, is_radiological_convention=True, is_colorbar=True)
    chooser = W.Dropdown(options=[(m.label, i) for i, m in enumerate(maps)], description="map")
    hi0 = maps[0].scale[1]
    thr = W.FloatSlider(value=0.02 * hi0, min=0.0, max=hi0, step=hi0 / 200, description="threshold")

    def load(_: Any = None) -> None:
        m = maps[chooser.value]
        lo, hi = m.scale
        thr.max, thr.step = hi, hi / 200
        thr.value = lo + 0.02 * (hi - lo)
        scan: dict[str, Any] = {"path": str(m.scan), "colormap": "gray"}
        if m.window is not None:
            scan.update(cal_min=m.window[0], cal_max=m.window[1])
        nv.load_volumes(
            [scan, {"path": str(m.path), "colormap": "turbo", "cal_min": thr.value, "cal_max": hi, "opacity": 0.6}]
        )

    def threshold(change: Any) -> None:
        if len(nv.volumes) > 1:
            nv.volumes[1].cal_min = float(change["new"])

    chooser.observe(load, names="value")
    thr.observe(threshold, names="value")
    load()
    return W.VBox([W.HBox([chooser, thr]), nv])
