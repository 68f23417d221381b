"""BraTS case discovery (both layouts + mapping), channel order and TC/WT/ET conversion."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medcam.data import MedcamDataError, discover_brats_case, infer_label_convention, labels_to_regions, load_brats_case
from tests._data_fixtures import B23, B23_FILES, TCGA, TCGA_FILES, arrange_case, needs_real


def _data(path):
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def case2021(tmp_path_factory):
    root = tmp_path_factory.mktemp("b21")
    folder = arrange_case(TCGA, TCGA_FILES, root, "brats2021", "BraTS2021_00042")
    return folder, load_brats_case(folder, normalize=False)


@pytest.fixture(scope="module")
def case2023(tmp_path_factory):
    root = tmp_path_factory.mktemp("b23")
    folder = arrange_case(B23, B23_FILES, root, "brats2023", "BraTS-GLI-00042-000")
    return folder, load_brats_case(folder, normalize=False)


@needs_real
def test_brats2021_layout_channels_and_regions(case2021):
    folder, case = case2021
    assert case.layout == "brats2021" and case.case_id == "BraTS2021_00042"
    assert case.label_convention == "brats2021"
    assert case.reference_path == folder / "BraTS2021_00042_t1.nii.gz"
    assert case.channel_names == ("t1", "t1ce", "t2", "flair")
    assert tuple(case.image.shape) == (4, 240, 240, 155) and tuple(case.label.shape) == (3, 240, 240, 155)
    # source is LPS (affine diag(-1,-1,1)); RAS orientation flips the first two axes exactly
    for c, m in enumerate(("t1", "t1ce", "t2", "flair")):
        np.testing.assert_array_equal(case.image[c].numpy(), _data(TCGA / TCGA_FILES[m])[::-1, ::-1, :])
    np.testing.assert_allclose(case.image.affine.numpy(), [[1, 0, 0, -239], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    seg = _data(TCGA / TCGA_FILES["seg"])[::-1, ::-1, :]
    lab = case.label.numpy().astype(bool)
    np.testing.assert_array_equal(lab[0], np.isin(seg, (1, 4)))
    np.testing.assert_array_equal(lab[1], np.isin(seg, (1, 2, 4)))
    np.testing.assert_array_equal(lab[2], seg == 4)
    assert lab[2].sum() > 0


@needs_real
def test_brats2023_layout_et_is_label_3(case2023):
    folder, case = case2023
    assert case.layout == "brats2023" and case.case_id == "BraTS-GLI-00042-000"
    assert case.label_convention == "brats2023"
    assert case.reference_path.name == "BraTS-GLI-00042-000-t1n.nii.gz"
    seg = _data(B23 / B23_FILES["seg"])[::-1, ::-1, :]
    assert set(np.unique(seg)) <= {0, 1, 2, 3}
    lab = case.label.numpy().astype(bool)
    assert lab[2].sum() == (seg == 3).sum() > 0
    assert lab[0].sum() == np.isin(seg, (1, 3)).sum()
    assert lab[1].sum() == (seg > 0).sum()
    np.testing.assert_allclose(case.image[0].numpy(), _data(B23 / B23_FILES["t1"])[::-1, ::-1, :].astype(np.float32))


@needs_real
def test_mapping_with_2023_names_and_custom_channel_order(tmp_path):
    mapping = {
        "t1n": B23 / "t1n.nii.gz",
        "t1c": B23 / "t1c.nii.gz",
        "t2w": B23 / "t2w.nii.gz",
        "t2f": B23 / "t2f.nii.gz",
    }
    case = load_brats_case(mapping, channel_order=("t1ce", "t1", "t2", "flair"), normalize=False, orientation=None)
    assert case.layout == "mapping" and case.label is None
    assert case.channel_names == ("t1ce", "t1", "t2", "flair")
    assert case.reference_path == B23 / "t1n.nii.gz"  # heatmaps are written on the T1 grid
    np.testing.assert_allclose(case.image[0].numpy(), _data(B23 / "t1c.nii.gz").astype(np.float32))
    np.testing.assert_allclose(case.image[1].numpy(), _data(B23 / "t1n.nii.gz").astype(np.float32))


def test_labels_to_regions_both_conventions():
    lab21 = np.array([0, 1, 2, 4]).reshape(4, 1, 1)
    lab23 = np.array([0, 1, 2, 3]).reshape(4, 1, 1)
    expected = np.array([[0, 1, 0, 1], [0, 1, 1, 1], [0, 0, 0, 1]], bool).reshape(3, 4, 1, 1)
    np.testing.assert_array_equal(labels_to_regions(lab21, "brats2021"), expected)
    np.testing.assert_array_equal(labels_to_regions(lab23, "brats2023"), expected)
    with pytest.raises(MedcamDataError, match=r"\[4\].*brats2023"):
        labels_to_regions(lab21, "brats2023")
    with pytest.raises(MedcamDataError, match=r"\[3\].*brats2021"):
        labels_to_regions(lab23, "brats2021")


def test_infer_label_convention():
    assert infer_label_convention([0, 1, 2, 4]) == "brats2021"
    assert infer_label_convention([0, 1, 2, 3]) == "brats2023"
    assert infer_label_convention([0, 2]) == "brats2021"
    with pytest.raises(MedcamDataError, match="both 3 and 4"):
        infer_label_convention([0, 3, 4])
    with pytest.raises(MedcamDataError, match=r"\[5\]"):
        infer_label_convention([0, 5])


@needs_real
def test_missing_modality_names_expected_file(tmp_path):
    folder = arrange_case(TCGA, TCGA_FILES, tmp_path, "brats2021", "C7", skip=("flair",))
    with pytest.raises(MedcamDataError, match=r"FLAIR.*C7_flair\.nii\.gz"):
        load_brats_case(folder)
    folder23 = arrange_case(B23, B23_FILES, tmp_path, "brats2023", "X-1", skip=("t1ce",))
    with pytest.raises(MedcamDataError, match=r"T1CE.*X-1-t1c\.nii\.gz"):
        discover_brats_case(folder23)


def test_folder_errors(tmp_path):
    with pytest.raises(MedcamDataError, match="does not exist"):
        discover_brats_case(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(MedcamDataError, match=r"No BraTS case found.*_t1\.nii\.gz.*-t1n\.nii\.gz"):
        discover_brats_case(tmp_path)
    (tmp_path / "A_t1.nii.gz").write_bytes(b"")
    (tmp_path / "A-t1n.nii.gz").write_bytes(b"")
    with pytest.raises(MedcamDataError, match="mixes"):
        discover_brats_case(tmp_path)
    with pytest.raises(MedcamDataError, match="Missing modality 'flair'"):
        load_brats_case({"t1": "a", "t1ce": "b", "t2": "c"})
    with pytest.raises(MedcamDataError, match="Unknown modality name 'dwi'"):
        load_brats_case({"dwi": "a"})


@needs_real
def test_wrong_label_values_for_layout(tmp_path):
    # a 2023-named folder holding 2021 labels (4) must be refused, naming the label file
    files = dict(B23_FILES, seg=None)
    folder = arrange_case(B23, {k: v for k, v in files.items() if v}, tmp_path, "brats2023", "Y-1")
    seg = nib.load(str(B23 / B23_FILES["seg"]))
    data = np.asarray(seg.dataobj).copy()
    data[data == 3] = 4
    nib.save(nib.Nifti1Image(data, seg.affine, seg.header), str(folder / "Y-1-seg.nii.gz"))
    with pytest.raises(MedcamDataError, match=r"Y-1-seg\.nii\.gz.*\[4\]"):
        load_brats_case(folder)
