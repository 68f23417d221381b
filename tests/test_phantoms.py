"""Phantom generator: determinism, seed variation, geometry, labels, intensities vs real cases, layouts."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medcam.data import load_brats_case
from medcam.data.phantoms import TISSUE_INTENSITY, PhantomError, generate_phantom, template_path, write_phantom_case
from medcam.io import OutputExistsError
from tests._data_fixtures import TCGA, TCGA_FILES, needs_real

MODS = ("t1", "t1ce", "t2", "flair")


@pytest.fixture(scope="module")
def ph():
    return generate_phantom(seed=7, spacing_mm=3.0)


def test_template_files_found_without_importing_nilearn():
    import subprocess
    import sys

    p = template_path("wm")
    assert p.name == "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz" and nib.load(str(p)).shape == (197, 233, 189)
    # in a fresh interpreter: other tests in this worker may have imported nilearn through third-party packages
    code = "import sys; from medcam.data.phantoms import template_path; template_path('wm'); print('nilearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_geometry_and_labels(ph):
    assert ph.image.shape == (4, 66, 78, 63) and ph.image.dtype == np.float32
    assert ph.label.shape == (66, 78, 63)
    np.testing.assert_allclose(ph.spacing, (3.0, 3.0, 3.0))
    assert nib.aff2axcodes(ph.affine) == ("L", "P", "S")
    assert set(np.unique(ph.label).tolist()) == {0, 1, 2, 4}
    assert 10.0 <= ph.radius_mm <= 18.0
    assert np.all(ph.image[:, ~ph.brain_mask] == 0) and np.all(ph.label[~ph.brain_mask] == 0)
    # the tumour centre (world mm) lies inside the necrotic core
    ijk = np.rint(np.linalg.inv(ph.affine) @ np.r_[ph.centre_mm, 1])[:3].astype(int)
    assert ph.label[tuple(ijk)] == 1
    # RAS variant is the same volume with flipped axes and the same world positions
    ras = generate_phantom(seed=7, spacing_mm=3.0, orientation="RAS")
    np.testing.assert_array_equal(ras.label, ph.label[::-1, ::-1, :])
    np.testing.assert_allclose(ras.affine @ np.r_[0, 0, 0, 1], ph.affine @ np.r_[65, 77, 0, 1])


def test_deterministic_and_seed_dependent(ph):
    again = generate_phantom(seed=7, spacing_mm=3.0)
    np.testing.assert_array_equal(again.image, ph.image)
    other = generate_phantom(seed=8, spacing_mm=3.0)
    assert not np.allclose(other.centre_mm, ph.centre_mm)
    assert other.radius_mm != ph.radius_mm
    assert (other.label != ph.label).any()


def test_tissue_contrasts_follow_table(ph):
    wm = ph.brain_mask & (ph.label == 0)
    rel = {
        m: {v: np.median(ph.image[c][ph.label == v]) / np.median(ph.image[c][wm]) for v in (1, 2, 4)}
        for c, m in enumerate(MODS)
    }
    assert rel["t1ce"][4] > 1.3 and rel["flair"][2] > 1.5 and rel["t2"][1] > 1.5 and rel["t1"][1] < 1.0
    t = TISSUE_INTENSITY
    # enhancing tumour vs necrosis ratio in T1ce close to the table (1.70 / 0.60), despite noise and partial volume
    assert rel["t1ce"][4] / rel["t1ce"][1] == pytest.approx(t["t1ce"][5] / t["t1ce"][3], rel=0.35)


@needs_real
def test_contrast_directions_match_a_real_case(ph):
    seg = np.asarray(nib.load(str(TCGA / TCGA_FILES["seg"])).dataobj)
    for c, m in enumerate(MODS):
        real = np.asarray(nib.load(str(TCGA / TCGA_FILES[m])).dataobj).astype(np.float32)
        r_ref = np.median(real[(real > 0) & (seg == 0)])
        p_ref = np.median(ph.image[c][ph.brain_mask & (ph.label == 0)])
        for v in (1, 2, 4):  # tumour brighter or darker than normal brain in both
            r = np.median(real[seg == v]) / r_ref
            p = np.median(ph.image[c][ph.label == v]) / p_ref
            if abs(r - 1) > 0.1:
                assert np.sign(r - 1) == np.sign(p - 1), (m, v, r, p)


@pytest.mark.parametrize("layout,et,suffix", [("brats2021", 4, "_flair"), ("brats2023", 3, "-t2f")])
def test_write_case_both_layouts_loads_back(tmp_path, layout, et, suffix):
    folder = write_phantom_case(tmp_path, seed=3, spacing_mm=3.0, layout=layout)
    seg_name = next(p for p in folder.iterdir() if "seg" in p.name)
    seg = np.asarray(nib.load(str(seg_name)).dataobj)
    assert set(np.unique(seg).tolist()) == {0, 1, 2, et}
    assert any(p.name.endswith(f"{suffix}.nii.gz") for p in folder.iterdir())
    t1 = nib.load(str(next(p for p in folder.iterdir() if p.name.endswith(("_t1.nii.gz", "-t1n.nii.gz")))))
    assert t1.get_data_dtype() == np.int16 and int(t1.header["sform_code"]) == 1
    case = load_brats_case(folder, normalize=False)
    assert case.layout == layout and case.label_convention == layout
    assert int(case.label[2].sum()) == int((seg == et).sum()) > 0
    with pytest.raises(OutputExistsError):
        write_phantom_case(tmp_path, seed=3, spacing_mm=3.0, layout=layout)


def test_bad_parameters(tmp_path):
    with pytest.raises(PhantomError, match="spacing_mm"):
        generate_phantom(spacing_mm=0.1)
    with pytest.raises(PhantomError, match="orientation"):
        generate_phantom(orientation="XYZ")
    with pytest.raises(PhantomError, match="layout"):
        write_phantom_case(tmp_path, layout="brats2019")
