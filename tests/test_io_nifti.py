"""save_heatmap: round trips on real LPS and RAS files through preprocessing (orientation + spacing) and back."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medcam.data import MedcamDataError, load_brats_case, load_volumes
from medcam.io import OutputExistsError, atomic_write, save_heatmap
from tests._data_fixtures import (
    TCGA,
    TCGA_FILES,
    arrange_case,
    needs_real,
    voxel_to_world,
    weighted_centroid,
    write_nifti,
)


def _sitk_geometry(path):
    img = sitk.ReadImage(str(path))
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def _check_same_grid_both_readers(out, src):
    a, b = nib.load(str(out)), nib.load(str(src))
    assert a.shape == b.shape
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
    so, ss = _sitk_geometry(out), _sitk_geometry(src)
    assert so[0] == ss[0]
    for x, y in zip(so[1:], ss[1:]):
        np.testing.assert_allclose(x, y, atol=1e-5)


def _roundtrip(case, tmp_path, block_slices, name):
    """Mark a block in preprocessed space, invert, save, reload; return (reloaded array, expected world centre)."""
    pre = np.zeros(case.image.shape[1:], np.float32)
    pre[block_slices] = 1.0
    centre_pre = weighted_centroid(pre)
    world_expected = voxel_to_world(case.image.affine.numpy(), centre_pre)
    back = case.invert(pre)
    out = save_heatmap(
        back, case.reference_path, tmp_path / f"{name}.nii.gz", method="seg-grad-cam", target="WT", layer="decoder.3"
    )
    _check_same_grid_both_readers(out, case.reference_path)
    img = nib.load(str(out))
    data = np.asarray(img.dataobj)
    world_got = voxel_to_world(img.affine, weighted_centroid(data))
    # same in SimpleITK's LPS world
    s = sitk.ReadImage(str(out))
    ijk = weighted_centroid(np.transpose(sitk.GetArrayFromImage(s), (2, 1, 0)))
    lps = np.array(s.TransformContinuousIndexToPhysicalPoint(ijk.tolist()))
    np.testing.assert_allclose(lps * [-1, -1, 1], world_got, atol=1e-4)
    return img, data, world_expected, world_got


@pytest.fixture(scope="module")
def real_lps_case(tmp_path_factory):
    folder = arrange_case(TCGA, TCGA_FILES, tmp_path_factory.mktemp("lps"), "brats2021", "TCGA_FG_6692")
    return load_brats_case(folder, spacing=(2.0, 2.0, 2.0))


@needs_real
def test_roundtrip_real_lps_case_with_resampling(real_lps_case, tmp_path):
    case = real_lps_case
    assert tuple(case.image.shape) == (4, 120, 120, 78)
    np.testing.assert_allclose(case.image.affine.numpy()[:3, :3], np.diag([2.0, 2.0, 2.0]))
    img, data, w_exp, w_got = _roundtrip(case, tmp_path, np.s_[40:46, 70:74, 30:35], "lps")
    assert data.shape == (240, 240, 155) and data.dtype == np.float32
    np.testing.assert_allclose(w_got, w_exp, atol=0.6)  # mm; linear interpolation 2 mm -> 1 mm
    # 2 mm voxel centres fall on every other 1 mm voxel (same origin), so linear upsampling of a block of n voxels
    # gives 2n - 1 voxels above one half along each axis
    assert int((data > 0.5).sum()) == 11 * 7 * 9
    assert float(data.max()) == pytest.approx(1.0)
    # header traps: float32, map range, fresh display range, intent, description, codes as the source (1, 2)
    h, src_h = img.header, nib.load(str(case.reference_path)).header
    assert src_h.get_data_dtype() == np.int16 and h.get_data_dtype() == np.float32
    assert float(h["cal_min"]) == pytest.approx(float(data.min())) and float(h["cal_max"]) == pytest.approx(
        float(data.max())
    )
    assert int(h["intent_code"]) == 1001 and h["intent_name"].item() == b"medcam heatmap"
    assert h["descrip"].item() == b"medcam seg-grad-cam target=WT layer=decoder.3"
    assert (
        (int(h["sform_code"]), int(h["qform_code"])) == (int(src_h["sform_code"]), int(src_h["qform_code"])) == (1, 2)
    )
    np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-5)


@needs_real
def test_roundtrip_real_label_nearest(real_lps_case):
    case = real_lps_case
    back = case.invert(case.label, nearest=True)
    assert back.shape == (3, 240, 240, 155)
    assert set(np.unique(back).tolist()) <= {0.0, 1.0}
    seg = np.asarray(nib.load(str(TCGA / TCGA_FILES["seg"])).dataobj)
    wt = seg > 0
    dice = 2 * (back[1].astype(bool) & wt).sum() / (back[1].astype(bool).sum() + wt.sum())
    assert dice > 0.9  # 1 mm -> 2 mm -> 1 mm nearest round trip of the whole tumour


@needs_real
def test_roundtrip_real_ras_source(tmp_path):
    # RAS version of a real scan (reoriented, cropped around the brain to stay fast), anisotropic target spacing
    src = nib.load(str(TCGA / TCGA_FILES["t1"]))
    ras = nib.as_closest_canonical(src).slicer[40:200, 30:210, 10:140]
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    ras_path = write_nifti(tmp_path / "t1_ras.nii.gz", np.asarray(ras.dataobj), ras.affine, dtype=np.int16)
    case = load_volumes([ras_path], orientation="LPS", spacing=(1.5, 2.0, 2.5))
    assert nib.aff2axcodes(case.image.affine.numpy()) == ("L", "P", "S")
    img, data, w_exp, w_got = _roundtrip(case, tmp_path, np.s_[50:55, 40:44, 20:24], "ras")
    assert data.shape == (160, 180, 130)
    np.testing.assert_allclose(img.affine, ras.affine, atol=1e-5)
    np.testing.assert_allclose(w_got, w_exp, atol=0.6)


@needs_real
def test_exact_voxel_position_without_resampling(tmp_path):
    case = load_volumes([TCGA / "t1.nii.gz"], orientation="RAS", normalize=False)
    pre = np.zeros(case.image.shape[1:], np.float32)
    pre[100, 60, 70] = 1.0
    back = case.invert(pre)
    out = save_heatmap(back, TCGA / "t1.nii.gz", tmp_path / "pt.nii.gz", method="m", target="t", layer="l")
    img = nib.load(str(out))
    ijk = np.argwhere(np.asarray(img.dataobj) == 1.0)
    assert ijk.tolist() == [[239 - 100, 239 - 60, 70]]  # LPS file: first two axes flipped
    np.testing.assert_allclose(
        voxel_to_world(img.affine, ijk[0]), voxel_to_world(case.image.affine.numpy(), (100, 60, 70))
    )


def _small_ref(tmp_path, dtype=np.int16, slope=None):
    aff = np.array([[-1.2, 0, 0, 50.0], [0, -1.2, 0, 60.0], [0, 0, 3.0, -10.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(np.arange(8 * 9 * 10, dtype=dtype).reshape(8, 9, 10), aff)
    img.set_sform(aff, code=2)
    img.set_qform(aff, code=0)
    if slope is not None:
        img.header.set_slope_inter(slope, 5.0)
    img.header["cal_min"], img.header["cal_max"] = 0, 4000
    path = tmp_path / "ref.nii.gz"
    nib.save(img, str(path))
    return path, aff


def test_header_traps_with_scaled_int_source(tmp_path):
    ref, aff = _small_ref(tmp_path, slope=2.0)
    hm = np.linspace(-0.25, 0.75, 8 * 9 * 10, dtype=np.float64).reshape(8, 9, 10)
    out = save_heatmap(hm, ref, tmp_path / "hm.nii.gz", method="ame-cam", target="ET", layer="enc.2")
    img = nib.load(str(out))
    h = img.header
    assert h.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(img.dataobj), hm.astype(np.float32))  # no scaling applied
    slope, inter = h.get_slope_inter()
    assert slope in (None, 1.0) and inter in (None, 0.0)
    assert float(h["cal_min"]) == pytest.approx(-0.25) and float(h["cal_max"]) == pytest.approx(0.75)
    # source had only an sform (code 2): both are written with code 2 and identical matrices
    assert (int(h["sform_code"]), int(h["qform_code"])) == (2, 2)
    np.testing.assert_allclose(img.get_qform(), aff, atol=1e-5)
    _check_same_grid_both_readers(out, ref)
    assert sitk.ReadImage(str(out)).GetPixelID() == sitk.sitkFloat32


def test_save_heatmap_errors_and_overwrite(tmp_path):
    ref, _ = _small_ref(tmp_path)
    good = np.zeros((8, 9, 10), np.float32)
    out = save_heatmap(good, ref, tmp_path / "a.nii.gz", method="m", target="t", layer="l")
    before = out.read_bytes()
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        save_heatmap(good + 1, ref, out, method="m", target="t", layer="l")
    assert out.read_bytes() == before
    save_heatmap(good + 1, ref, out, method="m", target="t", layer="l", overwrite=True)
    assert np.asarray(nib.load(str(out)).dataobj).max() == 1.0
    with pytest.raises(MedcamDataError, match=r"shape \(4, 4, 4\).*\(8, 9, 10\).*invert"):
        save_heatmap(np.zeros((4, 4, 4)), ref, tmp_path / "b.nii.gz", method="m", target="t", layer="l")
    bad = good.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(MedcamDataError, match="NaN"):
        save_heatmap(bad, ref, tmp_path / "c.nii.gz", method="m", target="t", layer="l")
    with pytest.raises(MedcamDataError, match=r"\.nii\.gz or \.nii"):
        save_heatmap(good, ref, tmp_path / "d.png", method="m", target="t", layer="l")
    with pytest.raises(MedcamDataError, match="does not exist"):
        save_heatmap(good, tmp_path / "missing.nii.gz", tmp_path / "e.nii.gz", method="m", target="t", layer="l")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "ref.nii.gz"]  # no partial/temp files


def test_atomic_write_failure_keeps_existing_file(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("original")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target, overwrite=True) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert target.read_text() == "original"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]
    with atomic_write(tmp_path / "sub" / "y.seg.nrrd") as tmp:
        assert tmp.parent == tmp_path / "sub" and tmp.name.endswith("y.seg.nrrd")
        tmp.write_text("ok")
    assert (tmp_path / "sub" / "y.seg.nrrd").read_text() == "ok"
