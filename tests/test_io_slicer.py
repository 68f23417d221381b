"""3D Slicer export: .seg.nrrd readable by slicerio/pynrrd with named segments, heatmaps, colour table, scene."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import nibabel as nib
import nrrd
import numpy as np
import pytest

slicerio = pytest.importorskip("slicerio")

from medcam.data import MedcamDataError, load_brats_case  # noqa: E402
from medcam.data.phantoms import write_phantom_case  # noqa: E402
from medcam.io import OutputExistsError, export_slicer_scene, safe_volume_name, write_seg_nrrd  # noqa: E402
from medcam.io.display import Ramp, heat_lut  # noqa: E402


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory):
    folder = write_phantom_case(tmp_path_factory.mktemp("ph"), seed=5, spacing_mm=3.0, layout="brats2021")
    case = load_brats_case(folder, spacing=(4.0, 4.0, 4.0))
    ref = nib.load(str(case.reference_path))
    return case, ref


def _lps(affine):
    return np.diag([-1.0, -1, 1, 1]) @ affine


def test_safe_volume_names():
    assert safe_volume_name("Seg-Grad-CAM WT") == "sgm-Grad-CAM_WT"
    assert safe_volume_name("label/TC") == "lbl_TC"
    assert safe_volume_name("ame_cam_ET") == "ame_cam_ET"


def test_export_regions_scene(phantom_case, tmp_path):
    case, ref = phantom_case
    regions = case.invert(case.label, nearest=True)
    heat = {"Seg-Grad-CAM WT": case.invert(case.image[3]), "TC": case.invert(case.image[1])}
    scene = export_slicer_scene(
        tmp_path / "case",
        image_path=case.reference_path,
        heatmaps=heat,
        segmentation=regions,
        method="seg-grad-cam",
        layer="decoder.3",
    )
    names = sorted(p.name for p in (tmp_path / "case").iterdir())
    assert names == [
        "heatmap_TC.nii.gz",
        "heatmap_sgm-Grad-CAM_WT.nii.gz",
        "image_Phantom_00005_t1.nii.gz",
        "medcam_heat.ctbl",
        "scene.mrml",
        "segmentation.seg.nrrd",
    ]
    assert not any(("seg" in n.lower() or "label" in n.lower()) for n in names if n.startswith("heatmap"))
    # segmentation: 3 overlapping regions, each its own layer, geometry = reference in LPS
    seg = slicerio.read_segmentation(str(tmp_path / "case" / "segmentation.seg.nrrd"))
    assert [s["name"] for s in seg["segments"]] == ["TC", "WT", "ET"]
    assert [s["layer"] for s in seg["segments"]] == [0, 1, 2]
    assert [s["labelValue"] for s in seg["segments"]] == [1, 1, 1]
    assert seg["segments"][2]["color"] == [1.0, 1.0, 1.0]  # the display spec's ET colour (io.display.REGION_COLOURS)
    np.testing.assert_allclose(seg["ijkToLPS"], _lps(ref.affine), atol=1e-5)
    np.testing.assert_array_equal(seg["voxels"], regions.astype(np.uint8))
    assert regions[1].sum() > regions[0].sum() > regions[2].sum() > 0  # WT > TC > ET
    data, header = nrrd.read(str(tmp_path / "case" / "segmentation.seg.nrrd"))
    assert header["kinds"] == ["list", "domain", "domain", "domain"] and data.shape == (3,) + ref.shape
    assert header["space"] == "left-posterior-superior"
    # heatmap volumes on the reference grid with the description
    hm = nib.load(str(tmp_path / "case" / "heatmap_sgm-Grad-CAM_WT.nii.gz"))
    assert hm.shape == ref.shape and hm.get_data_dtype() == np.float32
    np.testing.assert_allclose(hm.affine, ref.affine)
    assert hm.header["descrip"].item() == b"medcam seg-grad-cam target=Seg-Grad-CAM WT layer=decoder.3"
    # colour table: 256 entries, entry 0 transparent
    rows = [
        r.split() for r in (tmp_path / "case" / "medcam_heat.ctbl").read_text().splitlines() if not r.startswith("#")
    ]
    assert len(rows) == 256 and rows[0][-1] == "0" and rows[255][-1] == "255"
    # scene: every referenced file exists; slice views show image + semi-transparent heatmap with the colour table
    root = ET.parse(scene).getroot()
    files = [e.get("fileName") for e in root if e.get("fileName")]
    assert sorted(files) == sorted(n for n in names if n != "scene.mrml")
    comp = [e for e in root if e.tag == "SliceComposite"]
    assert [e.get("layoutName") for e in comp] == ["Red", "Yellow", "Green"]
    assert all(float(e.get("foregroundOpacity")) == Ramp().opacity for e in comp)  # the display spec's opacity
    vols = {e.get("id"): e for e in root if e.tag == "Volume"}
    disp = {e.get("id"): e for e in root if e.tag == "VolumeDisplay"}
    fg = vols[comp[0].get("foregroundVolumeID")]
    assert fg.get("name") == "heatmap Seg-Grad-CAM WT"
    assert disp[fg.get("displayNodeRef")].get("colorNodeID") == "vtkMRMLColorTableNodeMedcamHeat"
    assert [e.get("fileName") for e in root if e.tag == "SegmentationStorage"] == ["segmentation.seg.nrrd"]


def test_export_label_map_segments(phantom_case, tmp_path):
    case, ref = phantom_case
    label = np.asarray(nib.load(str(case.paths["seg"])).dataobj)
    assert set(np.unique(label)) == {0, 1, 2, 4}
    out = write_seg_nrrd(label, ref.affine, tmp_path / "ref.seg.nrrd")
    seg = slicerio.read_segmentation(str(out))
    assert [(s["name"], s["labelValue"], s["layer"]) for s in seg["segments"]] == [
        ("NCR", 1, 0),
        ("ED", 2, 0),
        ("ET", 4, 0),
    ]
    np.testing.assert_array_equal(seg["voxels"], label)
    ext = seg["segments"][2]["extent"]
    where = np.argwhere(label == 4)
    assert ext == [int(v) for pair in zip(where.min(0), where.max(0)) for v in pair]
    named = write_seg_nrrd(label, ref.affine, tmp_path / "named.seg.nrrd", segment_names={1: "NETC", 2: "SNFH"})
    assert [s["name"] for s in slicerio.read_segmentation(str(named))["segments"]] == ["NETC", "SNFH", "ET"]


def test_export_errors_and_overwrite(phantom_case, tmp_path):
    case, ref = phantom_case
    heat = {"WT": np.zeros(ref.shape, np.float32)}
    with pytest.raises(MedcamDataError, match="at least one heatmap"):
        export_slicer_scene(tmp_path / "a", image_path=case.reference_path, heatmaps={})
    with pytest.raises(MedcamDataError, match=r"Heatmap 'WT' has shape \(3, 3, 3\)"):
        export_slicer_scene(tmp_path / "a", image_path=case.reference_path, heatmaps={"WT": np.zeros((3, 3, 3))})
    with pytest.raises(MedcamDataError, match="Segmentation has shape"):
        export_slicer_scene(
            tmp_path / "a", image_path=case.reference_path, heatmaps=heat, segmentation=np.zeros((3, 3, 3))
        )
    assert not (tmp_path / "a").exists()
    export_slicer_scene(tmp_path / "b", image_path=case.reference_path, heatmaps=heat)
    with pytest.raises(OutputExistsError):
        export_slicer_scene(tmp_path / "b", image_path=case.reference_path, heatmaps=heat)
    export_slicer_scene(tmp_path / "b", image_path=case.reference_path, heatmaps=heat, overwrite=True)
    with pytest.raises(MedcamDataError, match="segment_names"):
        write_seg_nrrd(np.zeros((2,) + ref.shape), ref.affine, tmp_path / "x.seg.nrrd")


def test_scene_holds_every_modality_with_t1ce_as_background(phantom_case, tmp_path):
    from medcam.io.case_figures import scene_images

    case, ref = phantom_case
    imgs = scene_images(case)
    assert imgs["image_name"] == "t1ce" and set(imgs["other_images"]) == {"t1", "t2", "flair"}
    scene = export_slicer_scene(tmp_path / "s", heatmaps={"WT": case.invert(case.image[3])}, **imgs)
    files = sorted(p.name for p in (tmp_path / "s").iterdir() if p.name.startswith("image_"))
    assert files == ["image_flair.nii.gz", "image_t1.nii.gz", "image_t1ce.nii.gz", "image_t2.nii.gz"]
    for ch in ("t1", "t1ce", "t2", "flair"):  # byte copies of the original files
        assert (tmp_path / "s" / f"image_{ch}.nii.gz").read_bytes() == case.paths[ch].read_bytes()
    root = ET.parse(str(scene)).getroot()
    vols = {v.get("id"): v.get("name") for v in root.iter("Volume")}
    assert vols["vtkMRMLScalarVolumeNode1"] == "image_t1ce" and vols["vtkMRMLScalarVolumeNode2"] == "heatmap WT"
    assert sorted(vols.values()) == ["heatmap WT", "image_flair", "image_t1", "image_t1ce", "image_t2"]
    for comp in root.iter("SliceComposite"):
        assert comp.get("backgroundVolumeID") == "vtkMRMLScalarVolumeNode1"
        assert comp.get("foregroundVolumeID") == "vtkMRMLScalarVolumeNode2"
    grey = [d for d in root.iter("VolumeDisplay") if d.get("colorNodeID") == "vtkMRMLColorTableNodeGrey"]
    assert len(grey) == 4
    # an image on another grid is refused before anything is written
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(other))
    with pytest.raises(MedcamDataError, match="not on the grid"):
        export_slicer_scene(
            tmp_path / "t",
            image_path=case.reference_path,
            heatmaps={"WT": case.invert(case.image[3])},
            other_images={"x": other},
        )
    assert not (tmp_path / "t").exists()


#: The attributes vtkMRMLSegmentationDisplayNode::ReadXMLAttributes reads (Slicer/Slicer,
#: Libs/MRML/Core/vtkMRMLSegmentationDisplayNode.cxx, read with the search tool): vtkMRMLReadXML{String,Boolean,Float}Macro
#: names, compared with strcmp (case-sensitive); booleans are true only for the text "true". "visibility" is
#: vtkMRMLDisplayNode's (Libs/MRML/Core/vtkMRMLDisplayNode.cxx).
SLICER_SEGMENTATION_DISPLAY_READS = {
    "PreferredDisplayRepresentationName2D": str,
    "PreferredDisplayRepresentationName3D": str,
    "Visibility2DFill": bool,
    "Visibility2DOutline": bool,
    "Opacity3D": float,
    "Opacity2DFill": float,
    "Opacity2DOutline": float,
    "RemoveUnusedDisplayProperties": bool,
    "ClippingCapSurface": bool,
    "ClippingCapOpacity": float,
    "ClippingOutline": bool,
    "SegmentationDisplayProperties": str,
    "visibility": bool,
}
#: vtkMRMLScalarVolumeDisplayNode::ReadXMLAttributes (Libs/MRML/Core/vtkMRMLScalarVolumeDisplayNode.cxx) plus the
#: vtkMRMLDisplayNode attributes this exporter writes (visibility, colorNodeID) and the node basics.
SLICER_VOLUME_DISPLAY_READS = {
    "window", "level", "upperThreshold", "lowerThreshold", "interpolate", "invertDisplayScalarRange",
    "autoWindowLevel", "applyThreshold", "autoThreshold", "visibility", "colorNodeID", "id", "name", "references",
}  # fmt: skip


def _scene_with_display(phantom_case, tmp_path):
    """A case folder as `medcam explain` writes it: heatmaps/ once, slicer/ referencing them, a display spec."""
    case, ref = phantom_case
    hm_dir = tmp_path / "case" / "heatmaps"
    hm_dir.mkdir(parents=True)
    wt = case.invert(case.image[3]).astype(np.float32)
    wt = np.clip(wt, 0, None) * 3.0
    nib.save(nib.Nifti1Image(wt, ref.affine), str(hm_dir / "gradcam_WT.nii.gz"))
    display = {
        "cmap": "turbo",
        "ramp": {"threshold": 0.02, "full_at": 0.1, "opacity": 0.6},
        "maps": [{"method": "gradcam", "target": "WT", "stem": "gradcam_WT", "scale": [0.0, 123.0]}],
        "backgrounds": {"WT": {"channel": "t1", "window": [10.0, 20.0]}},
        "segments": [{"name": "predicted WT", "color": [0.0, 1.0, 0.0]}],
    }
    regions = case.invert(case.label, nearest=True)[1:2]
    scene = export_slicer_scene(
        tmp_path / "case" / "slicer",
        image_path=case.reference_path,
        image_name="t1",
        heatmaps={"gradcam WT": hm_dir / "gradcam_WT.nii.gz"},
        segmentation=regions,
        segment_names=["predicted WT"],
        display=display,
    )
    return scene, wt, regions


def test_scene_display_attributes_are_slicers(phantom_case, tmp_path):
    scene, _, _ = _scene_with_display(phantom_case, tmp_path)
    root = ET.parse(str(scene)).getroot()
    (sd,) = list(root.iter("SegmentationDisplay"))
    written = {k: v for k, v in sd.attrib.items() if k not in ("id", "name")}
    assert set(written) <= set(SLICER_SEGMENTATION_DISPLAY_READS), set(written) - set(SLICER_SEGMENTATION_DISPLAY_READS)
    for k, v in written.items():
        kind = SLICER_SEGMENTATION_DISPLAY_READS[k]
        if kind is bool:
            assert v in ("true", "false"), (k, v)
        elif kind is float:
            float(v)
    assert written["Visibility2DFill"] == "false" and written["Visibility2DOutline"] == "true"
    for vd in root.iter("VolumeDisplay"):
        assert set(vd.attrib) <= SLICER_VOLUME_DISPLAY_READS, set(vd.attrib) - SLICER_VOLUME_DISPLAY_READS


def test_scene_references_heatmaps_once_with_the_spec_scale(phantom_case, tmp_path):
    scene, wt, regions = _scene_with_display(phantom_case, tmp_path)
    slicer_dir = tmp_path / "case" / "slicer"
    assert not list(slicer_dir.glob("heatmap_*"))  # no second copy
    root = ET.parse(str(scene)).getroot()
    files = {e.get("id"): e.get("fileName") for e in root if e.get("fileName")}
    assert files["vtkMRMLVolumeArchetypeStorageNode2"] == "../heatmaps/gradcam_WT.nii.gz"  # relative: zippable
    # every file the scene references exists; slicerio reads its segmentation, nibabel its NIfTI volumes
    for f in files.values():
        path = slicer_dir / f
        assert path.is_file(), f
        if f.endswith(".seg.nrrd"):
            seg = slicerio.read_segmentation(str(path))
            assert seg["segments"][0]["name"] == "predicted WT" and seg["segments"][0]["color"] == [0.0, 1.0, 0.0]
            np.testing.assert_array_equal(seg["voxels"], regions.astype(np.uint8))
        elif f.endswith(".nii.gz") and "heatmaps" in f:
            np.testing.assert_allclose(np.asarray(nib.load(str(path)).dataobj), wt, rtol=1e-6)
    disp = {e.get("id"): e for e in root.iter("VolumeDisplay")}
    hm = disp["vtkMRMLScalarVolumeDisplayNode2"]
    # window/level = the spec's scale 0..123 (not the map's own range), threshold at 2 % of it
    assert float(hm.get("window")) == 123.0 and float(hm.get("level")) == 61.5
    assert float(hm.get("lowerThreshold")) == pytest.approx(0.02 * 123.0) and hm.get("applyThreshold") == "1"
    bg = disp["vtkMRMLScalarVolumeDisplayNode1"]
    assert float(bg.get("window")) == 10.0 and float(bg.get("level")) == 15.0  # the spec's window of t1
    # colour table = the PNGs' LUT (turbo with the opacity ramp in the alpha column)
    rows = [r.split() for r in (slicer_dir / "medcam_heat.ctbl").read_text().splitlines() if not r.startswith("#")]
    got = np.array([[int(v) for v in r[2:]] for r in rows])
    np.testing.assert_array_equal(got, np.rint(heat_lut("turbo", Ramp()) * 255).astype(int))
    assert float(next(root.iter("SliceComposite")).get("foregroundOpacity")) == 0.6
