"""PNG overlays through the ROI centre."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest

from medcam.data import MedcamDataError
from medcam.io import OutputExistsError, roi_centre, save_overlay_png


def _arrays():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (30, 32, 20)).astype(np.float32)
    heat = np.zeros_like(image)
    heat[20:24, 5:9, 3:6] = 1.0
    roi = np.zeros(image.shape, bool)
    roi[10:15, 12:17, 8:13] = True
    return image, heat, roi


def test_roi_centre():
    image, heat, roi = _arrays()
    assert roi_centre(heat, roi) == (12, 14, 10)
    assert roi_centre(heat, None) == (20, 5, 3)  # first maximum of the heatmap
    ring = np.zeros((9, 9, 9), bool)
    ring[1:8, 1:8, 4] = True
    ring[2:7, 2:7, 4] = False  # hollow: centre of mass is outside the ROI -> nearest ROI voxel
    c = roi_centre(np.zeros((9, 9, 9)), ring)
    assert ring[c]


def test_save_overlay_png(tmp_path):
    image, heat, roi = _arrays()
    out = save_overlay_png(
        image, heat, roi, tmp_path / "ov.png", title="Seg-Grad-CAM | WT | decoder.3", spacing=(1.0, 1.0, 2.5), dpi=50
    )
    png = mpimg.imread(str(out))
    assert png.shape == (225, 650, 4)  # 13 x 4.5 inches at 50 dpi, RGBA
    assert png[..., :3].std() > 0.05  # not blank
    assert [p.name for p in tmp_path.iterdir()] == ["ov.png"]
    with pytest.raises(OutputExistsError):
        save_overlay_png(image, heat, roi, out, title="x")
    save_overlay_png(image, heat, None, out, title="x", overwrite=True, dpi=50)


def test_overlay_errors(tmp_path):
    image, heat, roi = _arrays()
    with pytest.raises(MedcamDataError, match=r"heatmap \(30, 32, 19\)"):
        save_overlay_png(image, heat[..., :19], roi, tmp_path / "a.png", title="x")
    with pytest.raises(MedcamDataError, match="spacing"):
        save_overlay_png(image, heat, roi, tmp_path / "a.png", title="x", spacing=(1, 1))
    assert not (tmp_path / "a.png").exists()


# ---------------------------------------------------------------------------------------------------- geometry
# A 40 x 36 x 30 grid of 2 x 2 x 3 mm in two orientations: LPS (as the BraTS/SRI24 files: i -> patient's left,
# j -> posterior) and RAS. A block is marked in the patient's RIGHT, ANTERIOR, SUPERIOR part (world coordinates),
# and must appear on the viewer's LEFT (radiological convention), at the top of axial/coronal/sagittal views
# (anterior up in axial, superior up in the others) and on the left of the sagittal view (anterior left).
SHAPE = (40, 36, 30)
SP = (2.0, 2.0, 3.0)
AFFINES = {
    "LPS": np.array([[-2.0, 0, 0, 40.0], [0, -2.0, 0, 30.0], [0, 0, 3.0, -40.0], [0, 0, 0, 1]]),
    "RAS": np.array([[2.0, 0, 0, -38.0], [0, 2.0, 0, -40.0], [0, 0, 3.0, -40.0], [0, 0, 0, 1]]),
}
# world box (mm, RAS): x (right +) in [20, 30], y (anterior +) in [10, 22], z (superior +) in [20, 32]
BOX = ((20.0, 30.0), (10.0, 22.0), (20.0, 32.0))


def _world_grid(affine):
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1).reshape(-1, 3)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    return xyz.reshape(*SHAPE, 3)


def _case(orient):
    aff = AFFINES[orient]
    xyz = _world_grid(aff)
    # "brain": an ellipsoid around the origin filling most of the field of view
    brain = ((xyz[..., 0] / 36) ** 2 + (xyz[..., 1] / 34) ** 2 + (xyz[..., 2] / 42) ** 2) < 1
    image = np.where(brain, 100.0 + 20 * np.sin(xyz[..., 0] / 5), 0.0).astype(np.float32)
    block = np.ones(SHAPE, bool)
    for a, (lo, hi) in enumerate(BOX):
        block &= (xyz[..., a] >= lo) & (xyz[..., a] <= hi)
    heat = np.where(block, 5.0, 0.0).astype(np.float32)
    return image, heat, block, aff


def _box_centre():
    return np.array([(lo + hi) / 2 for lo, hi in BOX])


@pytest.mark.parametrize("orient", ["LPS", "RAS"])
def test_planes_put_the_patients_right_on_the_viewers_left(orient):
    from medcam.io.overlays import RasVolume, plane

    image, heat, block, aff = _case(orient)
    vol = RasVolume.from_array(image, aff)
    hm = RasVolume.from_array(heat, aff).data
    assert vol.oblique == 0.0 and vol.spacing == SP
    np.testing.assert_allclose(np.diag(vol.affine)[:3], SP)  # RAS voxel order, positive steps
    centre = np.argwhere(hm > 0).mean(0).round().astype(int)
    for view in ("axial", "coronal", "sagittal"):
        p = plane(vol, view, int(centre[{"axial": 2, "coronal": 1, "sagittal": 0}[view]]), hm)
        rows, cols = np.nonzero(p.image)
        h, w = p.image.shape
        assert rows.size and cols.max() < w / 2 + 1, (view, "block must be on the viewer's left half")
        assert rows.max() < h / 2 + 1, (view, "block must be in the upper half")
        # mm extent: left edge is the largest coordinate (patient's right / anterior), bottom the smallest
        left, right, bottom, top = p.extent
        assert left > right and top > bottom
        # the block's pixel columns map back to its world interval
        col_mm = left + (np.array([cols.min(), cols.max() + 1])) * (right - left) / w
        row_mm = top - (np.array([rows.min(), rows.max() + 1])) * (top - bottom) / h
        h_axis, v_axis = {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}[view]
        assert BOX[h_axis][1] + SP[h_axis] >= col_mm[0] > col_mm[1] >= BOX[h_axis][0] - SP[h_axis]
        assert BOX[v_axis][1] + SP[v_axis] >= row_mm[0] > row_mm[1] >= BOX[v_axis][0] - SP[v_axis]


def _coloured_pixels(rgba, box):
    """(rows, cols) of strongly coloured (heatmap) pixels inside a pixel box (x0, y0, x1, y1) of the figure."""
    x0, y0, x1, y1 = box
    h = rgba.shape[0]
    sub = rgba[int(h - y1) : int(h - y0), int(x0) : int(x1), :3].astype(float) / 255
    sat = sub.max(-1) - sub.min(-1)
    r, c = np.nonzero(sat > 0.35)
    return r + int(h - y1), c + int(x0)


@pytest.mark.parametrize("orient", ["LPS", "RAS"])
def test_overlay_pixels_show_the_block_where_it_is(orient):
    """Render the real figure and find the block's coloured pixels at the pixel position of its world centre."""
    from medcam.io.overlays import ZERO_NOTE, overlay_figure

    image, heat, block, aff = _case(orient)
    fig = overlay_figure(image, heat, None, aff, title=f"{orient} case", vmin=0, vmax=10, dpi=60)  # mid-scale colour
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    axes = fig.axes[:3]
    cx, cy, cz = _box_centre()
    letters = {t.get_text() for ax in axes for t in ax.texts}
    assert {"R", "L", "A", "P", "S", "I"} <= letters and ZERO_NOTE not in letters
    for ax, (wx, wy), name in zip(axes, [(cx, cy), (cx, cz), (cy, cz)], ("axial", "coronal", "sagittal")):
        bb = ax.get_window_extent()
        rows, cols = _coloured_pixels(rgba, (bb.x0, bb.y0, bb.x1, bb.y1))
        assert rows.size > 20, name
        px, py = ax.transData.transform((wx, wy))  # display coords of the block's world centre
        exp_col, exp_row = px, rgba.shape[0] - py
        assert abs(cols.mean() - exp_col) < 4 and abs(rows.mean() - exp_row) < 4, (name, cols.mean(), exp_col)
        # and the side: left half of the panel (patient's right, or anterior in the sagittal view), upper half
        assert cols.mean() < (bb.x0 + bb.x1) / 2 and rows.mean() < rgba.shape[0] - (bb.y0 + bb.y1) / 2, name
        # axis labels say mm and the title the slice position in mm
        assert "mm" in ax.get_xlabel() and "mm" in ax.get_title()


def test_zero_map_is_drawn_as_zero_with_a_note(tmp_path):
    from medcam.io.overlays import ZERO_NOTE, overlay_figure

    image, heat, block, aff = _case("LPS")
    fig = overlay_figure(image, np.zeros_like(heat), block, aff, title="zero", dpi=50)
    notes = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert notes.count(ZERO_NOTE) == 3
    assert not [im for ax in fig.axes[:3] for im in ax.images if im.get_cmap().name.endswith("_fade")]


def test_background_window_is_the_foreground_percentiles():
    from medcam.io.overlays import foreground_window

    img = np.zeros((10, 10, 10), np.float32)
    img[2:8, 2:8, 2:8] = np.arange(216).reshape(6, 6, 6) + 1
    lo, hi = foreground_window(img)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(np.arange(216) + 1, [1, 99])))


def test_case_figures_share_one_scale_and_warn_on_zero_maps(tmp_path):
    import logging

    from medcam.io.case_figures import MapEntry, write_case_figures, zero_map_warnings

    class Keep(logging.Handler):  # on the module's logger: the CLI may stop "medcam" from propagating to root
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    image, heat, block, aff = _case("LPS")
    entries = [
        MapEntry("gradcam", "Seg-Grad-CAM", "WT", heat * 0.1, "overlays/gradcam_WT.png"),
        MapEntry("hirescam", "Seg-HiRes-Grad-CAM", "WT", heat, "overlays/hirescam_WT.png"),
        MapEntry("gradcam", "Seg-Grad-CAM", "ET", np.zeros_like(heat), "overlays/gradcam_ET.png"),
        MapEntry("hirescam", "Seg-HiRes-Grad-CAM", "ET", heat * 2, "overlays/hirescam_ET.png"),
    ]
    keep = Keep()
    log = logging.getLogger("medcam.io.case_figures")
    level = log.level
    log.addHandler(keep)
    log.setLevel(logging.WARNING)  # an earlier in-process `medcam --quiet` leaves "medcam" at ERROR
    try:
        warnings = zero_map_warnings("c1", entries)
    finally:
        log.removeHandler(keep)
        log.setLevel(level)
    assert len(warnings) == 1 and "Seg-Grad-CAM" in warnings[0] and "ET" in warnings[0]
    assert keep.messages == warnings and "zero everywhere" in warnings[0]
    info = write_case_figures(
        tmp_path,
        entries,
        case_id="c1",
        affine=aff,
        backgrounds={"flair": image, "t1ce": image * 2},
        target_background={"WT": "flair", "ET": "t1ce"},
        rois={"WT": block, "ET": None},
        roi_ml={"WT": 1.5, "ET": 0.0},
        layer="down.3",
        dpi=40,
    )
    # one scale per method, shared by its targets, never across methods
    assert info["scale"] == {"gradcam": [0.0, 0.5], "hirescam": [0.0, 10.0]}
    assert info["shared_scale"] and info["montage"] == "montage.png" and info["montage_files"]["pdf"] == "montage.pdf"
    for e in entries:
        assert (tmp_path / e.png).read_bytes()[:4] == b"\x89PNG"
    mont = mpimg.imread(str(tmp_path / "montage.png"))
    assert mont.shape[1] > mont.shape[0]  # 2 rows x (2 methods x 3 views)
    info2 = write_case_figures(
        tmp_path / "own",
        entries[:2],
        case_id="c1",
        affine=aff,
        backgrounds={"flair": image},
        target_background={"WT": "flair"},
        rois={"WT": block},
        roi_ml={"WT": 1.5},
        layer="down.3",
        shared_scale=False,
        slice_at="max",
        montage=False,
        dpi=40,
    )
    assert info2["montage"] is None and info2["slice_at"] == "max"
    assert [m["scale"] for m in info2["display"]["maps"]] == [[0.0, 0.5], [0.0, 5.0]]  # each map its own scale


def test_shared_and_own_colour_scales_in_the_figure():
    from medcam.io.overlays import overlay_figure

    image, heat, block, aff = _case("RAS")
    shared = overlay_figure(image, heat, block, aff, title="s", vmin=0, vmax=20.0, dpi=40)
    own = overlay_figure(image, heat, block, aff, title="o", dpi=40)
    cb = [ax for ax in shared.axes if ax.get_label() == "<colorbar>"]
    assert len(cb) == 1 and cb[0].get_ylim() == pytest.approx((0, 20.0))
    cb = [ax for ax in own.axes if ax.get_label() == "<colorbar>"]
    assert cb[0].get_ylim() == pytest.approx((0, 5.0))
    assert "map value" in cb[0].get_ylabel()


def test_slices_of_an_empty_roi_and_a_zero_map_go_through_the_brain():
    from medcam.io.overlays import slice_centre

    bg = np.zeros((20, 30, 10))
    bg[10:16, 4:10, 2:8] = 1
    zero = np.zeros_like(bg)
    assert slice_centre(zero, np.zeros(bg.shape, bool), "roi", bg) == (12, 6, 4)  # brain centre of mass, rounded
    assert slice_centre(zero, None, "max", None) == (10, 15, 5)
    hm = zero.copy()
    hm[3, 4, 5] = 2.0
    assert slice_centre(hm, None, "roi", bg) == (3, 4, 5) and slice_centre(hm, bg > 0, "max") == (3, 4, 5)
    assert slice_centre(hm, bg > 0, "roi") == (12, 6, 4)
    with pytest.raises(MedcamDataError, match="'roi' or 'max'"):
        slice_centre(hm, None, "middle")
