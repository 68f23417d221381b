"""nnU-Net v2 models through the one case pipeline (medcam.frameworks.nnunet's adapter): the same case folder, summary
schema, report, resume and parts as every model, maps equal to medcam.frameworks.nnunet's explanation, the
segmentation nnU-Net's own integer labels, and every target kind where nnU-Net's preprocessing puts it."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("nnunetv2")

import medcam  # noqa: E402
from medcam.cli import main  # noqa: E402
from medcam.errors import TargetError  # noqa: E402
from medcam.frameworks import nnunet  # noqa: E402
from medcam.pipeline import RunSettings, explain_case, explain_files, load_model, parse_targets  # noqa: E402
from medcam.pipeline.errors import PipelineError  # noqa: E402
from medcam.targets import ClassROI, ComponentROI, PredictedROI  # noqa: E402

MODALITIES = ("t1", "t1ce", "t2", "flair")  # the phantoms' channels; dataset.json channel_names T1, T1CE, T2, FLAIR


def _read(path: Path) -> np.ndarray:
    """A NIfTI read by SimpleITK: ``[k, j, i]``, nnU-Net's reader axis order."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def nn_model(region_model_folder):
    """One fold, no mirroring: the cheapest exact configuration (mirroring and folds: tests/test_nnunet.py)."""
    return nnunet.load(region_model_folder, folds=(0,), use_mirroring=False)


@pytest.fixture(scope="module")
def loaded(nn_model):
    return load_model(f"nnunet:{nn_model.folder}", use_mirroring=False)


def _direct(model, files, target, method="hirescam"):
    """The map on the original grid (reader order) from the nnU-Net API directly, no pipeline."""
    data, props = model.preprocess(files)
    res = nnunet.explain(medcam.METHODS[method](model.network), model, data, [target])
    return model.to_original_grid(res.maps[0], props)[0], res


def test_discover_inputs(loaded, nnunet_layout, tmp_path):
    adapter = loaded.adapter
    cases = adapter.discover([nnunet_layout])
    assert [c.case_id for c in cases] == ["phantom_001", "phantom_002", "phantom_003"]
    assert [p.name for p in cases[1].channel_files()] == [f"phantom_002_{c:04d}.nii.gz" for c in range(4)]
    files = sorted(nnunet_layout.glob("phantom_002_*.nii.gz"), reverse=True)  # any order: by channel index
    (one,) = adapter.discover(files)
    assert one.case_id == "phantom_002" and one.channel_files() == cases[1].channel_files()
    brats = tmp_path / "brats" / "P2"
    brats.mkdir(parents=True)
    for c, m in enumerate(MODALITIES):
        os.symlink(nnunet_layout / f"phantom_002_{c:04d}.nii.gz", brats / f"P2_{m}.nii.gz")
    (src,) = adapter.discover([brats.parent])
    assert src.kind == "brats_folder" and set(src.files) == set(MODALITIES)  # resolved once, at discovery
    case = adapter.load_case(src)
    assert case.files == [brats / f"P2_{m}.nii.gz" for m in MODALITIES] and case.channel_names == MODALITIES
    (nnunet_layout / "phantom_003_0002.nii.gz").unlink()
    with pytest.raises(PipelineError, match=r"phantom_003.*has channel files \['0000', '0001', '0003'\]"):
        adapter.discover([nnunet_layout])
    with pytest.raises(PipelineError, match="takes 4 input channels"):
        adapter.discover(files[:3])
    nrrd = tmp_path / "x_0003.nrrd"
    nrrd.write_bytes(b"")
    with pytest.raises(nnunet.NnUNetError, match="not NIfTI"):
        adapter.discover([*files[1:], nrrd])


def test_case_folder_like_every_model_with_report_and_resume(nn_model, nnunet_layout, tmp_path):
    """``medcam explain imagesTs/ --model nnunet:FOLDER``: heatmaps/, overlays/, montage.png, slicer/, the
    segmentation (nnU-Net's own integer labels), the summary schema of a demo case, the report, resume, parts."""
    out = tmp_path / "out"
    args = ["explain", str(nnunet_layout), "--model", f"nnunet:{nn_model.folder}", "--folds", "0", "-o", str(out)]
    args += ["-t", "tumor core", "--num-parts", "3", "--part-id", "0", "--report", "-q", "--disable-tta"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, (r.output, r.stderr)
    cdir = out / "phantom_001"
    summary = json.loads((cdir / "summary.json").read_text())
    (row,) = summary["targets"]
    assert row["heatmaps"] == {"hirescam": "heatmaps/hirescam_tumor_core.nii.gz"}
    assert (cdir / "overlays" / "hirescam_tumor_core.png").is_file() and (cdir / "montage.png").is_file()
    assert (cdir / "slicer" / "scene.mrml").is_file() and (out / "report" / "index.html").is_file()
    assert summary["model"]["kind"] == "nnunet" and summary["model"]["folds"] == [0]
    demo_keys = {"source", "reference_image", "channels", "original_shape", "preprocessed_shape", "model", "layer",
                 "methods", "targets", "slicer_scene", "figures", "segmentation", "predicted_voxels", "timings"}  # fmt: skip
    assert demo_keys <= set(summary)
    # the map: nnU-Net's explanation (no mirroring: --disable-tta), exported by nnU-Net, on the input's grid
    files = sorted(nnunet_layout.glob("phantom_001_*.nii.gz"))
    model = nn_model
    assert summary["model"]["mirror_axes"] == []
    direct, res = _direct(model, files, PredictedROI(1, activation="sigmoid"))
    np.testing.assert_allclose(_read(cdir / row["heatmaps"]["hirescam"]), direct, rtol=1e-5, atol=1e-6)
    assert row["roi_voxels"] == int(res.roi_voxels[0, 0]) > 0
    assert row["score"]["hirescam"] == pytest.approx(float(res.scores[0, 0]), rel=1e-5)
    # the segmentation: nnU-Net's export of its logits, integer labels (not float32)
    import nibabel as nib

    seg_img = nib.load(str(cdir / "segmentation.nii.gz"))
    data, props = model.preprocess(files)
    theirs = model.export_segmentation(model.predict_logits(data), props)
    assert np.asarray(seg_img.dataobj).dtype == np.uint8
    np.testing.assert_array_equal(_read(cdir / "segmentation.nii.gz"), theirs)
    np.testing.assert_allclose(seg_img.affine, nib.load(str(files[0])).affine, atol=1e-5)
    # resume: the finished case is skipped; other folds are other settings: refused before any work
    stamp = (cdir / "summary.json").stat().st_mtime_ns
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and (cdir / "summary.json").stat().st_mtime_ns == stamp and "1 skipped" in again.output
    other = CliRunner().invoke(main, [*args[:5], "0,1", *args[6:]])
    assert other.exit_code == 1 and "other settings" in other.stderr


def test_target_kinds_give_the_apis_numbers(nn_model, loaded, phantom_files, tmp_path):
    """Predicted, class, component, channel:N and a box through the pipeline against the nnU-Net API."""
    import nibabel as nib

    (src,) = loaded.adapter.discover(phantom_files)
    case = loaded.adapter.load_case(src)
    ref = nib.load(str(phantom_files[0]))
    mask = np.zeros(ref.shape, np.uint8)
    mask[2:12, 3:14, 1:10] = 1  # the box's voxels as a mask file (read with nibabel, checked by its affine)
    nib.save(nib.Nifti1Image(mask, ref.affine), tmp_path / "roi.nii.gz")
    texts = ["tumor core", "tumor core:class", "whole tumor:component=largest", "channel:2",
             "box:2,3,1:12,14,10:enhancing tumor", f"mask:{tmp_path / 'roi.nii.gz'}:enhancing tumor"]  # fmt: skip
    s = explain_case(case, loaded, ["gradcam"], parse_targets(texts, loaded.regions), out_dir=tmp_path / "c",
                     slicer=False, png=False, source=src)  # fmt: skip
    rows = {r["spec"]: r for r in s["targets"]}
    expected = {
        "tumor core": PredictedROI(1, "sigmoid"),
        "tumor core:class": ClassROI(1),
        "whole tumor:component=largest": ComponentROI(0, "largest", "sigmoid"),
        "channel:2": PredictedROI(2, "sigmoid"),
    }
    for text, target in expected.items():
        direct, res = _direct(nn_model, phantom_files, target, "gradcam")
        np.testing.assert_allclose(_read(tmp_path / "c" / rows[text]["heatmaps"]["gradcam"]), direct, rtol=1e-5,
                                   atol=1e-7)  # fmt: skip
        assert rows[text]["roi_voxels"] == int(res.roi_voxels[0, 0])
    data, props = nn_model.preprocess(phantom_files)
    lo = [b[0] for b in props["bbox_used_for_cropping"]]  # as built: no transpose, no resampling
    box = np.zeros(data.shape[1:], bool)
    box[tuple(slice(max(a - o, 0), b - o) for a, b, o in zip((1, 3, 2), (10, 14, 12), lo))] = True
    box_row = rows["box:2,3,1:12,14,10:enhancing tumor"]
    assert box_row["roi_voxels"] == int(box.sum()) > 0
    mask_row = rows[texts[-1]]  # the mask file lands where the box does: the same ROI, the same map
    assert mask_row["roi_voxels"] == box_row["roi_voxels"]
    np.testing.assert_array_equal(_read(tmp_path / "c" / mask_row["heatmaps"]["gradcam"]),
                                  _read(tmp_path / "c" / box_row["heatmaps"]["gradcam"]))  # fmt: skip
    bad = nib.Nifti1Image(mask, ref.affine @ np.diag([2.0, 1, 1, 1]))  # another grid: refused, named
    nib.save(bad, tmp_path / "shifted.nii.gz")
    spec = parse_targets([f"mask:{tmp_path / 'shifted.nii.gz'}:tumor core"], loaded.regions)
    with pytest.raises(TargetError, match="must be on the original image grid"):
        loaded.adapter.targets(spec, case, src, None)


def test_label_model_segmentation_and_argmax_region(label_model_folder, phantom_files, tmp_path):
    """Softmax (label-based) model: the explained region is nnU-Net's argmax; default targets skip background."""
    lab = load_model(f"nnunet:{label_model_folder}", use_mirroring=False)
    out = tmp_path / "out"
    settings = RunSettings(model_spec=f"nnunet:{label_model_folder}", progress=False, use_mirroring=False)
    run = explain_files([str(f) for f in phantom_files], settings, out, slicer=False, png=False)
    assert run["ok"] == 1, run["cases"]
    s = json.loads((out / "phantom_001" / "summary.json").read_text())
    assert [r["region"] for r in s["targets"]] == ["necrosis", "edema", "enhancing tumor"]
    m = lab.adapter
    data, props = m.preprocess(phantom_files)
    y = m.predict_logits(data)
    assert s["targets"][1]["roi_voxels"] == int((y.argmax(0) == 2).sum()) and s["model"]["activation"] == "softmax"
    np.testing.assert_array_equal(_read(out / "phantom_001" / "segmentation.nii.gz"), m.export_segmentation(y, props))


@pytest.mark.parametrize("method", list(medcam.METHODS))
def test_every_method_through_the_nnunet_adapter(nn_model, phantom_files, tmp_path, method):
    """Each method of medcam.METHODS (listed, not named) runs through the pipeline, its map the nnU-Net API's (the
    executor's plan of folds x tiles x mirrors; MI-CAM and MI-Grad-CAM with their own histogram passes)."""
    adapter = nn_model
    model = load_model(f"nnunet:{nn_model.folder}", use_mirroring=False)
    model.framework_adapter = adapter
    (src,) = adapter.discover(phantom_files)
    case = adapter.load_case(src)
    s = explain_case(case, model, [method], parse_targets(["tumor core"], model.regions),
                     out_dir=tmp_path / "c", slicer=False, png=False, source=src)  # fmt: skip
    row = s["targets"][0]
    direct, res = _direct(nn_model, phantom_files, PredictedROI(1, activation="sigmoid"), method)
    assert row["roi_voxels"] == int(res.roi_voxels[0, 0]) > 0
    assert row["score"][method] == pytest.approx(float(res.scores[0, 0]), rel=1e-5)
    np.testing.assert_allclose(_read(tmp_path / "c" / row["heatmaps"][method]), direct, rtol=1e-5, atol=1e-6)


def test_adapter_pickles_without_its_model(nn_model):
    adapter = nn_model
    clone = pickle.loads(pickle.dumps(adapter))
    assert isinstance(clone, nnunet.NnUNetModel) and clone._predictor is None
    assert clone.setup("cpu").output_names == adapter.output_names  # loaded once, here


def test_nnunet_options_refused_before_any_work(nn_model, phantom_files, tmp_path):
    spec = f"nnunet:{nn_model.folder}"
    r = CliRunner().invoke(main, ["explain", str(phantom_files[0]), "--model", spec, "--spacing", "2", "-o",
                                  str(tmp_path / "o")])  # fmt: skip
    assert r.exit_code == 1 and "--spacing do not apply to nnU-Net models" in r.stderr
    r = CliRunner().invoke(main, ["evaluate", *map(str, phantom_files), "--model", spec, "--roi-size", "8,8,8", "-o",
                                  str(tmp_path / "e")])  # fmt: skip
    assert r.exit_code == 1 and "--roi-size do not apply to nnU-Net models" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


def test_methods_with_passes_of_their_own_run_from_the_command_line(nn_model, phantom_files, tmp_path):
    """MI-CAM and MI-Grad-CAM (their own histogram passes) run on nnU-Net models from the command line too (they
    were refused before the one executor ran them through folds x tiles x mirrors)."""
    from medcam.engine import BaseSegCAM

    own = [m for m, cls in medcam.METHODS.items() if cls._execute is not BaseSegCAM._execute]
    assert {"micam", "migradcam"} <= set(own)
    out = tmp_path / "o"
    args = ["explain", *map(str, phantom_files), "--model", f"nnunet:{nn_model.folder}", "--disable-tta", "-o",
            str(out), "-t", "tumor core", "-q", "--no-png", "--no-slicer"]  # fmt: skip
    for m in own:
        args += ["-M", m]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, (r.output, r.stderr)
    (row,) = json.loads((out / "phantom_001" / "summary.json").read_text())["targets"]
    assert sorted(row["heatmaps"]) == sorted(own) and all(np.isfinite(row["score"][m]) for m in own)
