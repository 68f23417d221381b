"""``medcam report OUT``: an HTML report of an output folder that opens from the file system (no server).

Layout written into ``OUT/report/`` (relative links only, so the folder can be zipped and moved together with the
case folders)::

    index.html              cohort table: case, status, targets, ROI volumes, map maxima, warnings, links
    cases/<case>.html       one page per case: NiiVue viewer (scan, heatmap method x target, threshold slider,
                            predicted-region outlines), montage, links to the overlays and the Slicer scene
    data/<case>.js          the case's volumes embedded as base64 (see :mod:`medcam.report.volumes`)
    assets/niivue.umd.js    NiiVue's browser bundle (npm @niivue/niivue, BSD-2-Clause, LICENSE-niivue.txt)
    assets/viewer.js, assets/report.css

Nothing is fetched at view time: the pages use classic ``<script>`` tags only (ES modules and XHR are blocked on
file:// pages by Chromium).
"""

from __future__ import annotations

import html
import json
import logging
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from medcam.errors import MedcamError
from medcam.io import display as D
from medcam.io.atomic import write_text_atomic
from medcam.report import volumes as V

logger = logging.getLogger(__name__)

REPORT_DIR = "report"
ASSETS = ("niivue.umd.js", "LICENSE-niivue.txt", "viewer.js", "report.css")


class ReportError(MedcamError):
    """The folder given to ``medcam report`` holds no medcam output (or cannot be written)."""


def _summaries(out: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """(cohort records from every ``cohort_summary*.json``, case_id -> summary.json of each case folder)."""
    records: dict[str, dict[str, Any]] = {}
    # the folder's record (cohort_summary.json: every case's last outcome, merged by every run and part) last, so
    # that it wins over the run summaries of split runs (whose finished cases a resume lists as "skipped")
    for p in sorted(out.glob("cohort_summary*.json"), key=lambda p: (p.name == "cohort_summary.json", p.name)):
        try:
            run = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for rec in run.get("cases", []) if isinstance(run, dict) else []:
            if isinstance(rec, dict) and "case_id" in rec:
                records[str(rec["case_id"])] = rec
    summaries = {}
    for d in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        s = d / "summary.json"
        if s.is_file():
            try:
                data = json.loads(s.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and "medcam_version" in data:
                summaries[d.name] = data
    for cid in summaries:
        records.setdefault(cid, {"case_id": cid, "status": "ok"})
    return [records[k] for k in sorted(records)], summaries


def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, (int, float)) else _esc(v)


def _scan_paths(case_dir: Path, summary: dict[str, Any]) -> dict[str, Path]:
    """channel -> file of the case's scans: the Slicer folder's copies, else the recorded original files."""
    out: dict[str, Path] = {}
    channels = [str(c) for c in summary.get("channels", [])]
    slicer = case_dir / "slicer"
    for ch in channels:
        hits = sorted(slicer.glob(f"image_{ch}.*")) if slicer.is_dir() else []
        if hits:
            out[ch] = hits[0]
    images = (summary.get("figures") or {}).get("images") or {}
    for ch, p in images.items():
        if ch not in out and Path(p).exists():
            out[ch] = Path(p)
    return out


def _regions(case_dir: Path) -> tuple[np.ndarray, list[str], list[list[float] | None]] | None:
    """The predicted regions of the Slicer folder: masks [K, X, Y, Z], names and colours (RGB 0..1)."""
    seg = case_dir / "slicer" / "segmentation.seg.nrrd"
    if not seg.is_file():
        return None
    import nrrd

    data, header = nrrd.read(str(seg))
    if data.ndim == 3:  # one layer: one mask per label value
        values = [int(header.get(f"Segment{i}_LabelValue", i + 1)) for i in range(_n_segments(header))]
        data = np.stack([data == v for v in values])
    names = [str(header.get(f"Segment{i}_Name", f"region {i + 1}")) for i in range(data.shape[0])]
    colours = []
    for i in range(data.shape[0]):
        c = header.get(f"Segment{i}_Color")
        colours.append([float(v) for v in str(c).split()] if c else None)
    return data, names, colours


def _n_segments(header: dict[str, Any]) -> int:
    return sum(1 for k in header if k.startswith("Segment") and k.endswith("_ID"))


def _display(summary: dict[str, Any]) -> dict[str, Any]:
    """The case's display spec (``figures.display``); for a case written without PNGs, one with the same rules
    (scale per method, the default ramp and colour map) from the recorded map maxima."""
    figs = summary.get("figures") or {}
    if figs.get("display"):
        return dict(figs["display"])
    maxima = [(m, float(v)) for t in summary.get("targets", []) for m, v in (t.get("map_max") or {}).items()]
    targets = [t["name"] for t in summary.get("targets", []) for _ in (t.get("map_max") or {})]
    scales = D.map_scales(maxima, "method")
    labels = summary.get("methods") or {}
    maps = [
        {"method": m, "method_label": labels.get(m, m), "target": t, "max": mx, "scale": list(sc), "own_scale": own,
         "zero": mx <= 0, "centre_mm": None, "stem": f"{m}_{t}"}
        for (m, mx), t, (sc, own) in zip(maxima, targets, scales)
    ]  # fmt: skip
    ramp = D.Ramp()
    return {
        "cmap": D.DEFAULT_CMAP,
        "lut": D.heat_lut(D.DEFAULT_CMAP, ramp).round(4).tolist(),
        "ramp": {"threshold": ramp.threshold, "full_at": ramp.full_at, "opacity": ramp.opacity},
        "unit": D.UNIT,
        "scale_mode": "method",
        "maps": maps,
        "backgrounds": {},
        "segments": [],
    }


def _map_entries(
    case_dir: Path, summary: dict[str, Any], display: dict[str, Any], max_voxels: int
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], np.ndarray | None]:
    """(viewer map records, key -> packed volume) of every heatmap of the case, with the spec's scale of each."""
    spec_maps = {(m["method"], m["target"]): m for m in display.get("maps", [])}
    working = summary.get("preprocessed_spacing_mm")
    records: list[dict[str, Any]] = []
    volumes: dict[str, dict[str, Any]] = {}
    affine: np.ndarray | None = None
    for row in summary.get("targets", []):
        for m, rel in (row.get("heatmaps") or {}).items():
            arr, affine = V.read_nifti(case_dir / rel)
            stride = V.map_stride(np.linalg.norm(affine[:3, :3], axis=0), working)
            key = f"map_{len(records)}"
            packed = V.pack_map(f"{m}_{row['name']}.nii.gz", arr, affine, max_voxels=max_voxels, min_stride=stride)
            volumes[key] = packed.js()
            sm = spec_maps.get((m, row["name"]), {})
            hi = packed.info["max"]
            bg = (display.get("backgrounds") or {}).get(row["name"]) or {}
            records.append(
                {
                    "key": key, "method": m, "method_label": (summary.get("methods") or {}).get(m, m),
                    "target": row["name"], "max": hi, "scale": sm.get("scale") or [0.0, hi if hi > 0 else 1.0],
                    "own_scale": bool(sm.get("own_scale")), "zero": hi <= 0, "centre_mm": sm.get("centre_mm"),
                    "background": bg.get("channel"), "window": bg.get("window"), "roi_ml": row.get("roi_volume_ml"),
                }
            )  # fmt: skip
    return records, volumes, affine


def build_case_data(
    case_dir: Path, summary: dict[str, Any], *, max_voxels: int
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The payload of ``data/<case>.js`` (display spec, scan and map records, regions) and the volumes loaded on
    demand (key -> packed volume, written to ``data/<case>/<key>.js``)."""
    from medcam.data.loading import read_volume

    display = _display(summary)
    maps, volumes, affine = _map_entries(case_dir, summary, display, max_voxels)
    scans = []
    for ch, path in _scan_paths(case_dir, summary).items():
        vol = read_volume(path)
        packed = V.pack_scan(f"{ch}.nii.gz", vol.numpy(), np.asarray(vol.affine, float), max_voxels=max_voxels)
        volumes[f"scan_{ch}"] = packed.js()
        scans.append({"key": f"scan_{ch}", "channel": ch, "cal_min": packed.cal_min, "cal_max": packed.cal_max})
    channels = [s["channel"] for s in scans]
    regions = _regions(case_dir)
    reg_js = []
    if regions is not None and affine is not None:
        by_name = {str(s["name"]): s["color"] for s in display.get("segments") or []}
        # larger regions first: their outlines go under the nested ones (ET inside TC inside WT)
        order = sorted(range(len(regions[1])), key=lambda k: -int(np.count_nonzero(regions[0][k])))
        for k, (mask, name, colour) in ((k, (regions[0][k], regions[1][k], regions[2][k])) for k in order):
            col = by_name.get(name) or colour or D.region_colour(name, k)
            stride = V.map_stride(np.linalg.norm(affine[:3, :3], axis=0), summary.get("preprocessed_spacing_mm"))
            reg_js.append(V.pack_region(mask, name, col, affine, max_voxels=max_voxels, min_stride=stride).js())
    payload = {
        "case_id": summary.get("case_id"),
        "layer": summary.get("layer"),
        "display": {k: display.get(k) for k in ("cmap", "lut", "ramp", "unit", "scale_mode")},
        "scans": scans,
        "background": "t1ce" if "t1ce" in channels else (channels[0] if channels else None),
        "maps": maps,
        "regions": reg_js,
        "note": "volumes uint8-quantised (maps: step = max/255 map units; scans clipped at the 99.9th percentile)",
    }
    return payload, volumes


def _case_page(cid: str, summary: dict[str, Any], case_rel: str, display: dict[str, Any]) -> str:
    ramp = display.get("ramp") or {}
    thr, opa = round(1000 * float(ramp.get("threshold", 0.02))), round(100 * float(ramp.get("opacity", 0.6)))
    unit = _esc(display.get("unit") or D.UNIT)
    scale_rule = (
        "one scale per method, shared by its targets; a map too faint for it is on its own scale"
        if display.get("scale_mode", "method") == "method"
        else "each map on its own scale"
    )
    rows = []
    for t in summary.get("targets", []):
        maxima = ", ".join(f"{_esc(m)} {_fmt(v)}" for m, v in (t.get("map_max") or {}).items())
        rows.append(f"<tr><td>{_esc(t['name'])}</td><td>{_fmt(t.get('roi_volume_ml'))}</td><td>{maxima}</td></tr>")
    warn = "".join(f"<li class='warn'>{_esc(w)}</li>" for w in summary.get("warnings") or [])
    links = []
    figs = summary.get("figures") or {}
    if figs.get("montage"):
        links.append(f"<a href='{case_rel}/{figs['montage']}'>montage (PNG)</a>")
    for fmt, rel in (figs.get("montage_files") or {}).items():
        if fmt != "png":
            links.append(f"<a href='{case_rel}/{rel}'>montage ({_esc(fmt).upper()})</a>")
    if summary.get("slicer_scene"):
        links.append(f"<a href='{case_rel}/{summary['slicer_scene']}'>3D Slicer scene</a>")
    links.append(f"<a href='{case_rel}/summary.json'>summary.json</a>")
    montage = (
        f"<h2>Montage</h2><img class='montage' src='{case_rel}/{figs['montage']}' alt='montage of {_esc(cid)}'>"
        if figs.get("montage")
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>medcam | {_esc(cid)}</title>
<link rel="stylesheet" href="../assets/report.css"></head>
<body>
<header><a href="../index.html">&larr; cohort</a> <h1>{_esc(cid)}</h1>
<span class="meta">layer {_esc(summary.get("layer"))} | model {_esc((summary.get("model") or {}).get("spec", ""))}</span></header>
<section id="viewer-controls">
  <div id="map-buttons"></div>
  <label>threshold <input id="threshold" type="range" min="0" max="1000" value="{thr}"> <span id="thr-value"></span></label>
  <label>opacity <input id="opacity" type="range" min="0" max="100" value="{opa}"></label>
  <label><input id="outlines" type="checkbox" checked> predicted-region outlines</label>
  <label>scan <select id="scan"></select></label>
  <span id="status" class="meta"></span>
</section>
<div id="gl-wrap"><canvas id="gl"></canvas></div>
<div id="legend"></div>
<p class="meta">Radiological convention (patient's right on the viewer's left). Colour bar in {unit}, on the
scale of the shown map ({scale_rule}); values below the threshold (a fraction of that scale) are transparent.
Each map is shown over its target's background scan with the window of the PNGs; every predicted region is its own
outline. Volumes load when first shown.</p>
<table><tr><th>target</th><th>ROI ml</th><th>map max (per method)</th></tr>{"".join(rows)}</table>
<ul>{warn}</ul>
<p>{" | ".join(links)}</p>
{montage}
<script src="../assets/niivue.umd.js"></script>
<script src="../data/{_esc(cid)}.js"></script>
<script src="../assets/viewer.js"></script>
</body></html>
"""


def _index_page(records: list[dict[str, Any]], summaries: dict[str, dict[str, Any]], out: Path) -> str:
    rows = []
    for rec in records:
        cid = str(rec["case_id"])
        s = summaries.get(cid)
        status = rec.get("status", "ok" if s else "missing")
        if s is None:
            err = _esc(rec.get("error", ""))
            rows.append(
                f"<tr class='failed'><td>{_esc(cid)}</td><td>{_esc(status)}</td><td colspan='5'>{err}</td></tr>"
            )
            continue
        tg = s.get("targets", [])
        names = ", ".join(_esc(t["name"]) for t in tg)
        vols = ", ".join(f"{_esc(t['name'])} {_fmt(t.get('roi_volume_ml'))}" for t in tg)
        maxima = "<br>".join(
            f"{_esc(t['name'])}: " + ", ".join(f"{_esc(m)} {_fmt(v)}" for m, v in (t.get("map_max") or {}).items())
            for t in tg
        )
        n_warn = len(s.get("warnings") or [])
        links = [f"<a href='cases/{_esc(cid)}.html'>viewer</a>"]
        figs = s.get("figures") or {}
        if figs.get("montage"):
            links.append(f"<a href='../{_esc(cid)}/{figs['montage']}'>montage</a>")
        if s.get("slicer_scene"):
            links.append(f"<a href='../{_esc(cid)}/{s['slicer_scene']}'>Slicer</a>")
        rows.append(
            f"<tr><td><a href='cases/{_esc(cid)}.html'>{_esc(cid)}</a></td><td>{_esc(status)}</td><td>{names}</td>"
            f"<td>{vols}</td><td>{maxima}</td><td>{n_warn or ''}</td><td>{' | '.join(links)}</td></tr>"
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>medcam report | {_esc(out.name)}</title>
<link rel="stylesheet" href="assets/report.css"></head>
<body><header><h1>medcam report</h1><span class="meta">{_esc(out.name)}: {len(records)} case(s)</span></header>
<table id="cohort"><tr><th>case</th><th>status</th><th>targets</th><th>ROI volume (ml)</th>
<th>map maxima (map units)</th><th>warnings</th><th>links</th></tr>
{"".join(rows)}</table>
<p class="meta">Maps on the original image grid. The viewer (NiiVue, BSD-2-Clause, see assets/LICENSE-niivue.txt)
works offline from the file system.</p>
</body></html>
"""


def write_report(output: str | Path, *, max_voxels: int = V.DEFAULT_MAX_VOXELS, progress: bool = False) -> Path:
    """Write ``OUTPUT/report/`` for the medcam output folder ``OUTPUT`` (see the module docstring).

    The report folder is medcam's own: it is rebuilt on every call (no user data lives there). ``progress``: a tqdm
    bar over the case pages (stderr). The cohort table reads the folder's ``cohort_summary.json`` (every case's last
    outcome, :mod:`medcam.pipeline.folder_record`), and the run summaries of split runs.

    Returns:
        Path of ``OUTPUT/report/index.html``.

    Raises:
        ReportError: ``OUTPUT`` is missing or holds no medcam case/cohort summary.
    """
    out = Path(output)
    if not out.is_dir():
        raise ReportError(f"'{out}' is not a folder; give the --output folder of `medcam explain`")
    records, summaries = _summaries(out)
    if not records:
        raise ReportError(f"'{out}' holds no medcam output (no cohort_summary.json, no <case>/summary.json)")
    rep = out / REPORT_DIR
    if rep.exists() and not (rep / "index.html").exists() and any(rep.iterdir()):
        raise ReportError(f"'{rep}' exists and is not a medcam report; move it away first")
    for sub in ("assets", "cases", "data"):
        (rep / sub).mkdir(parents=True, exist_ok=True)
    static = resources.files("medcam.report") / "static"
    for name in ASSETS:
        with resources.as_file(static / name) as src:
            shutil.copyfile(src, rep / "assets" / name)
    from tqdm.auto import tqdm

    for cid, s in tqdm(summaries.items(), desc="medcam report", unit="case", disable=not progress):
        payload, volumes = build_case_data(out / cid, s, max_voxels=max_voxels)
        write_text_atomic(rep / "data" / f"{cid}.js", V.case_js(payload), overwrite=True)
        (rep / "data" / cid).mkdir(exist_ok=True)
        for key, entry in volumes.items():
            write_text_atomic(rep / "data" / cid / f"{key}.js", V.volume_js(key, entry), overwrite=True)
        page = _case_page(cid, s, f"../../{cid}", payload["display"])
        write_text_atomic(rep / "cases" / f"{cid}.html", page, overwrite=True)
        logger.info("report page of case %s written", cid)
    index = write_text_atomic(rep / "index.html", _index_page(records, summaries, out), overwrite=True)
    logger.info("report written: %s", index)
    return index
