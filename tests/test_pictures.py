"""Issue 28: pictures that tell the truth at a glance. Pixels of the written PNGs, not just files.

One display spec per case (:mod:`medcam.io.display`): a small-valued method is seen in its PNG and montage panel,
the montage honours the scale option, each map is cut at its own maximum with ``slice_at="max"``, the grey window
keeps a bright lesion readable, and the layout fixes (zero note clear of the letters, no empty insertion panel).
"""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest

from medcam.io.case_figures import MapEntry, write_case_figures
from medcam.io.display import (
    VISIBLE_FRACTION,
    Ramp,
    heat_lut,
    lesion_window,
    map_scales,
    spec_from_json,
)

SHAPE = (40, 48, 36)
AFF = np.diag([2.0, 2.0, 2.0, 1.0])
AFF[:3, 3] = [-40.0, -48.0, -36.0]


def _blob(centre, sigma=4.0):
    idx = np.indices(SHAPE).astype(np.float32)
    d2 = sum((idx[a] - c) ** 2 for a, c in enumerate(centre))
    return np.exp(-d2 / (2 * sigma**2)).astype(np.float32)


def _brain():
    idx = np.indices(SHAPE).astype(np.float32)
    c = [(n - 1) / 2 for n in SHAPE]
    inside = sum(((idx[a] - c[a]) / (0.45 * SHAPE[a])) ** 2 for a in range(3)) < 1
    return np.where(inside, 100.0 + 10 * np.sin(idx[0] / 3), 0.0).astype(np.float32)


def _write(tmp_path, entries, **kw):
    targets = list(dict.fromkeys(e.target for e in entries))
    return write_case_figures(
        tmp_path,
        entries,
        case_id="c1",
        affine=AFF,
        backgrounds={"flair": _brain()},
        target_background={t: "flair" for t in targets},
        rois={t: None for t in targets},
        roi_ml={t: 0.0 for t in targets},
        layer="down.3",
        dpi=50,
        montage_formats=("png",),
        **kw,
    )


def _coloured(rgb: np.ndarray) -> int:
    """Pixels of heatmap colour: saturated (the scan is grey, letters and captions white/black)."""
    rgb = rgb[..., :3].astype(float)
    return int(((rgb.max(-1) - rgb.min(-1)) > 0.2).sum())


def _reddish(rgb: np.ndarray) -> int:
    """Pixels of the top of the turbo scale (dark red / orange-red) drawn over grey."""
    rgb = rgb[..., :3].astype(float)
    return int(((rgb[..., 0] - np.maximum(rgb[..., 1], rgb[..., 2])) > 0.2).sum())


def _views(png: np.ndarray) -> np.ndarray:
    """The three views of an overlay PNG (left of the colour bar, below the title)."""
    h, w = png.shape[:2]
    return png[int(0.12 * h) : int(0.92 * h), : int(0.74 * w)]


def _panel(png: np.ndarray, box) -> np.ndarray:
    h, w = png.shape[:2]
    x0, y0, x1, y1 = box
    return png[int(y0 * h) : int(y1 * h), int(x0 * w) : int(x1 * w)]


def test_a_small_valued_method_is_seen_in_its_png_and_montage_panel(tmp_path):
    g_wt, g_et = _blob((12, 30, 18)), _blob((26, 18, 20))
    entries = [
        MapEntry("gradcam", "Seg-Grad-CAM", "WT", 0.5 * g_wt, "overlays/gradcam_WT.png"),
        MapEntry("hirescam", "Seg-HiRes-Grad-CAM", "WT", 58.9 * g_wt, "overlays/hirescam_WT.png"),
        MapEntry("gradcam", "Seg-Grad-CAM", "ET", 0.2 * g_et, "overlays/gradcam_ET.png"),
        MapEntry("hirescam", "Seg-HiRes-Grad-CAM", "ET", 7.5 * g_et, "overlays/hirescam_ET.png"),
    ]
    info = _write(tmp_path, entries)
    spec = info["display"]
    # scales per method, never across methods; hirescam ET (7.5 < 25 % of 58.9) on its own scale
    assert info["scale"] == {"gradcam": [0.0, pytest.approx(0.5)], "hirescam": [0.0, pytest.approx(58.9)]}
    own = {(m["method"], m["target"]): m["own_scale"] for m in spec["maps"]}
    assert own == {
        ("gradcam", "WT"): False,
        ("hirescam", "WT"): False,
        ("gradcam", "ET"): False,
        ("hirescam", "ET"): True,
    }
    for e in entries:
        png = mpimg.imread(str(tmp_path / e.png))
        assert _coloured(_views(png)) > 100, e.png
    mont = mpimg.imread(str(tmp_path / "montage.png"))
    assert mont.shape[1] >= 2000  # 300 dpi
    for key, box in info["montage_panels"].items():
        assert _coloured(_panel(mont, box)) > 200, key
    # the test can fail: the same Seg-Grad-CAM map on one case-wide scale (0..58.9, the old default) shows nothing
    from medcam.io.overlays import overlay_figure

    fig = overlay_figure(_brain(), 0.5 * g_wt, None, AFF, title="old", vmin=0.0, vmax=58.9, dpi=50)
    fig.canvas.draw()
    old = np.asarray(fig.canvas.buffer_rgba()) / 255.0
    assert _coloured(_views(old)) == 0


def test_the_montage_honours_the_scale_option(tmp_path):
    g_wt, g_et = _blob((12, 30, 18)), _blob((26, 18, 20))
    entries = [
        MapEntry("hirescam", "Seg-HiRes-Grad-CAM", "WT", 10.0 * g_wt, "overlays/hirescam_WT.png"),
        MapEntry("hirescam", "Seg-HiRes-Grad-CAM", "ET", 4.0 * g_et, "overlays/hirescam_ET.png"),
    ]
    shared = _write(tmp_path / "shared", entries)
    own = _write(tmp_path / "own", entries, shared_scale=False)
    m_sh = mpimg.imread(str(tmp_path / "shared" / "montage.png"))
    m_own = mpimg.imread(str(tmp_path / "own" / "montage.png"))
    et_sh = _panel(m_sh, shared["montage_panels"]["ET/hirescam"])
    et_own = _panel(m_own, own["montage_panels"]["ET/hirescam"])
    wt_sh = _panel(m_sh, shared["montage_panels"]["WT/hirescam"])
    # shared: ET's maximum is 40 % of the method's scale (no red); its own scale reaches the top colour
    assert _reddish(wt_sh) > 50 and _reddish(et_sh) == 0 and _reddish(et_own) > 50
    assert [m["scale"] for m in shared["display"]["maps"]] == [[0.0, 10.0], [0.0, 10.0]]
    assert [m["scale"] for m in own["display"]["maps"]] == [[0.0, 10.0], [0.0, 4.0]]
    assert own["display"]["scale_mode"] == "picture" and not own["shared_scale"]
    # the overlay PNG of ET follows the same option
    o_sh = _views(mpimg.imread(str(tmp_path / "shared" / "overlays" / "hirescam_ET.png")))
    o_own = _views(mpimg.imread(str(tmp_path / "own" / "overlays" / "hirescam_ET.png")))
    assert _reddish(o_sh) == 0 and _reddish(o_own) > 20


def test_slice_at_max_cuts_each_map_at_its_own_maximum(tmp_path):
    a, b = _blob((10, 12, 10)), _blob((30, 36, 26))
    entries = [
        MapEntry("gradcam", "Seg-Grad-CAM", "WT", a, "overlays/gradcam_WT.png"),
        MapEntry("hirescam", "Seg-HiRes-Grad-CAM", "WT", b, "overlays/hirescam_WT.png"),
    ]
    info = _write(tmp_path / "max", entries, slice_at="max", montage=False)
    for m, arr in zip(info["display"]["maps"], (a, b)):
        ijk = np.unravel_index(int(np.argmax(arr)), arr.shape)
        np.testing.assert_allclose(m["centre_mm"], (AFF @ np.r_[ijk, 1.0])[:3])
    info = _write(tmp_path / "mm", entries, slice_at="-10,2,4", montage=False)
    assert all(m["centre_mm"] == [-10.0, 2.0, 4.0] for m in info["display"]["maps"])
    from medcam.data.loading import MedcamDataError

    with pytest.raises(MedcamDataError, match="x,y,z"):
        _write(tmp_path / "bad", entries, slice_at="middle", montage=False)


def test_lesion_window_does_not_saturate_the_lesion():
    rng = np.random.default_rng(0)
    img = np.zeros((60, 60, 60), np.float32)
    brain = np.zeros_like(img, bool)
    brain[5:55, 5:55, 5:55] = True
    img[brain] = rng.normal(100, 8, brain.sum())
    lesion = np.zeros_like(brain)
    lesion[25:33, 25:33, 25:33] = True  # 0.4 % of the brain, bright as FLAIR oedema
    img[lesion] = rng.normal(220, 15, lesion.sum())
    from medcam.io.overlays import foreground_window

    _, hi_old = foreground_window(img)
    lo, hi = lesion_window(img, lesion)
    assert np.mean(img[lesion] > hi) <= 0.006
    assert lo == pytest.approx(np.percentile(img[brain], 1))
    # without the lesion the brain's 99th percentile (no lesion to protect)
    assert lesion_window(img)[1] == pytest.approx(hi_old)


def test_spec_round_trip_scales_and_lut(tmp_path):
    scales = map_scales([("a", 10.0), ("a", 1.0), ("b", 0.0), ("a", 2.6)], "method")
    assert scales == [((0.0, 10.0), False), ((0.0, 1.0), True), ((0.0, 1.0), False), ((0.0, 10.0), False)]
    assert VISIBLE_FRACTION == 0.25
    lut = heat_lut("turbo", Ramp(0.02, 0.1, 0.6))
    x = np.linspace(0, 1, 256)
    assert np.all(lut[x < 0.02, 3] == 0) and np.all(lut[x >= 0.1, 3] == 1)
    entries = [MapEntry("m", "M", "WT", _blob((20, 24, 18)), "overlays/m_WT.png")]
    info = write_case_figures(
        tmp_path,
        entries,
        case_id="c",
        affine=AFF,
        backgrounds={"flair": _brain()},
        target_background={"WT": "flair"},
        rois={"WT": None},
        roi_ml={"WT": 0.0},
        layer="l",
        montage=False,
        dpi=30,
    )
    spec = spec_from_json(info["display"])
    assert spec.maps[0].scale == (0.0, pytest.approx(1.0)) and spec.unit == "score units per voxel"
    assert spec.to_json()["lut"] == info["display"]["lut"]


def test_zero_note_stays_clear_of_the_orientation_letters():
    from medcam.io.overlays import ZERO_NOTE, overlay_figure

    fig = overlay_figure(_brain(), np.zeros(SHAPE, np.float32), None, AFF, title="zero", dpi=60)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    for ax in fig.axes[:3]:
        notes = [t for t in ax.texts if t.get_text() == ZERO_NOTE]
        letters = [t for t in ax.texts if t.get_text() in tuple("RLAPSI")]
        assert len(notes) == 1 and len(letters) == 4
        box = notes[0].get_window_extent(r)
        assert not any(box.overlaps(t.get_window_extent(r)) for t in letters)


def test_deletion_plot_has_no_empty_insertion_panel(tmp_path):
    from medcam.evaluation import EvaluationResult, write_results

    res = EvaluationResult()
    res.curves[("c", "gradcam", "l", "WT", "deletion")] = ([0.0, 0.5, 1.0], [1.0, 0.5, 0.1])
    only = write_results(res, tmp_path / "d")
    res.curves[("c", "gradcam", "l", "WT", "insertion")] = ([0.0, 0.5, 1.0], [0.1, 0.5, 1.0])
    both = write_results(res, tmp_path / "b")
    w_only = mpimg.imread(str(only["curves"])).shape[1]
    w_both = mpimg.imread(str(both["curves"])).shape[1]
    assert w_both > 1.7 * w_only  # two panels vs one
