"""The HTML report: structure and embedded data (numbers), and the pages in a real headless Chromium from file://."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import re
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import nrrd
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from medcam.cli import main
from tests._chromium import chromium_path, file_url, load_page


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    """A real ``medcam explain --report`` output: phantom case, tiny random SegResNet, WT mask target, 2 methods."""
    from medcam.data.phantoms import write_phantom_case
    from medcam.models import demo
    from tests.test_pipeline import TINY_ROI, TINY_SPACING, tiny_net

    root = tmp_path_factory.mktemp("report")
    write_phantom_case(root / "cases", seed=3, spacing_mm=3.0)
    case = root / "cases" / "Phantom_00003"
    seg = next(case.glob("*_seg.nii.gz"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "load_demo_model", lambda device="cpu": tiny_net().to(device))
        mp.setattr(demo, "DEMO_ROI_SIZE", TINY_ROI)
        mp.setattr(demo, "DEMO_SPACING_MM", TINY_SPACING)
        mp.setattr(
            demo,
            "demo_preprocessing_kwargs",
            lambda: {
                "orientation": "RAS",
                "spacing": (TINY_SPACING,) * 3,
                "normalize": True,
                "crop_foreground": False,
                "divisible_by": None,
            },
        )
        out = root / "out"
        r = run(
            ["explain", case, "-o", out, "-M", "hirescam", "-M", "layercam", "--target", f"mask:{seg}:WT"]
            + ["--target", "ET", "--quiet", "--device", "cpu", "--report"]
        )
    assert r.exit_code == 0, (r.output, r.stderr)
    assert "report:" in r.output
    return out


def _payload(out, cid):
    text = (out / "report" / "data" / f"{cid}.js").read_text()
    assert text.startswith("window.MEDCAM_CASE = ")
    return json.loads(text[len("window.MEDCAM_CASE = ") :].rstrip().rstrip(";"))


def _volume(out, cid, key):
    """The packed volume of ``report/data/<cid>/<key>.js`` (loaded on demand by the viewer)."""
    text = (out / "report" / "data" / cid / f"{key}.js").read_text()
    head = f'window.MEDCAM_VOLUME("{key}", '
    assert text.startswith(head)
    return json.loads(text[len(head) :].rstrip().rstrip(";").rstrip(")"))


def _decode(entry):
    raw = gzip.decompress(base64.b64decode(entry["b64"]))
    return nib.Nifti1Image.from_bytes(raw)


def test_report_files_and_embedded_volumes(explained):
    out = explained
    rep = out / "report"
    for f in ("index.html", "assets/niivue.umd.js", "assets/LICENSE-niivue.txt", "assets/viewer.js"):
        assert (rep / f).is_file(), f
    assert "BSD 2-Clause" in (rep / "assets" / "LICENSE-niivue.txt").read_text()
    bundle = (rep / "assets" / "niivue.umd.js").read_text(encoding="utf-8")
    assert "import(" not in bundle and "sA.niivue={}" in bundle  # one classic UMD script, no lazily loaded chunks
    index = (rep / "index.html").read_text()
    assert "cases/Phantom_00003.html" in index and "WT" in index
    page = (rep / "cases" / "Phantom_00003.html").read_text()
    # zippable: every link and script of the pages is relative and points at a file of OUT
    for html_file, text in ((rep / "index.html", index), (rep / "cases" / "Phantom_00003.html", page)):
        for ref in re.findall(r"(?:href|src)='([^']+)'|(?:href|src)=\"([^\"]+)\"", text):
            ref = ref[0] or ref[1]
            assert "://" not in ref and not ref.startswith("/"), ref
            assert (html_file.parent / ref).resolve().is_file(), (html_file.name, ref)
    scripts = re.findall(r"<script[^>]*>", page)
    assert scripts and all("src=" in s and 'type="module"' not in s and "http" not in s for s in scripts)
    assert "http://" not in page and "https://" not in page  # nothing fetched at view time
    s = json.loads((out / "Phantom_00003" / "summary.json").read_text())
    data = _payload(out, "Phantom_00003")
    assert {(m["method"], m["target"]) for m in data["maps"]} == {
        (m, t["name"]) for t in s["targets"] for m in ("hirescam", "layercam")
    }
    assert {sc["channel"] for sc in data["scans"]} == {"t1", "t1ce", "t2", "flair"} and data["background"] == "t1ce"
    assert sorted(r["label"] for r in data["regions"]) == ["predicted ET", "predicted TC", "predicted WT"]
    spec = s["figures"]["display"]
    colours = {seg["name"]: seg["color"] for seg in spec["segments"]}
    assert all(r["color"] == colours[r["label"]] for r in data["regions"])
    assert data["display"]["lut"] == spec["lut"] and data["display"]["unit"] == "score units per voxel"
    # maps: uint8 with scl_slope = max/255, values equal the written heatmap to half a step, zero stays zero
    for m in data["maps"]:
        row = next(t for t in s["targets"] if t["name"] == m["target"])
        sm = next(x for x in spec["maps"] if (x["method"], x["target"]) == (m["method"], m["target"]))
        assert m["scale"] == sm["scale"] and m["background"] == spec["backgrounds"][m["target"]]["channel"]
        orig = nib.load(str(out / "Phantom_00003" / row["heatmaps"][m["method"]]))
        m = {**m, **_volume(out, "Phantom_00003", m["key"])}
        img = _decode(m)
        # maps subsampled down to the working grid: 8 mm model grid on 3 mm scans -> every 2nd voxel
        st = m["stride"]
        assert st == 2
        b = orig.get_fdata()[::st, ::st, ::st]
        assert img.get_data_dtype() == np.uint8 and img.shape == b.shape
        np.testing.assert_allclose(img.affine, orig.affine @ np.diag([st, st, st, 1]), atol=1e-5)
        a = np.asarray(img.dataobj, dtype=np.float64)
        assert m["max"] == pytest.approx(orig.get_fdata().max(), rel=1e-6)
        assert np.abs(a - b).max() <= m["step"] / 2 + 1e-6 * max(b.max(), 1)
        assert np.all(a[b == 0] == 0)
    scan = next(sc for sc in data["scans"] if sc["channel"] == "t1ce")
    scan = {**scan, **_volume(out, "Phantom_00003", scan["key"])}
    t1ce = nib.load(str(next((out / "Phantom_00003" / "slicer").glob("image_t1ce.*"))))
    sc_img = _decode(scan)
    assert sc_img.shape == t1ce.shape and scan["stride"] == 1  # scans at full resolution
    ref = t1ce.get_fdata()
    fg = ref[ref != 0]
    lo, hi, top = np.percentile(fg, [1, 99, 99.9])
    assert (scan["cal_min"], scan["cal_max"]) == pytest.approx((lo, hi), rel=1e-5)
    step = float(sc_img.dataobj.slope)  # nibabel moves the scaling from the header to the proxy on load
    inside = ref <= top
    assert np.abs(np.asarray(sc_img.dataobj, dtype=np.float64)[inside] - ref[inside]).max() <= step / 2 + 1e-3
    # each predicted region its own 0/1 label volume: nested regions never overwrite each other
    summary_regions = nrrd.read(str(out / "Phantom_00003" / "slicer" / "segmentation.seg.nrrd"))[0]
    names = ["predicted TC", "predicted WT", "predicted ET"]  # the seg.nrrd's order
    for r in data["regions"]:
        k = names.index(r["label"])
        reg = _decode(r)
        assert int(reg.header["intent_code"]) == 1002  # NIfTI label intent: NiiVue draws it as outlines
        np.testing.assert_array_equal(np.asarray(reg.dataobj), summary_regions[k][::2, ::2, ::2])  # working grid
    # the whole report stays small for a phantom case
    assert sum(p.stat().st_size for p in (rep / "data").rglob("*") if p.is_file()) < 5_000_000


def test_report_command_and_errors(explained, tmp_path):
    r = run(["report", explained, "--quiet"])
    assert r.exit_code == 0 and "report written" in r.output
    r = run(["report", tmp_path])
    assert r.exit_code == 1 and "holds no medcam output" in r.stderr


def _heat_components(png: np.ndarray) -> list[tuple[slice, slice]]:
    """Filled blobs of heatmap colour (saturated, not the pure outline colours), as bounding boxes."""
    rgb = png[..., :3].astype(float)
    sat = rgb.max(-1) - rgb.min(-1)
    pure = np.all((rgb < 0.12) | (rgb > 0.88), axis=-1)
    heat = (sat > 0.3) & ~pure
    heat = ndimage.binary_erosion(heat, iterations=3)  # drops thin lines (crosshair, outline edges)
    lab, n = ndimage.label(heat)
    boxes = ndimage.find_objects(lab)
    w = png.shape[1]
    return [b for b in boxes if (b[1].stop - b[1].start) < 0.3 * w and (b[0].stop - b[0].start) > 4]


def _grey_beside(png: np.ndarray, box: tuple[slice, slice], pad: int = 25) -> bool:
    """The scan (grey, not black) is seen on all four sides of ``box``: the blob lies inside the brain."""
    rgb = png[..., :3].astype(float)
    grey = (rgb.max(-1) - rgb.min(-1) < 0.08) & (rgb.mean(-1) > 0.12)
    r, c = box
    h, w = grey.shape
    sides = [
        grey[r, max(0, c.start - pad) : c.start],
        grey[r, c.stop : min(w, c.stop + pad)],
        grey[max(0, r.start - pad) : r.start, c],
        grey[r.stop : min(h, r.stop + pad), c],
    ]
    return all(s.size and s.any() for s in sides)


@pytest.mark.skipif(
    chromium_path() is None and not os.environ.get("CI"),
    reason="chromium is not installed (apt-get install chromium); .ci/run installs it and CI never skips this",
)
def test_report_pages_in_headless_chromium(explained, tmp_path):
    rep = explained / "report"
    idx = load_page(
        file_url(rep / "index.html"),
        ready_js="document.querySelectorAll('#cohort tr').length",
        value_js="document.querySelectorAll('#cohort a').length",
    )
    assert idx.errors == [], idx.errors
    assert idx.ready == 2 and idx.value >= 2  # header + one case, links to its viewer
    res = load_page(
        file_url(rep / "cases" / "Phantom_00003.html"),
        ready_js="document.body.dataset.ready === '1'",
        value_js="[document.getElementById('status').textContent, window.niivue !== undefined]",
        before_shot_js="document.getElementById('outlines').click()",  # outlines off: only the map is coloured
    )
    (tmp_path / "case.png").write_bytes(res.png)
    assert res.errors == [], res.errors
    assert res.ready is True, res.value
    assert res.value[1] is True and "map max" in res.value[0]
    png = mpimg.imread(io.BytesIO(res.png), format="png")
    blobs = _heat_components(png)
    inside = [b for b in blobs if _grey_beside(png, b)]
    assert inside, f"no heatmap blob inside the scan in the screenshot ({len(blobs)} coloured blobs)"
    assert sum((b[0].stop - b[0].start) * (b[1].stop - b[1].start) for b in inside) > 200


# ---------------------------------------------------------------------------------------------------- notebooks
def test_viz_show_finds_the_case_and_falls_back_to_the_montage(explained):
    from IPython.display import Image

    from medcam.viz import ViewerError, case_folder, show

    case = explained / "Phantom_00003"
    assert case_folder(case) == case and case_folder(explained) == case
    assert case_folder({"output": str(explained), "cases": [{"case_id": "Phantom_00003", "status": "ok"}]}) == case
    with pytest.raises(ViewerError, match="pass the case folder"):
        case_folder({"case_id": "Phantom_00003"})
    with pytest.raises(ViewerError, match="not a medcam case folder"):
        case_folder(explained / "report")
    img = show(case)  # no notebook kernel here: the static montage
    assert isinstance(img, Image) and img.data[:4] == b"\x89PNG"
    assert img.data == (case / "montage.png").read_bytes()


def test_viz_show_widget_switches_maps_and_threshold(explained):
    pytest.importorskip("ipyniivue")
    from ipyniivue import NiiVue

    from medcam.viz import show

    case = explained / "Phantom_00003"
    s = json.loads((case / "summary.json").read_text())
    box = show(case, widget=True)
    (chooser, thr), nv = box.children[0].children, box.children[1]
    assert isinstance(nv, NiiVue) and nv.opts.is_radiological_convention
    spec = s["figures"]["display"]
    # the first map over its target's background with the spec's window, on the spec's scale of that map
    first_t = s["targets"][0]
    bg = spec["backgrounds"][first_t["name"]]
    sm = next(m for m in spec["maps"] if m["target"] == first_t["name"])
    names = [Path(v.path).name for v in nv.volumes]
    assert names[0] == f"image_{bg['channel']}.nii.gz" and len(names) == 2
    assert (nv.volumes[0].cal_min, nv.volumes[0].cal_max) == pytest.approx(tuple(bg["window"]))
    assert thr.max == pytest.approx(sm["scale"][1]) and nv.volumes[1].cal_max == pytest.approx(sm["scale"][1])
    first = Path(nv.volumes[1].path).name
    chooser.value = len(chooser.options) - 1
    assert Path(nv.volumes[1].path).name != first
    last = s["targets"][-1]
    last_m = list(last["heatmaps"])[-1]
    assert Path(nv.volumes[1].path) == case / last["heatmaps"][last_m]
    sm = next(m for m in spec["maps"] if (m["method"], m["target"]) == (last_m, last["name"]))
    assert nv.volumes[1].cal_max == pytest.approx(sm["scale"][1])
    thr.value = sm["scale"][1] / 2
    assert nv.volumes[1].cal_min == pytest.approx(sm["scale"][1] / 2)


_HIDE_MAP = "const o = document.getElementById('opacity'); o.value = 0; o.dispatchEvent(new Event('input'));"
_STATE = (
    "(() => { const v = window.MEDCAM_VIEWER, s = v.nv.volumes[0]; "
    "return [v.scan(), v.map(), s.name, s.cal_min, s.cal_max, v.nv.volumes.length]; })()"
)


def _colour_pixels(png: np.ndarray, rgb, tol: float = 0.12) -> int:
    return int(np.all(np.abs(png[..., :3] - np.asarray(rgb)) < tol, axis=-1).sum())


@pytest.mark.skipif(
    chromium_path() is None and not os.environ.get("CI"),
    reason="chromium is not installed (apt-get install chromium); .ci/run installs it and CI never skips this",
)
def test_viewer_outlines_each_region_over_the_targets_background(explained, tmp_path):
    """Screenshot pixels: each predicted region's outline in its own colour (each region its own layer, so nested
    BraTS regions ET in TC in WT are all seen), over the shown map's target background with the spec's window."""
    import shutil

    from medcam.io import write_seg_nrrd
    from medcam.report.build import write_report

    out = tmp_path / "out"
    shutil.copytree(explained / "Phantom_00003", out / "Phantom_00003")
    case = out / "Phantom_00003"
    ref = nib.load(str(next((case / "slicer").glob("image_t1ce.*"))))
    regions = np.zeros((3,) + ref.shape, np.uint8)  # nested boxes around the centre: WT > TC > ET
    c = [n // 2 for n in ref.shape]
    for k, half in ((1, 0.3), (0, 0.2), (2, 0.1)):
        sl = tuple(slice(ci - int(half * n), ci + int(half * n)) for ci, n in zip(c, ref.shape))
        regions[(k, *sl)] = 1
    write_seg_nrrd(regions, ref.affine, case / "slicer" / "segmentation.seg.nrrd", overwrite=True,
                   segment_names=["predicted TC", "predicted WT", "predicted ET"])  # fmt: skip
    write_report(out)
    s = json.loads((case / "summary.json").read_text())
    spec = s["figures"]["display"]
    data = _payload(out, "Phantom_00003")
    url = file_url(out / "report" / "cases" / "Phantom_00003.html")
    ready = "document.body.dataset.ready === '1'"
    on = load_page(url, ready_js=ready, value_js=_STATE, before_shot_js=_HIDE_MAP)
    off = load_page(url, ready_js=ready, before_shot_js=_HIDE_MAP + "document.getElementById('outlines').click();")
    assert on.errors == [] and off.errors == [], on.errors + off.errors
    (tmp_path / "on.png").write_bytes(on.png)
    png_on = mpimg.imread(io.BytesIO(on.png), format="png")
    png_off = mpimg.imread(io.BytesIO(off.png), format="png")
    # the first map's target background, with the window of the PNGs
    first = data["maps"][0]
    bg = spec["backgrounds"][first["target"]]
    scan, shown, name, lo, hi, n_vols = on.value
    assert (scan, shown, name) == (bg["channel"], 0, f"{bg['channel']}.nii.gz")
    assert (lo, hi) == pytest.approx(tuple(bg["window"]), rel=1e-5)
    assert n_vols == 2 + len(data["regions"])  # scan, map, one outline layer per region
    # every region's colour appears when the outlines are on, and (nearly) not when they are off; outlines, not
    # fills: the innermost box's centre is not covered by the outer regions' colours
    for r in data["regions"]:
        n_on, n_off = _colour_pixels(png_on, r["color"]), _colour_pixels(png_off, r["color"])
        assert n_on > n_off + 30, (r["label"], r["color"], n_on, n_off)
    wt, tc = (next(r for r in data["regions"] if r["label"].endswith(n))["color"] for n in ("WT", "TC"))
    filled = _colour_pixels(png_on, wt) + _colour_pixels(png_on, tc)
    assert filled < 0.025 * png_on.shape[0] * png_on.shape[1], filled  # a filled WT box covers ~10 % of the page
    # the scan is seen (grey pixels inside the views) in both
    rgb = png_off[..., :3]
    assert int((((rgb.max(-1) - rgb.min(-1)) < 0.04) & (rgb.mean(-1) > 0.15)).sum()) > 2000
