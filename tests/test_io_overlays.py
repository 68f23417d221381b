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
    assert png.shape == (230, 650, 4)  # 13 x 4.6 inches at 50 dpi, RGBA
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
