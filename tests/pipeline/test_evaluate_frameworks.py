"""``medcam evaluate`` through every framework adapter: the faithfulness metrics re-run the framework's own prediction
on the perturbed input (nnU-Net: ``nnUNetPredictor.predict_logits_from_preprocessed_data`` on the perturbed
preprocessed case; a MONAI bundle: its inferer's settings), the tables are those of every model, and the values equal
an independent computation with the framework's own components.

Kept small for a 2-core CI machine: one case, one method, one target, 2 deletion steps, one tie-breaking draw, one
fold without test-time mirroring (folds and mirroring are the predictor's own, covered by tests/test_nnunet.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medcam.cli import main

CONFIG = "nnUNetTrainer__nnUNetPlans__3d_fullres"
FAST = ["--steps", "2", "--tie-draws", "1", "--device", "cpu", "--threads", "1", "--quiet"]
METRICS = ["--metrics", "localisation,deletion,average_drop"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as ``--threads 1`` runs the cases: the independent computations then run the same
    float32 operations in the same order as the command."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rows(out: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(out / "metrics.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _value(rows: list[dict[str, str]], metric: str) -> float:
    (row,) = [r for r in rows if r["metric"] == metric]
    return float(row["value"])


def _invoke(args: list) -> None:
    r = CliRunner().invoke(main, ["evaluate", *map(str, args)])
    assert r.exit_code == 0, (r.output, r.stderr)


def _average_drop(predict, data: torch.Tensor, smap: torch.Tensor, w: torch.Tensor) -> float:
    """Average drop (Chattopadhay et al.): ``100 max(0, Y - O) / Y`` with ``Y = sum W sigmoid(f(x))``,
    ``O = sum W sigmoid(f(L x))``, ``L = map / max map`` (the explanation-masked input on a zero baseline)."""
    lnorm = (smap / smap.max()).clamp(0, 1)
    y = float((torch.sigmoid(predict(data)) * w).sum())
    o = float((torch.sigmoid(predict(lnorm[None] * data)) * w).sum())
    return 100.0 * max(0.0, y - o) / y


# ---------------------------------------------------------------------------------------------------- nnU-Net
def _nnunet_predictor(folder: Path):
    """nnU-Net's own predictor of fold 0 without mirroring, set up as ``nnUNetv2_predict -f 0 --disable_tta``."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, perform_everything_on_device=False,
                        device=torch.device("cpu"), verbose=False, verbose_preprocessing=False)  # fmt: skip
    p.initialize_from_trained_model_folder(str(folder), use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    return p


def test_nnunet_model_evaluates_through_its_predictor_like_a_demo_model(nnunet_models, small_demo, tmp_path):
    """``--model nnunet:FOLDER`` writes the files and table of a demo model; its deletion AUC and average drop equal
    the same metric computed with nnU-Net's ``predict_logits_from_preprocessed_data`` on the perturbed preprocessed
    case (nnU-Net's own ``run_case`` preprocessing), and the reference mask is nnU-Net's preprocessing of the label."""
    from medcam import SegHiResGradCAM
    from medcam.data.phantoms import write_phantom_case
    from medcam.frameworks import nnunet
    from medcam.metrics import perturbation_curve

    raw = nnunet_models / "raw" / "Dataset502_Phantom"
    files = sorted((raw / "imagesTr").glob("phantom_001_*.nii.gz"))
    label = raw / "labelsTr" / "phantom_001.nii.gz"
    folder = nnunet_models / "results" / "Dataset502_Phantom" / CONFIG
    nn_out = tmp_path / "nnunet"
    _invoke([*files, "--model", f"nnunet:{folder}", "--disable-tta", "-M", "hirescam", "-t", "whole tumor",
             "--reference", f"mask:{label}", "-o", nn_out, *METRICS, *FAST])  # fmt: skip
    case = write_phantom_case(tmp_path / "cases", seed=0, spacing_mm=3.0)
    demo_out = tmp_path / "demo"
    _invoke([case, "-M", "hirescam", "-t", "WT", "--reference", f"mask:{next(case.glob('*_seg.nii.gz'))}",
             "-o", demo_out, *METRICS, *FAST])  # fmt: skip
    assert sorted(p.name for p in nn_out.iterdir()) == sorted(p.name for p in demo_out.iterdir())
    cols, rows = _rows(nn_out)
    demo_cols, demo_rows = _rows(demo_out)
    assert cols == demo_cols and {r["metric"] for r in rows} == {r["metric"] for r in demo_rows}
    assert len(rows) == len(demo_rows) and {r["target"] for r in rows} == {"whole tumor"}
    settings = json.loads((nn_out / "metrics.json").read_text())["settings"]
    demo_settings = json.loads((demo_out / "metrics.json").read_text())["settings"]
    assert set(settings) == set(demo_settings) and settings["model"]["kind"] == "nnunet"
    conventions = ("hd95_convention", "insertion_protocol", "steps", "tie_draws", "baseline", "metrics")
    assert all(settings[k] == demo_settings[k] for k in conventions)

    # independently: nnU-Net's preprocessing and predictor; the map is medcam's nnU-Net explanation (tested against
    # autograd in tests/test_nnunet.py), the metric's inputs are what is checked here
    import SimpleITK as sitk

    pred = _nnunet_predictor(folder)
    mask = tmp_path / "mask.nii.gz"  # the reference as given: the label's non-zero voxels
    sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(label)) != 0, sitk.sitkUInt8), str(mask))
    pre = pred.configuration_manager.preprocessor_class(verbose=False)
    data_np, seg, _ = pre.run_case([str(f) for f in files], str(mask), pred.plans_manager,
                                   pred.configuration_manager, pred.dataset_json)  # fmt: skip
    data = torch.from_numpy(np.ascontiguousarray(data_np)).float()

    def predict(x: torch.Tensor) -> torch.Tensor:
        return pred.predict_logits_from_preprocessed_data(x).float()

    logits = predict(data)
    w = torch.zeros_like(logits)
    w[0] = (torch.sigmoid(logits[0]) > 0.5).float()  # "whole tumor" is output 0; its predicted region
    assert 0 < int(w.sum()) < w[0].numel()
    model = nnunet.load(folder, folds=(0,), use_mirroring=False)
    target = model.target("whole tumor")
    smap = nnunet.explain(SegHiResGradCAM(model.network), model, data, [target], logits=logits).maps[0, 0]

    def logit_score(xs: torch.Tensor) -> torch.Tensor:
        return torch.stack([(predict(x) * w).flatten().sum() for x in xs])

    curve = perturbation_curve(data, smap, logit_score, "deletion", baseline="zero", steps=2, tie_draws=1)
    # float32 sums over the ROI in another order than the command's score (flatten(1).sum(1) per batch): 1e-5
    assert _value(rows, "deletion_auc") == pytest.approx(float(curve.auc), rel=1e-5)
    assert _value(rows, "average_drop_percent") == pytest.approx(_average_drop(predict, data, smap, w), rel=1e-5)
    # the reference is nnU-Net's preprocessing of the label file (its seg output: crop, resampling, transposition)
    from medcam.metrics import localisation_scores

    ref = torch.from_numpy(np.asarray(seg)[0] == 1)  # nnU-Net's -1 (outside the non-zero crop) is background
    spacing = [float(s) for s in pred.configuration_manager.spacing]
    loc = localisation_scores(smap[None], ref[None], "otsu", spacing=spacing)
    assert _value(rows, "dice") == pytest.approx(float(loc["dice"]), rel=1e-5, abs=1e-7)
    assert _value(rows, "energy_pointing_game") == pytest.approx(float(loc["energy_pointing_game"]), rel=1e-5)


def test_nnunet_sanity_check_is_refused_before_any_case(nnunet_models, tmp_path):
    """The sanity check randomises the network's weights; nnU-Net's explanation loads each fold's checkpoint:
    refused by name (dropped with a warning through ``all``) before any case, nothing written."""
    raw = nnunet_models / "raw" / "Dataset502_Phantom"
    files = sorted((raw / "imagesTr").glob("phantom_001_*.nii.gz"))
    spec = f"nnunet:{nnunet_models / 'results' / 'Dataset502_Phantom' / CONFIG}"
    out = tmp_path / "e"
    r = CliRunner().invoke(main, ["evaluate", *map(str, files), "--model", spec, "--metrics", "deletion,sanity",
                                  "-o", str(out), "--quiet"])  # fmt: skip
    assert r.exit_code == 1 and "--metrics sanity" in r.stderr and "drop sanity" in r.stderr, r.stderr
    assert not out.exists()


def test_nnunet_reference_regions_are_the_label_through_nnunets_preprocessor(nnunet_models, tmp_path):
    """``--reference auto`` / ``TC|WT|ET`` of a BraTS case folder for an nnU-Net model: each BraTS region of the
    case's label file equals nnU-Net's ``run_case`` given that region as the case's segmentation (non-zero crop,
    resampling, transposition), not medcam's affine resampling."""
    import os

    import SimpleITK as sitk

    from medcam.pipeline import discover_cases, load_model

    raw = nnunet_models / "raw" / "Dataset502_Phantom"
    case = tmp_path / "P1"
    case.mkdir()
    for c, m in enumerate(("t1", "t1ce", "t2", "flair")):  # dataset.json channel_names T1, T1CE, T2, FLAIR
        os.symlink(raw / "imagesTr" / f"phantom_001_{c:04d}.nii.gz", case / f"P1_{m}.nii.gz")
    label = raw / "labelsTr" / "phantom_001.nii.gz"  # values 1, 2, 3: the BraTS 2023 convention (ET = 3)
    os.symlink(label, case / "P1_seg.nii.gz")
    loaded = load_model(f"nnunet:{nnunet_models / 'results' / 'Dataset502_Phantom' / CONFIG}", use_mirroring=False)
    (src,) = discover_cases([case])
    adapter = loaded.adapter
    got = adapter.reference_regions(adapter.load_case(src), src)
    pred = _nnunet_predictor(nnunet_models / "results" / "Dataset502_Phantom" / CONFIG)
    pre = pred.configuration_manager.preprocessor_class(verbose=False)
    lab = sitk.ReadImage(str(label))
    files = [str(case / f"P1_{m}.nii.gz") for m in ("t1", "t1ce", "t2", "flair")]
    for k, values in enumerate(((1, 3), (1, 2, 3), (3,))):  # TC, WT, ET
        region = sitk.Cast(sum((lab == v for v in values[1:]), lab == values[0]) > 0, sitk.sitkUInt8)
        path = tmp_path / f"region{k}.nii.gz"
        sitk.WriteImage(region, str(path))
        _, seg, _ = pre.run_case(files, str(path), pred.plans_manager, pred.configuration_manager, pred.dataset_json)
        want = torch.from_numpy(np.asarray(seg)[0] == 1)
        assert bool(want.any()) and torch.equal(got[k], want), k


# ---------------------------------------------------------------------------------------------------- MONAI bundle
def test_zoo_brats_bundle_evaluates_with_its_inferer(tmp_path):
    """The model zoo's brats_mri_segmentation inference.json as shipped (seeded weights) evaluates a BraTS phantom
    case: its preprocessing, its inferer's settings (overlap 0.5; ``--roi-size`` shrinks the 240 x 240 x 160
    window, minutes per pass on a CI CPU) and its sigmoid; the average drop equals the one computed with the
    bundle's own parsed inferer and network."""
    from monai.bundle import ConfigParser

    from medcam import SegHiResGradCAM
    from medcam.data.phantoms import write_phantom_case
    from medcam.targets import ClassROI

    from .conftest import write_bundle, zoo_config

    bundle = write_bundle(tmp_path / "brats_mri_segmentation", zoo_config("brats_mri_segmentation"), seed=5)
    case = write_phantom_case(tmp_path / "cases", seed=0, spacing_mm=6.0)  # 33 x 39 x 32 voxels
    order = ("t1ce", "t1", "t2", "flair")  # the bundle's channel order (its datalist)
    out = tmp_path / "out"
    roi = (40, 40, 32)  # one window (SegResNet's 16-filter passes cost about a second per 32^3 window on CI)
    _invoke([case, "--model", bundle, "--channel-order", ",".join(order), "--regions", "TC,WT,ET", "--roi-size",
             ",".join(map(str, roi)), "-M", "hirescam", "-l", "convInit", "-t", "WT:class", "--reference",
             f"mask:{next(case.glob('*_seg.nii.gz'))}", "-o", out, "--no-plots", *METRICS, *FAST])  # fmt: skip
    _, rows = _rows(out)
    assert {r["target"] for r in rows} == {"WT-class"} and all(np.isfinite(float(r["value"])) for r in rows)

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    inferer = parser.get_parsed_content("inferer")
    inferer.roi_size = roi
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    net.eval()
    files = [next(case.glob(f"*_{m}.nii.gz")) for m in order]
    data = parser.get_parsed_content("preprocessing")({"image": [str(f) for f in files]})["image"].as_tensor()

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return inferer(x[None], net)[0]

    w = torch.zeros((3, *data.shape[1:]))
    w[1] = 1.0  # WT:class, the whole channel
    smap = SegHiResGradCAM(net, "convInit", inferer=inferer)(data[None], [ClassROI(1)])
    got = _value(rows, "average_drop_percent")
    assert got == pytest.approx(_average_drop(predict, data, smap[0, 0], w), rel=1e-5)
