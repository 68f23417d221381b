"""DICOM in and out (issue 26): series checks, a PACS round trip over DICOMweb with a real Orthanc, and the DICOM
objects checked by dciodvfy, against the NIfTI heatmaps (SimpleITK geometry), the regions and the overlays."""

from __future__ import annotations

import json
import socket
import threading
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from click.testing import CliRunner
from pydicom.uid import generate_uid

from medcam.cli import main
from medcam.data.loading import MedcamDataError, load_channels, read_header
from tests._data_fixtures import needs_real
from tests._dicom_helpers import case_series, dciodvfy_errors, nifti_to_series, orthanc_server

PM_CLASS, SEG_CLASS, SC_CLASS = (
    "1.2.840.10008.5.1.4.1.1.30",
    "1.2.840.10008.5.1.4.1.1.66.4",
    "1.2.840.10008.5.1.4.1.1.7",
)


# ---------------------------------------------------------------------------------------------------- series checks
def _tiny_series(tmp: Path, name: str = "s", affine=None) -> Path:
    rng = np.random.default_rng(0)
    data = rng.uniform(1, 100, (8, 7, 6)).astype(np.float32)
    nii = tmp / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 2.0, 1.0]) if affine is None else affine), str(nii))
    folder = tmp / name
    nifti_to_series(nii, folder, study_uid=generate_uid(), frame_uid=generate_uid(), description=name)
    return folder


def _edit(path: Path, **changes) -> None:
    ds = pydicom.dcmread(path)
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.save_as(path)


def test_regular_series_header_matches_nifti(tmp_path):
    folder = _tiny_series(tmp_path)
    h = read_header(folder)
    assert h.shape == (8, 7, 6)
    np.testing.assert_allclose(h.affine, np.diag([-1.0, -1.0, 2.0, 1.0]), atol=1e-6)


@pytest.mark.parametrize(
    "defect, needle",
    [
        ("duplicate", "duplicate slices"),
        ("missing", "missing 1 slice"),
        ("nonuniform", "non-uniform slice spacing"),
        ("tilt", "gantry tilt"),
        ("tilt_tag", "gantry tilt of 12"),
        ("two_series", "holds 2 DICOM series"),
        ("multiframe", "enhanced multi-frame"),
        ("mixed_orientation", "mixes slice orientations"),
        ("empty", "contains no DICOM series"),
    ],
)
def test_bad_series_refused_from_headers(tmp_path, defect, needle):
    folder = _tiny_series(tmp_path)
    files = sorted(folder.glob("*.dcm"))
    pos = [list(map(float, pydicom.dcmread(f).ImagePositionPatient)) for f in files]
    if defect == "duplicate":
        ds = pydicom.dcmread(files[2])
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(folder / "copy.dcm")
    elif defect == "missing":
        files[3].unlink()
    elif defect == "nonuniform":
        for f, p in zip(files[3:], pos[3:]):
            _edit(f, ImagePositionPatient=[p[0], p[1], p[2] + 0.5])
    elif defect == "tilt":
        for k, (f, p) in enumerate(zip(files, pos)):
            _edit(f, ImagePositionPatient=[p[0], p[1] + 0.6 * k, p[2]])
    elif defect == "tilt_tag":
        for f in files:
            _edit(f, GantryDetectorTilt=12)
    elif defect == "two_series":
        _edit(files[0], SeriesInstanceUID=generate_uid())
    elif defect == "multiframe":
        for f in files[1:]:
            f.unlink()
        _edit(files[0], NumberOfFrames=6)
    elif defect == "mixed_orientation":
        _edit(files[1], ImageOrientationPatient=[0, 1, 0, 1, 0, 0])
    elif defect == "empty":
        for f in files:
            f.unlink()
        (folder / "README.txt").write_text("not dicom")
    with pytest.raises(MedcamDataError, match=needle):
        read_header(folder)


def test_channels_with_different_orientations_refused(tmp_path):
    a = _tiny_series(tmp_path, "a")
    swapped = np.array([[0.0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]])
    b = _tiny_series(tmp_path, "b", affine=swapped)
    with pytest.raises(MedcamDataError, match="orientation"):
        load_channels([a, b])


# ---------------------------------------------------------------------------------------------------- round trip
def _upload(web: str, folders) -> None:
    rest = web.rsplit("/dicom-web", 1)[0]
    for folder in folders.values():
        for f in sorted(folder.glob("*.dcm")):
            req = urllib.request.Request(rest + "/instances", data=f.read_bytes(), method="POST")
            urllib.request.urlopen(req, timeout=30).read()


def _explain(args):
    return CliRunner().invoke(main, ["explain", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory):
    """The small real case as four MR series on a real Orthanc, explained from DICOMweb with --store."""
    root = tmp_path_factory.mktemp("dicomweb")
    with orthanc_server(root / "orthanc") as web:
        nifti, folders, study = case_series(root / "case")
        _upload(web, folders)
        out = root / "out"
        args = [f"dicomweb:{web}/studies/{study}", "-o", str(out), "--store", "--device", "cpu", "--no-png", "-q"]
        result = _explain(args)
        assert result.exit_code == 0, result.output
        yield {"web": web, "study": study, "out": out, "case": out / study, "nifti": nifti, "args": args,
               "first": result.output}  # fmt: skip


def _client(web):
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(url=web)


def _summary(rt):
    return json.loads((rt["case"] / "summary.json").read_text())


@needs_real
def test_outputs_stored_and_fetched_back(roundtrip):
    rec = _summary(roundtrip)["dicom"]
    client = _client(roundtrip["web"])
    kinds = {}
    for o in rec["objects"]:
        kinds.setdefault(o["sop_class"], set()).add(o["series"])
    assert len(kinds[PM_CLASS]) == 3 and len(kinds[SEG_CLASS]) == 1 and len(kinds[SC_CLASS]) == 3
    for o in rec["objects"][:4] + rec["objects"][-2:]:
        ds = client.retrieve_instance(roundtrip["study"], o["series"], o["sop"])
        local = pydicom.dcmread(roundtrip["case"] / "dicom" / o["path"])
        assert ds.SOPInstanceUID == o["sop"] and ds.StudyInstanceUID == roundtrip["study"]
        assert np.array_equal(ds.pixel_array, local.pixel_array)
    assert f"stored {len(rec['objects'])} DICOM object(s)" in roundtrip["first"]


@needs_real
def test_rerun_skips_case_and_stores_no_duplicates(roundtrip):
    client = _client(roundtrip["web"])
    before = len(client.search_for_instances(roundtrip["study"]))
    result = _explain(roundtrip["args"])
    assert result.exit_code == 0, result.output
    assert "1 skipped" in result.output and "stored 0 DICOM object(s)" in result.output
    assert len(client.search_for_instances(roundtrip["study"])) == before


@needs_real
def test_every_object_passes_dciodvfy(roundtrip):
    files = sorted((roundtrip["case"] / "dicom").rglob("*.dcm"))
    assert len(files) == 3 + 1 + 3 * 48
    for f in files:
        assert dciodvfy_errors(f) == [], f


def _frame_index(ds, item, nifti) -> int:
    """Slice index k of a frame in the NIfTI grid, from its ImagePositionPatient (LPS)."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ nifti.affine
    ipp = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
    ijk = np.linalg.solve(lps[:3, :3], ipp - lps[:3, 3])
    assert np.allclose(ijk[:2], 0, atol=1e-3) and abs(ijk[2] - round(ijk[2])) < 1e-3
    return int(round(ijk[2]))


def _sitk_from_pm(ds) -> sitk.Image:
    """A Parametric Map (read with pydicom: GDCM reads no float frames) as a SimpleITK image with its DICOM
    geometry: origin = first frame's position, directions from ImageOrientationPatient, spacing from PixelSpacing
    and the frame positions (frames sorted along the slice normal)."""
    frames = ds.pixel_array.astype(np.float32)  # [frames, rows, cols]
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    pos = np.array([[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
                    for f in ds.PerFrameFunctionalGroupsSequence])  # fmt: skip
    order = np.argsort(pos @ np.cross(iop[:3], iop[3:]))  # frames in any order in the file: sort along the normal
    frames, pos = frames[order], pos[order]
    step = pos[1] - pos[0]
    rows_mm, cols_mm = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    img = sitk.GetImageFromArray(frames)
    img.SetSpacing((cols_mm, rows_mm, float(np.linalg.norm(step))))
    img.SetOrigin(tuple(pos[0]))
    img.SetDirection(tuple(np.column_stack([iop[:3], iop[3:], step / np.linalg.norm(step)]).ravel()))
    return img


@needs_real
@pytest.mark.parametrize("target", ["ET", "TC", "WT"])
def test_parametric_map_equals_nifti_heatmap(roundtrip, target):
    ds = pydicom.dcmread(roundtrip["case"] / "dicom" / f"pm_hirescam_{target}.dcm")
    assert ds.SOPClassUID == PM_CLASS and "FloatPixelData" in ds
    cache = roundtrip["out"] / ".dicomweb" / roundtrip["study"]
    t1_uid = (cache / "manifest.csv").read_text().splitlines()[1].split(",")[1]  # columns case_id,t1,t1ce,t2,flair
    t1 = pydicom.dcmread(next((cache / t1_uid).glob("*.dcm")))
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == t1.SeriesInstanceUID
    assert ds.FrameOfReferenceUID == t1.FrameOfReferenceUID and ds.StudyInstanceUID == t1.StudyInstanceUID
    assert ds.SeriesInstanceUID != t1.SeriesInstanceUID and ds.Manufacturer == "medcam"
    nii = sitk.ReadImage(str(roundtrip["case"] / "heatmaps" / f"hirescam_{target}.nii.gz"), sitk.sitkFloat32)
    pm = _sitk_from_pm(ds)
    np.testing.assert_allclose(pm.GetOrigin(), nii.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(pm.GetDirection(), nii.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(pm.GetSpacing(), nii.GetSpacing(), atol=1e-5)
    on_grid = sitk.Resample(pm, nii, sitk.Transform(), sitk.sitkNearestNeighbor, -1.0)
    a, b = sitk.GetArrayFromImage(on_grid), sitk.GetArrayFromImage(nii)
    assert b.max() > 0 and np.array_equal(a, b)
    rwvm = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert float(rwvm.RealWorldValueSlope) == 1.0 and float(rwvm.RealWorldValueIntercept) == 0.0
    assert float(rwvm.DoubleFloatRealWorldValueLastValueMapped) == pytest.approx(float(b.max()))


@needs_real
def test_seg_segments_equal_the_regions(roundtrip):
    import nrrd

    ds = pydicom.dcmread(roundtrip["case"] / "dicom" / "seg.dcm")
    labels = [s.SegmentLabel for s in ds.SegmentSequence]
    assert labels == ["predicted TC", "predicted WT", "predicted ET", "ROI TC", "ROI WT", "ROI ET"]
    nifti = nib.load(str(roundtrip["nifti"]["t1"]))
    vol = np.zeros((len(labels), *nifti.shape), dtype=np.uint8)
    pixels = ds.pixel_array
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        n = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        vol[n - 1, :, :, _frame_index(ds, item, nifti)] = pixels[i].T
    seg, header = nrrd.read(str(roundtrip["case"] / "slicer" / "segmentation.seg.nrrd"))  # the scene's regions
    assert seg.shape == (3, *nifti.shape) and header["Segment2_Name"] == "predicted ET"
    predicted = vol[:3]
    assert all(int(v.sum()) > 0 for v in predicted)
    np.testing.assert_array_equal(predicted, (seg > 0).astype(np.uint8))
    np.testing.assert_array_equal(vol[3:], vol[:3])  # default targets: the ROI is the predicted region
    assert [int(v.sum()) for v in predicted] == list(_summary(roundtrip)["predicted_voxels"].values())


@needs_real
def test_secondary_capture_shows_the_map_where_the_nifti_has_it(roundtrip):
    hm = nib.load(str(roundtrip["case"] / "heatmaps" / "hirescam_WT.nii.gz")).get_fdata()
    files = sorted((roundtrip["case"] / "dicom" / "sc_hirescam_WT").glob("*.dcm"))
    assert len(files) == hm.shape[2]
    hot = cold = 0
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        assert ds.SOPClassUID == SC_CLASS and ds.PhotometricInterpretation == "RGB"
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID
        rgb = ds.pixel_array.astype(int)  # [rows, cols, 3]
        grey = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
        m = hm[:, :, k].T
        assert grey[m == 0].all()
        strong = m >= 0.1 * hm.max()
        assert not grey[strong].any()
        hot, cold = hot + int(strong.sum()), cold + int((m == 0).sum())
    assert hot > 0 and cold > 0


# ---------------------------------------------------------------------------------------------------- errors
def test_server_down_is_one_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(main, ["explain", f"dicomweb:http://127.0.0.1:{port}/dicom-web/studies/1.2.3", "-o",
                                       str(tmp_path / "o")])  # fmt: skip
    assert result.exit_code == 1
    assert "cannot reach the DICOMweb server" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_server_timeout_is_one_clear_error(tmp_path):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)  # accepts connections, never answers
    port = srv.getsockname()[1]
    try:
        result = CliRunner().invoke(main, ["explain", f"dicomweb:http://127.0.0.1:{port}/dicom-web/studies/1.2.3",
                                           "-o", str(tmp_path / "o"), "--dicomweb-timeout", "1"])  # fmt: skip
    finally:
        srv.close()
    assert result.exit_code == 1 and "did not answer in time" in result.output


def test_http_errors_are_clear(tmp_path):
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(401 if "auth" in self.path else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        for root, needle in (("auth", "HTTP 401"), ("x", "HTTP 503")):
            url = f"dicomweb:http://127.0.0.1:{httpd.server_port}/{root}/studies/1.2.3"
            result = CliRunner().invoke(main, ["explain", url, "-o", str(tmp_path / "o")])
            assert result.exit_code == 1 and needle in result.output, result.output
    finally:
        httpd.shutdown()


def test_bad_dicomweb_url_and_store_without_dicomweb(tmp_path):
    result = CliRunner().invoke(main, ["explain", "dicomweb:http://h/dicom-web/nothing", "-o", str(tmp_path)])
    assert result.exit_code == 1 and "is not a DICOMweb input" in result.output
    result = CliRunner().invoke(main, ["explain", str(tmp_path), "--store"])
    assert result.exit_code == 2 and "need a dicomweb: input" in result.output


@needs_real
def test_dicom_out_on_writes_a_new_study_for_a_nifti_case(tmp_path):
    """Image files + --dicom-out on: the scan becomes a new-study MR series and the objects derive from it."""
    from tests._dicom_helpers import small_case

    nifti = small_case(tmp_path / "nifti")
    files = [str(nifti[m]) for m in ("t1", "t1ce", "t2", "flair")]
    out = tmp_path / "o"
    args = [*files, "-o", str(out), "--dicom-out", "on", "--no-png", "--no-slicer", "--device", "cpu", "-q"]
    result = _explain(args)
    assert result.exit_code == 0, result.output
    case = next(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
    rec = json.loads((case / "summary.json").read_text())["dicom"]
    assert rec["new_study"] is True and len({o["study"] for o in rec["objects"]}) == 1
    source = sorted((case / "dicom" / "source").glob("*.dcm"))
    assert len(source) == 48 and read_header(case / "dicom" / "source").shape == (64, 64, 48)
    np.testing.assert_allclose(read_header(case / "dicom" / "source").affine, nib.load(files[0]).affine, atol=1e-5)
    pm = pydicom.dcmread(case / "dicom" / "pm_hirescam_WT.dcm")
    assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(source[0]).SeriesInstanceUID
    nii = sitk.ReadImage(str(case / "heatmaps" / "hirescam_WT.nii.gz"), sitk.sitkFloat32)
    on_grid = sitk.Resample(_sitk_from_pm(pm), nii, sitk.Transform(), sitk.sitkNearestNeighbor, -1.0)
    assert np.array_equal(sitk.GetArrayFromImage(on_grid), sitk.GetArrayFromImage(nii))
    for f in (source[0], source[-1], case / "dicom" / "pm_hirescam_WT.dcm", case / "dicom" / "seg.dcm",
              case / "dicom" / "sc_hirescam_WT" / "0001.dcm"):  # fmt: skip
        assert dciodvfy_errors(f) == [], f


def _series_record(uid: str, description: str) -> dict:
    return {"0020000E": {"vr": "UI", "Value": [uid]}, "0008103E": {"vr": "LO", "Value": [description]}}


def test_channels_matched_by_series_description_or_given():
    from medcam.io.dicomweb import DicomwebError, match_channels

    study = [
        _series_record(f"1.{i}", d) for i, d in enumerate(["AX T1 post Gd", "T2W tse", "t1n 3D", "T2-FLAIR", "loc"])
    ]
    assert match_channels(study) == {"t1": "1.2", "t1ce": "1.0", "t2": "1.1", "flair": "1.3"}
    with pytest.raises(DicomwebError, match="flair: none"):
        match_channels(study[:3])
    with pytest.raises(DicomwebError, match="ambiguous"):
        match_channels([*study, _series_record("1.9", "t2 repeat")])
    assert match_channels(study[:1], {"t1": "9.9"}) == {"t1": "9.9"}


@pytest.mark.parametrize("how", ["token", "basic"])
def test_auth_is_sent_as_dicomweb_clients_send_it(tmp_path, how):
    import base64
    from http.server import BaseHTTPRequestHandler, HTTPServer

    want = "Bearer s3cret" if how == "token" else "Basic " + base64.b64encode(b"alice:pw").decode()
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(self.headers.get("Authorization"))
            ok = self.headers.get("Authorization") == want
            self.send_response(200 if ok else 401)
            self.send_header("Content-Type", "application/dicom+json")
            self.end_headers()
            if ok:
                self.wfile.write(b"[]")

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    opts = (
        ["--dicomweb-token", "s3cret"] if how == "token" else ["--dicomweb-user", "alice", "--dicomweb-password", "pw"]
    )
    try:
        url = f"dicomweb:http://127.0.0.1:{httpd.server_port}/dicom-web/studies/1.2.3"
        result = CliRunner().invoke(main, ["explain", url, "-o", str(tmp_path / "o"), *opts])
    finally:
        httpd.shutdown()
    assert seen and seen[0] == want
    assert result.exit_code == 1 and "study 1.2.3 has no series" in result.output, result.output


@needs_real
def test_one_series_url_fetches_that_series_as_one_channel(roundtrip, tmp_path):
    from medcam.io.dicomweb import Auth, fetch_case, parse_source

    rec = json.loads((roundtrip["case"] / "summary.json").read_text())
    t1_folder = Path(rec["source"]["t1"])
    series = t1_folder.name
    src = parse_source(f"dicomweb:{roundtrip['web']}/studies/{roundtrip['study']}/series/{series}")
    assert src.series == series
    manifest = fetch_case(src, tmp_path / "cache", Auth(), progress=False)
    assert manifest.read_text().splitlines() == ["case_id,image", f"{roundtrip['study']},{series}"]
    fetched = sorted(p.name for p in (tmp_path / "cache" / roundtrip["study"] / series).glob("*.dcm"))
    assert fetched == sorted(p.name for p in t1_folder.glob("*.dcm")) and len(fetched) == 48


class _FakeStow:
    """A DICOMweb server whose QIDO knows nothing and whose STOW-RS answers 500; records the POSTs."""

    def __enter__(self):
        from http.server import BaseHTTPRequestHandler, HTTPServer

        posts = self.posts = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.end_headers()
                self.wfile.write(b"[]")

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                posts.append(self.path)
                self.send_response(500)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_port}/dicom-web"

    def __exit__(self, *exc):
        self.httpd.shutdown()


@needs_real
def test_store_failures_are_reported_and_bad_outputs_store_nothing(roundtrip, tmp_path):
    import shutil

    from medcam.io.dicomweb import Auth, DicomwebError, store_case

    case = tmp_path / "case"
    shutil.copytree(roundtrip["case"], case)
    fake = _FakeStow()
    with fake as root:
        with pytest.raises(DicomwebError, match=r"storing \(after 0 of 148 objects were stored\): HTTP 500"):
            store_case(case, root, Auth(), progress=False)
        assert len(fake.posts) == 1
        (case / "dicom" / "seg.dcm").write_bytes(b"broken")
        with pytest.raises(DicomwebError, match="cannot be read .* nothing stored"):
            store_case(case, root, Auth(), progress=False)
        assert len(fake.posts) == 1  # validated before the first STOW: nothing sent


def test_secondary_capture_colours_follow_the_display_spec():
    """The overlay's colours are the display spec's: its colour table (with the ramp) indexed on the map's scale,
    so a map of 0.5 on its method's scale 0..2 is drawn with entry 64, not with the top entry of its own maximum."""
    from medcam.io.dicom_overlay import overlay_rgb
    from medcam.io.display import Ramp, heat_lut

    bg = np.full((4, 4, 2), 100.0)
    bg[0, 0, 0] = 50.0
    hm = np.zeros((4, 4, 2))
    hm[1, 1, 0], hm[2, 2, 1] = 0.5, 1.0
    ramp = Ramp(threshold=0.02, full_at=0.1, opacity=0.6)
    lut = heat_lut("viridis", ramp)
    spec = overlay_rgb(bg, hm, scale=(0.0, 2.0), cmap="viridis", ramp=ramp).astype(float)
    own = overlay_rgb(bg, hm, cmap="viridis", ramp=ramp).astype(float)
    grey = spec[1, 2, 0, 0] / 255.0  # a zero-map pixel of the same background value
    assert spec[1, 2, 0, 0] == spec[1, 2, 0, 1] == spec[1, 2, 0, 2]
    for rgb, idx in ((spec[1, 1, 0], 64), (spec[2, 2, 1], 128), (own[1, 1, 0], 128), (own[2, 2, 1], 255)):
        a = lut[idx, 3] * ramp.opacity
        np.testing.assert_allclose(rgb, np.round((grey * (1 - a) + lut[idx, :3] * a) * 255.0), atol=0)
    assert not np.array_equal(spec[1, 1, 0], own[1, 1, 0])


def test_the_cli_tells_dicomweb_inputs_by_the_modules_prefix():
    """The CLI tests for ``dicomweb:`` without importing medcam.io (a missing file answers before torch is loaded)."""
    from medcam.io.dicomweb import PREFIX, is_dicomweb

    assert PREFIX == "dicomweb:" and is_dicomweb("dicomweb:http://h/dicom-web/studies/1")
