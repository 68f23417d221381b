"""Generic volume loading (NIfTI, NRRD, MHA, DICOM series) and the clear errors for bad input."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from medcam.data import MedcamDataError, build_preprocessing, load_volumes
from medcam.data.loading import ras_affine_to_sitk, read_header, sitk_to_ras_affine
from tests._data_fixtures import write_nifti

SHAPE = (20, 22, 24)
# LPS-ordered axes (like BraTS) with anisotropic spacing and a non-zero origin
AFFINE = np.array([[-1.5, 0, 0, 30.0], [0, -2.0, 0, 40.0], [0, 0, 2.5, -20.0], [0, 0, 0, 1]])


def _vol(seed=0):
    rng = np.random.default_rng(seed)
    v = rng.uniform(1, 100, SHAPE).astype(np.float32)
    v[:2] = 0  # some background
    return v


def _write_sitk(path, data, affine):
    img = sitk.GetImageFromArray(np.transpose(data, (2, 1, 0)))  # sitk arrays are [z, y, x]
    spacing, origin, direction = ras_affine_to_sitk(affine)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return path


def _write_dicom_series(folder, data, affine):
    folder.mkdir()
    spacing, origin, direction = ras_affine_to_sitk(affine)
    vol = sitk.Cast(sitk.GetImageFromArray(np.transpose(data, (2, 1, 0))), sitk.sitkInt16)
    vol.SetSpacing(spacing)
    vol.SetOrigin(origin)
    vol.SetDirection(direction)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = np.array(direction).reshape(3, 3)
    for k in range(vol.GetDepth()):
        sl = vol[:, :, k]
        pos = vol.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0020|000e": "1.2.826.0.1.3680043.2.1125.1.42",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1.43",
            "0008|0060": "MR",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{p:.6f}" for p in pos),
            "0020|0037": "\\".join(f"{v:.6f}" for v in list(d[:, 0]) + list(d[:, 1])),
            "0018|0050": f"{spacing[2]:.6f}",
            "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}",
            "0008|0018": f"1.2.826.0.1.3680043.2.1125.1.44.{k + 1}",
        }
        for t, v in tags.items():
            sl.SetMetaData(t, v)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)
    return folder


def test_affine_conversion_roundtrip():
    sp, org, dirs = ras_affine_to_sitk(AFFINE)
    np.testing.assert_allclose(sp, (1.5, 2.0, 2.5))
    np.testing.assert_allclose(org, (-30.0, -40.0, -20.0))  # LPS origin = RAS origin with x, y negated
    np.testing.assert_allclose(sitk_to_ras_affine(sp, org, dirs), AFFINE)


def test_formats_load_identically_as_channels(tmp_path):
    data = _vol()
    nii = write_nifti(tmp_path / "a.nii.gz", data, AFFINE)
    nrrd_p = _write_sitk(tmp_path / "b.nrrd", data, AFFINE)
    mha = _write_sitk(tmp_path / "c.mha", data, AFFINE)
    dcm = _write_dicom_series(tmp_path / "dicom", np.rint(data), AFFINE)
    case = load_volumes([nii, nrrd_p, mha, dcm], orientation=None, normalize=False)
    assert tuple(case.image.shape) == (4,) + SHAPE
    for c in range(3):
        np.testing.assert_allclose(case.image[c].numpy(), data, rtol=1e-6)
    np.testing.assert_allclose(case.image[3].numpy(), np.rint(data))
    np.testing.assert_allclose(case.image.affine.numpy(), AFFINE, atol=1e-4)
    assert case.reference_path == nii and case.original_shape == SHAPE
    assert read_header(dcm).shape == SHAPE


def test_preprocessing_and_exact_inversion(tmp_path):
    data = _vol(1)
    nii = write_nifti(tmp_path / "a.nii.gz", data, AFFINE)
    case = load_volumes({"t1": nii}, orientation="RAS", crop_foreground=True, divisible_by=8)
    assert case.channel_names == ("t1",)
    # RAS reorientation flips axes 0 and 1; the crop removes the 2 zero planes (now at the end of axis 0); pad to /8
    assert tuple(case.image.shape) == (1, 24, 24, 24)
    img = case.image[0].numpy()
    fg = img != 0
    assert abs(img[fg].mean()) < 1e-4 and abs(img[fg].std() - 1) < 1e-2  # z-scored over non-zero voxels
    block = np.zeros(case.image.shape[1:], np.float32)
    block[5:8, 6:9, 7:10] = 1.0
    back = case.invert(block, nearest=True)
    assert back.shape == SHAPE and back.dtype == np.float32
    # world position of the block centre is preserved exactly (no resampling, only flips/crop/pad)
    src_ijk = np.argwhere(back > 0.5).mean(0)
    pre_ijk = np.argwhere(block > 0.5).mean(0)
    w_src = AFFINE @ np.r_[src_ijk, 1]
    w_pre = case.image.affine.numpy() @ np.r_[pre_ijk, 1]
    np.testing.assert_allclose(w_src, w_pre, atol=1e-6)
    assert back.sum() == 27


def test_spacing_option_validation():
    with pytest.raises(ValueError, match="spacing"):
        build_preprocessing(("image",), spacing=(1, 2))
    with pytest.raises(ValueError, match="image_key"):
        build_preprocessing(("label",))


# ---------------------------------------------------------------- bad input, each with its clear error
def test_missing_file(tmp_path):
    with pytest.raises(MedcamDataError, match=r"'.*nope\.nii\.gz' does not exist"):
        load_volumes([tmp_path / "nope.nii.gz"])


def test_shape_mismatch_names_both_files(tmp_path):
    a = write_nifti(tmp_path / "a.nii.gz", _vol(), AFFINE)
    b = write_nifti(tmp_path / "b.nii.gz", np.ones((20, 22, 23)), AFFINE)
    with pytest.raises(MedcamDataError, match=r"b\.nii\.gz' has shape \(20, 22, 23\) but '.*a\.nii\.gz' has shape"):
        load_volumes([a, b])


def test_affine_mismatch(tmp_path):
    a = write_nifti(tmp_path / "a.nii.gz", _vol(), AFFINE)
    moved = AFFINE.copy()
    moved[0, 3] += 1.0
    b = write_nifti(tmp_path / "b.nii.gz", _vol(), moved)
    with pytest.raises(MedcamDataError, match=r"(?s)b\.nii\.gz' has a different affine.*common grid"):
        load_volumes([a, b])


def test_not_3d(tmp_path):
    p = write_nifti(tmp_path / "four_d.nii.gz", np.ones(SHAPE + (2,)), AFFINE)
    with pytest.raises(MedcamDataError, match=r"four_d\.nii\.gz' has shape \(20, 22, 24, 2\).*3D"):
        load_volumes([p])
    p2 = write_nifti(tmp_path / "two_d.nii.gz", np.ones((20, 22)), AFFINE)
    with pytest.raises(MedcamDataError, match=r"two_d\.nii\.gz.*3D"):
        load_volumes([p2])


def test_all_zero_and_non_finite(tmp_path):
    z = write_nifti(tmp_path / "zero.nii.gz", np.zeros(SHAPE), AFFINE)
    with pytest.raises(MedcamDataError, match=r"zero\.nii\.gz' is all zeros"):
        load_volumes([z])
    v = _vol()
    v[3, 4, 5] = np.nan
    v[4, 4, 5] = np.inf
    n = write_nifti(tmp_path / "nan.nii.gz", v, AFFINE)
    with pytest.raises(MedcamDataError, match=r"nan\.nii\.gz' contains 2 non-finite"):
        load_volumes([n])


def test_corrupt_and_truncated_files(tmp_path):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"this is not a nifti file" * 20))
    with pytest.raises(MedcamDataError, match=r"Cannot read image file '.*garbage\.nii\.gz'"):
        load_volumes([garbage])
    good = write_nifti(tmp_path / "good.nii.gz", _vol(), AFFINE)
    raw = gzip.decompress(good.read_bytes())
    trunc = tmp_path / "truncated.nii.gz"
    trunc.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(MedcamDataError, match=r"(?s)truncated\.nii\.gz.*(corrupt|truncated)"):
        load_volumes([trunc])
    bad_nrrd = tmp_path / "bad.nrrd"
    bad_nrrd.write_text("NRRD0004\ntype: float\n")
    with pytest.raises(MedcamDataError, match=r"bad\.nrrd"):
        load_volumes([bad_nrrd])


def test_empty_dicom_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedcamDataError, match=r"empty' contains no DICOM series"):
        load_volumes([tmp_path / "empty"])


def test_invert_rejects_wrong_shape(tmp_path):
    case = load_volumes(write_nifti(tmp_path / "a.nii.gz", _vol(), AFFINE), normalize=False)
    with pytest.raises(MedcamDataError, match=r"spatial shape \(20, 22, 24\)"):
        case.invert(np.zeros((5, 5, 5)))
