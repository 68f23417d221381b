"""nnU-Net cohorts through medcam's cohort loop, nnU-Net's input layout, BraTS inputs, and every target kind
(medcam.frameworks.nnunet_cases), on the model folders tests/test_nnunet.py builds once per session."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nnunetv2")

import medcam  # noqa: E402
from medcam.frameworks import nnunet, nnunet_cases  # noqa: E402
from medcam.pipeline.target_specs import parse_targets  # noqa: E402
from medcam.targets import ClassROI, ComponentROI, MaskROI, PredictedROI  # noqa: E402

from ._cli_helpers import assert_one_line_error  # noqa: E402
from .frameworks.conftest import case_files, label_folder, nnunet_root, region_folder  # noqa: E402, F401  (session fixtures)

MODALITIES = ("t1", "t1ce", "t2", "flair")  # the phantoms' channels, dataset.json channel_names T1, T1CE, T2, FLAIR


def _read(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def model(region_folder):  # noqa: F811
    """One fold, no mirroring: the cheapest exact configuration (mirroring/folds are covered in test_nnunet.py)."""
    return nnunet.load(region_folder, folds=(0,), use_mirroring=False)


@pytest.fixture()
def layout(nnunet_root, tmp_path) -> Path:  # noqa: F811
    """nnU-Net's input layout (as nnUNetv2_predict -i takes it): phantom_00{1,2,3}_000{0..3}.nii.gz."""
    inp = tmp_path / "imagesTs"
    shutil.copytree(nnunet_root / "raw" / "Dataset502_Phantom" / "imagesTr", inp)
    return inp


def _direct_map(model, files, target, method="hirescam"):
    """The map on the original grid computed with the nnU-Net API directly (no cohort machinery)."""
    data, props = model.preprocess(files)
    cam = medcam.METHODS[method](model.network)
    res = nnunet.explain(cam, model, data, [target])
    return model.to_original_grid(res.maps[0], props)[0], res


# ---------------------------------------------------------------------------------------------------- inputs
def test_discover_inputs(model, layout, tmp_path):
    cases = nnunet_cases.discover_nnunet_cases([layout], model)
    assert [c.case_id for c in cases] == ["phantom_001", "phantom_002", "phantom_003"]
    assert [Path(f).name for f in cases[1].source] == [f"phantom_002_{c:04d}.nii.gz" for c in range(4)]
    # one case's files, in any order: ordered by their channel index, named after the case
    files = sorted(layout.glob("phantom_002_*.nii.gz"), reverse=True)
    (one,) = nnunet_cases.discover_nnunet_cases(files, model)
    assert one.case_id == "phantom_002" and one.source == cases[1].source
    # BraTS case folders: modalities matched to dataset.json channel names
    brats = tmp_path / "brats" / "P2"
    brats.mkdir(parents=True)
    for c, m in enumerate(MODALITIES):
        os.symlink(layout / f"phantom_002_{c:04d}.nii.gz", brats / f"P2_{m}.nii.gz")
    (src,) = nnunet_cases.discover_nnunet_cases([brats.parent], model)
    assert src.kind == "brats_folder"
    assert nnunet_cases.channel_files(src, model) == [brats / f"P2_{m}.nii.gz" for m in MODALITIES]
    # errors, before any work
    (layout / "phantom_003_0002.nii.gz").unlink()
    with pytest.raises(nnunet.NnUNetError, match=r"phantom_003.*has channel files \['0000', '0001', '0003'\]"):
        nnunet_cases.discover_nnunet_cases([layout], model)
    with pytest.raises(nnunet.NnUNetError, match="takes 4 input channels"):
        nnunet_cases.discover_nnunet_cases(files[:3], model)
    odd = tmp_path / "case.mnc"
    odd.write_bytes(b"")
    with pytest.raises(nnunet.NnUNetError, match=r"reads \.nii\.gz"):
        nnunet_cases.discover_nnunet_cases([*files[:3], odd], model)
    other = nnunet.load(model.folder, folds=(0,), use_mirroring=False)
    other.predictor.dataset_json = {**other.dataset_json, "channel_names": {"0": "ADC", "1": "T1", "2": "T2", "3": "X"}}
    with pytest.raises(nnunet.NnUNetError, match=r"channels \['ADC', 'T1', 'T2', 'X'\].*cannot be matched"):
        nnunet_cases.discover_nnunet_cases([brats.parent], other)


# ---------------------------------------------------------------------------------------------------- cohorts
def test_cohort_parts_resume_and_a_failing_case(model, layout, tmp_path):
    out = tmp_path / "out"
    (layout / "phantom_003_0001.nii.gz").write_bytes(b"not an image")  # fails when read, alone
    kw = {"targets": ["tumor core"], "progress": False}
    run0 = nnunet_cases.explain_cohort([layout], model, out, num_parts=2, part_id=0, **kw)
    assert [(r["case_id"], r["status"]) for r in run0["cases"]] == [("phantom_001", "ok"), ("phantom_003", "failed")]
    assert "phantom_003" in run0["cases"][1]["case_id"] and run0["cases"][1]["error"]
    assert Path(run0["path"]).name == "cohort_summary.part0-of-2.json"
    assert not (out / "phantom_003").exists() and not list(out.glob(".partial-*"))
    run1 = nnunet_cases.explain_cohort([layout], model, out, num_parts=2, part_id=1, **kw)
    assert [(r["case_id"], r["status"]) for r in run1["cases"]] == [("phantom_002", "ok")]
    # the maps are nnU-Net's explanation on the original grid, as the API computes it
    files = sorted(layout.glob("phantom_001_*.nii.gz"))
    direct, res = _direct_map(model, files, model.target("tumor core"))
    summary = json.loads((out / "phantom_001" / "summary.json").read_text())
    (row,) = summary["maps"]
    assert row["file"] == "hirescam_tumor_core.nii.gz" and row["roi_voxels"] == int(res.roi_voxels[0, 0]) > 0
    np.testing.assert_allclose(_read(out / "phantom_001" / row["file"]), direct, rtol=1e-5, atol=1e-6)
    assert row["score"] == pytest.approx(float(res.scores[0, 0]), rel=1e-5)
    seg = _read(out / "phantom_001" / "segmentation.nii.gz")
    assert seg.shape == direct.shape and set(np.unique(seg)) <= {0, 1, 2, 3}
    assert summary["status"] == "ok" and summary["model"]["folds"] == [0]
    # resume: the finished case is skipped (its folder untouched), the failed one is tried again
    stamp = (out / "phantom_001" / "summary.json").stat().st_mtime_ns
    again = nnunet_cases.explain_cohort([layout], model, out, num_parts=2, part_id=0, **kw)
    assert [r["status"] for r in again["cases"]] == ["skipped", "failed"]
    assert (out / "phantom_001" / "summary.json").stat().st_mtime_ns == stamp
    # the settings recorded (and compared) include the model's folds and checkpoint files
    rec = summary["settings"]
    assert rec["model"]["folder"] == str(Path(model.folder).resolve()) and set(rec["model_files"]) == {
        "plans.json", "dataset.json", "fold_0",
    }  # fmt: skip
    two = nnunet.load(model.folder, folds=(0, 1), use_mirroring=False)
    with pytest.raises(medcam.MedcamError, match="other settings"):
        nnunet_cases.explain_cohort([layout], two, out, num_parts=2, part_id=1, **kw)


def test_retrained_checkpoint_is_not_skipped(region_folder, case_files, tmp_path):  # noqa: F811
    folder = tmp_path / "model"
    shutil.copytree(region_folder, folder)
    m = nnunet.load(folder, folds=(0,), use_mirroring=False)
    out = tmp_path / "out"
    assert nnunet_cases.explain_cohort(case_files, m, out, targets=["tumor core"], progress=False)["ok"] == 1
    ck = folder / "fold_0" / "checkpoint_final.pth"
    os.utime(ck, ns=(ck.stat().st_atime_ns, ck.stat().st_mtime_ns + 10**9))
    with pytest.raises(medcam.MedcamError, match="other settings"):
        nnunet_cases.explain_cohort(case_files, m, out, targets=["tumor core"], progress=False)
    run = nnunet_cases.explain_cohort(case_files, m, out, targets=["tumor core"], progress=False, overwrite=True)
    assert run["ok"] == 1


def test_brats_folders_and_manifest_give_the_layout_maps(model, layout, tmp_path):
    cohort = tmp_path / "cohort"
    for cid in ("A", "B"):  # both are phantom_002, under BraTS names (2021 and 2023 layouts)
        (cohort / cid).mkdir(parents=True)
        names = ("t1", "t1ce", "t2", "flair") if cid == "A" else ("t1n", "t1c", "t2w", "t2f")
        sep = "_" if cid == "A" else "-"
        for c, m in enumerate(names):
            shutil.copy(layout / f"phantom_002_{c:04d}.nii.gz", cohort / cid / f"{cid}{sep}{m}.nii.gz")
    manifest = tmp_path / "cases.csv"
    manifest.write_text(
        "case_id,flair,t2,t1ce,t1\nC," + ",".join(str(layout / f"phantom_002_{c:04d}.nii.gz") for c in (3, 2, 1, 0))
    )
    direct, _ = _direct_map(model, sorted(layout.glob("phantom_002_*.nii.gz")), model.target("enhancing tumor"))
    assert direct.max() > 0
    for inputs in ([cohort], [manifest]):
        run = nnunet_cases.explain_cohort(inputs, model, tmp_path / "out", targets=["enhancing tumor"], progress=False)
        assert run["failed"] == 0 and run["ok"] >= 1
        for rec in run["cases"]:
            got = _read(tmp_path / "out" / rec["case_id"] / "hirescam_enhancing_tumor.nii.gz")
            np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-6)


def test_work_pickles_without_its_model_and_loads_it_once_per_worker(model, layout, tmp_path):
    """What a Ray worker does: unpickle the job (no model inside), setup(device) loads the model folder once."""
    from medcam.pipeline.cohort import CohortJob

    (src,) = nnunet_cases.discover_nnunet_cases(sorted(layout.glob("phantom_001_*")), model)
    specs = parse_targets(["whole tumor"], model.output_names)
    work = nnunet_cases.NnUNetWork.of(model, ["gradcam"], specs)
    shipped = pickle.loads(pickle.dumps(CohortJob(work, tmp_path / "out", {"x": 1})))
    assert shipped.work.model is None and len(pickle.dumps(work)) < 100_000
    ready = shipped.setup("cpu")
    assert ready.work.model is not None and ready.work.model.mirror_axes == ()
    assert ready.setup("cpu").work.model is ready.work.model  # loaded once
    rec = ready.run_case(src)
    assert rec["status"] == "ok", rec
    direct, _ = _direct_map(model, list(src.source), model.target("whole tumor"), "gradcam")
    np.testing.assert_allclose(
        _read(tmp_path / "out" / "phantom_001" / "gradcam_whole_tumor.nii.gz"), direct, rtol=1e-5
    )


# ---------------------------------------------------------------------------------------------------- targets
def _nnunet_seg_reference(model, files, seg_file):
    """nnU-Net's own preprocessing of a segmentation file (the ``seg`` argument of its preprocessor)."""
    p = model.predictor
    pre = p.configuration_manager.preprocessor_class(verbose=False)
    _, seg, _ = pre.run_case([str(f) for f in files], str(seg_file), p.plans_manager, p.configuration_manager,
                             model.dataset_json)  # fmt: skip
    return seg[0]


def _targets(model, files, texts, src=None):
    data, props = model.preprocess(files)
    specs = parse_targets(texts, model.output_names)
    if src is None:
        (src,) = nnunet_cases.discover_nnunet_cases(files, model)
    return data, props, nnunet_cases.build_targets(specs, model, src, files, data, props)


def _write_like(model, array_zyx, props, path):
    return model.write_map(array_zyx.astype(np.float32), props, path)


@pytest.mark.parametrize("plans", ["as built", "transposed and resampled"])
def test_box_and_mask_land_where_nnunet_preprocessing_puts_them(region_folder, case_files, tmp_path, plans):  # noqa: F811
    folder = region_folder
    if plans != "as built":  # the same model with plans that transpose and resample (nnU-Net's own code runs them)
        folder = tmp_path / "model"
        shutil.copytree(region_folder, folder)
        pj = json.loads((folder / "plans.json").read_text())
        pj["transpose_forward"], pj["transpose_backward"] = [2, 0, 1], [1, 2, 0]
        pj["configurations"]["3d_fullres"]["spacing"] = [7.0, 10.0, 6.0]
        (folder / "plans.json").write_text(json.dumps(pj))
    m = nnunet.load(folder, folds=(0,), use_mirroring=False)
    data, props = m.preprocess(case_files)
    ref_img = _read(case_files[0])  # [k, j, i]
    box = (3, 5, 2), (11, 13, 9)  # i, j, k
    box_zyx = np.zeros(ref_img.shape, np.float32)
    box_zyx[box[0][2] : box[1][2], box[0][1] : box[1][1], box[0][0] : box[1][0]] = 1
    box_file = _write_like(m, box_zyx, props, tmp_path / "box.nii.gz")
    lesion = (ref_img > np.percentile(ref_img, 80)).astype(np.float32)
    mask_file = _write_like(m, lesion, props, tmp_path / "lesion.nii.gz")
    texts = [
        f"box:{','.join(map(str, box[0]))}:{','.join(map(str, box[1]))}:tumor core",
        f"mask:{mask_file}:whole tumor",
    ]
    _, _, (tb, tm) = _targets(m, case_files, texts)
    assert isinstance(tb, MaskROI) and isinstance(tm, MaskROI) and (tb.channel, tm.channel) == (1, 0)
    for t, f in ((tb, box_file), (tm, mask_file)):
        ref = _nnunet_seg_reference(m, case_files, f) == 1
        assert tuple(t.mask.shape) == tuple(data.shape[1:]) == ref.shape
        assert ref.sum() > 0
        np.testing.assert_array_equal(t.mask.numpy() > 0, ref)
    if plans == "as built":  # no transpose or resampling: the box is the crop-shifted box, voxel for voxel
        lo = [b[0] for b in props["bbox_used_for_cropping"]]
        expect = np.zeros(data.shape[1:], bool)
        expect[tuple(slice(max(a - o, 0), b - o) for a, b, o in zip(box[0][::-1], box[1][::-1], lo))] = True
        np.testing.assert_array_equal(tb.mask.numpy() > 0, expect)
    else:
        assert tuple(data.shape[1:]) != tuple(props["shape_after_cropping_and_before_resampling"])


def test_target_kinds_give_their_numbers(model, case_files, tmp_path):  # noqa: F811
    """Predicted, class, component, channel:N and a mask equal to the predicted region, through the cohort, against
    the same targets built directly on the preprocessed grid."""
    data, props = model.preprocess(case_files)
    logits = model.predict_logits(data)
    pred = PredictedROI(1, activation="sigmoid").roi(logits[None])[0]  # tumor core, preprocessed grid
    assert 0 < int(pred.sum()) < pred.numel()
    on_original = model.to_original_grid(pred[None], props)[0] > 0.5
    mask_file = _write_like(model, on_original, props, tmp_path / "tc.nii.gz")
    texts = ["tumor core", f"mask:{mask_file}:tumor core", "tumor core:class", "whole tumor:component=largest",
             "channel:2"]  # fmt: skip
    run = nnunet_cases.explain_cohort(case_files, model, tmp_path / "out", targets=texts, progress=False)
    assert run["ok"] == 1, run["cases"]
    case = tmp_path / "out" / "phantom_001"
    rows = {r["spec"]: r for r in json.loads((case / "summary.json").read_text())["maps"]}
    expected = {
        "tumor core": PredictedROI(1, "sigmoid"),
        "tumor core:class": ClassROI(1),
        "whole tumor:component=largest": ComponentROI(0, "largest", "sigmoid"),
        "channel:2": PredictedROI(2, "sigmoid"),
    }
    for text, target in expected.items():
        direct, res = _direct_map(model, case_files, target)
        np.testing.assert_allclose(_read(case / rows[text]["file"]), direct, rtol=1e-5, atol=1e-7)
        assert rows[text]["roi_voxels"] == int(res.roi_voxels[0, 0]) and rows[text]["score"] == pytest.approx(
            float(res.scores[0, 0]), rel=1e-5
        )
    assert rows["tumor core:class"]["roi_voxels"] == pred.numel()
    # the mask equal to the predicted region lands on exactly those voxels: the same map as the predicted target
    mask_row = rows[f"mask:{mask_file}:tumor core"]
    assert mask_row["roi_voxels"] == rows["tumor core"]["roi_voxels"] == int(pred.sum())
    np.testing.assert_array_equal(_read(case / mask_row["file"]), _read(case / rows["tumor core"]["file"]))


def test_label_based_model_targets(label_folder, case_files, tmp_path):  # noqa: F811
    """Softmax model: the predicted region is nnU-Net's argmax; a component and a box by dataset.json label names."""
    lab = nnunet.load(label_folder, use_mirroring=False)
    texts = ["edema", "necrosis:component=largest", "box:2,3,1:12,14,10:enhancing tumor"]
    run = nnunet_cases.explain_cohort(case_files, lab, tmp_path / "out", targets=texts, progress=False)
    assert run["ok"] == 1, run["cases"]
    rows = {r["spec"]: r for r in json.loads((tmp_path / "out" / "phantom_001" / "summary.json").read_text())["maps"]}
    data, props = lab.preprocess(case_files)
    y = lab.predict_logits(data)
    assert rows["edema"]["roi_voxels"] == int((y.argmax(0) == 2).sum()) > 0 and rows["edema"]["region"] == "edema"
    comp = ComponentROI(1, "largest", "softmax").roi(y[None])
    assert rows["necrosis:component=largest"]["roi_voxels"] == int(comp.sum())
    lo = [b[0] for b in props["bbox_used_for_cropping"]]  # as built: no transpose, no resampling
    box = np.zeros(data.shape[1:], np.float32)
    box[tuple(slice(max(a - o, 0), b - o) for a, b, o in zip((1, 3, 2), (10, 14, 12), lo))] = 1
    direct, res = _direct_map(lab, case_files, MaskROI(box, 3))
    row = rows["box:2,3,1:12,14,10:enhancing tumor"]
    assert row["roi_voxels"] == int(box.sum()) == int(res.roi_voxels[0, 0])
    np.testing.assert_allclose(_read(tmp_path / "out" / "phantom_001" / row["file"]), direct, rtol=1e-5, atol=1e-7)


def test_label_target_from_the_brats_seg_file(model, nnunet_root, tmp_path):  # noqa: F811
    from medcam.data.brats import labels_to_regions

    raw = nnunet_root / "raw" / "Dataset502_Phantom"
    case = tmp_path / "P1"
    case.mkdir()
    for c, m in enumerate(MODALITIES):
        shutil.copy(raw / "imagesTr" / f"phantom_001_{c:04d}.nii.gz", case / f"P1_{m}.nii.gz")
    shutil.copy(raw / "labelsTr" / "phantom_001.nii.gz", case / "P1_seg.nii.gz")  # ET = 3: BraTS 2023 labels
    (src,) = nnunet_cases.discover_nnunet_cases([case], model)
    files = nnunet_cases.channel_files(src, model)
    _, _, (t,) = _targets(model, files, ["label:TC:tumor core"], src)
    seg = _nnunet_seg_reference(model, files, case / "P1_seg.nii.gz")
    ref = labels_to_regions(np.maximum(seg, 0), "brats2023")[0]  # TC
    assert ref.sum() > 0
    np.testing.assert_array_equal(t.mask.numpy() > 0, ref)
    with pytest.raises(medcam.MedcamError, match="has no label file"):
        _targets(model, files, ["label:TC:tumor core"])


# ---------------------------------------------------------------------------------------------------- command line
def test_cli_cohort_in_nnunet_layout(region_folder, layout, tmp_path):  # noqa: F811
    from click.testing import CliRunner

    from medcam.cli import main

    out = tmp_path / "out"
    (layout / "phantom_002_0003.nii.gz").write_bytes(b"broken")
    args = ["explain", str(layout), "--model", f"nnunet:{region_folder}", "-o", str(out), "-q", "-t", "tumor core"]
    r = CliRunner().invoke(main, [*args, "--num-parts", "3", "--part-id", "1"])
    assert r.exit_code == 1 and "FAILED phantom_002" in r.output, r.output
    assert (out / "cohort_summary.part1-of-3.json").is_file() and not (out / "phantom_002").exists()
    r = CliRunner().invoke(main, [*args, "--num-parts", "3", "--part-id", "0"])
    assert r.exit_code == 0 and "1 case(s) explained" in r.output, r.output
    r = CliRunner().invoke(main, [*args, "--num-parts", "3", "--part-id", "0"])
    assert r.exit_code == 0 and "0 case(s) explained, 1 skipped" in r.output, r.output
    assert_one_line_error(CliRunner().invoke(main, [*args, "--amp"]), "--amp do not apply to nnU-Net")
    assert_one_line_error(CliRunner().invoke(main, [*args, "-t", "mask:nope.nii.gz:tumor core"]), "does not exist")


def test_ray_workers_give_the_local_cohort(model, layout, tmp_path):
    """The Ray executor runs the same NnUNetWork: each worker loads the model folder once; same folders, same maps."""
    ray = pytest.importorskip("ray")
    from medcam.pipeline.ray_executor import RayExecutor

    for c in range(4):
        (layout / f"phantom_003_{c:04d}.nii.gz").unlink()
    kw = {"targets": ["tumor core", "whole tumor:class"], "methods": ["gradcam"], "progress": False}
    local = nnunet_cases.explain_cohort([layout], model, tmp_path / "local", **kw)
    started = not ray.is_initialized()
    if started:  # workers import this checkout's medcam
        root = str(Path(__file__).resolve().parents[1])
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join([root] + ([old] if old else []))
        try:
            ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, log_to_driver=False, object_store_memory=2**27)
        finally:
            os.environ.pop("PYTHONPATH") if old is None else os.environ.update(PYTHONPATH=old)
    try:
        dist = nnunet_cases.explain_cohort([layout], model, tmp_path / "ray", executor=RayExecutor(workers=1), **kw)
    finally:
        if started:
            ray.shutdown()
    assert [(r["case_id"], r["status"]) for r in dist["cases"]] == [(r["case_id"], "ok") for r in local["cases"]]
    assert len(dist["cases"]) == 2
    for rec in local["cases"]:
        for f in ("gradcam_tumor_core.nii.gz", "gradcam_whole_tumor-class.nii.gz", "segmentation.nii.gz"):
            a, b = _read(tmp_path / "local" / rec["case_id"] / f), _read(tmp_path / "ray" / rec["case_id"] / f)
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * float(np.abs(a).max()))
    logs = "".join(p.read_text() for p in (tmp_path / "ray" / "logs").glob("worker-*.log"))
    assert logs.count("ready on cpu") == 1 and "case phantom_002" in logs


def test_png_overlays_and_montage_on_the_original_grid(model, case_files, tmp_path):  # noqa: F811
    """Every map gets its overlay and the case its montage; the ROI drawn is the target's ROI taken back to the
    original grid by the maps' own export (a box lands on its voxels, in nibabel's axis order); png=False writes none."""
    import matplotlib.image
    import nibabel as nib
    import torch

    from medcam.frameworks.nnunet_figures import _original_rois

    texts = ["tumor core", "box:3,5,2:11,13,9:tumor core"]
    out = tmp_path / "out"
    run = nnunet_cases.explain_cohort(
        case_files, model, out, methods=["hirescam", "gradcam"], targets=texts, progress=False
    )
    assert run["ok"] == 1, run["cases"]
    case = out / "phantom_001"
    summary = json.loads((case / "summary.json").read_text())
    assert summary["figures"]["montage"] == "montage.png" and (case / "montage.png").is_file()
    assert len(summary["maps"]) == 4
    for r in summary["maps"]:
        img = matplotlib.image.imread(case / r["overlay"])
        assert img.ndim == 3 and float(img.std()) > 0
        assert np.allclose(nib.load(case / r["file"]).affine, nib.load(case_files[1]).affine)  # T1CE: background
    # the box ROI, on the network's grid (crop-shifted: as built, no transpose or resampling), back on the original
    data, props = model.preprocess(case_files)
    bbox = props["bbox_used_for_cropping"]  # reader axes (z, y, x)
    on_net = np.zeros(data.shape[1:], bool)
    on_net[tuple(slice(max(a - b[0], 0), c - b[0]) for a, c, b in zip((2, 5, 3), (9, 13, 11), bbox))] = True
    (roi,) = _original_rois(model, torch.from_numpy(on_net)[None], props, tmp_path, ".nii.gz")
    expect_zyx = np.zeros(_read(case_files[0]).shape, bool)
    expect_zyx[2:9, 5:13, 3:11] = True
    crop = np.zeros_like(expect_zyx)
    crop[tuple(slice(lo, hi) for lo, hi in bbox)] = True
    assert roi.sum() > 0
    np.testing.assert_array_equal(roi, (expect_zyx & crop).transpose(2, 1, 0))  # nibabel: (i, j, k)
    run = nnunet_cases.explain_cohort(
        case_files, model, tmp_path / "nopng", targets=texts[:1], png=False, progress=False
    )
    assert run["ok"] == 1 and not (tmp_path / "nopng" / "phantom_001" / "overlays").exists()
    assert json.loads((tmp_path / "nopng" / "phantom_001" / "summary.json").read_text())["figures"] is None
