"""MONAI bundles run as the bundle runs them: its own preprocessing, inferer and Invertd (medcam.pipeline).

The bundle folder is laid out like the model zoo's ``brats_mri_segmentation`` (configs/inference.json with
``network_def``, ``preprocessing`` = LoadImaged + EnsureChannelFirstd + NormalizeIntensityd(nonzero, channel_wise),
``inferer`` = SlidingWindowInferer, ``postprocessing`` = Activationsd(sigmoid) + Invertd + AsDiscreted; weights
created here), on a phantom stored LPS (the bundle does not reorient; medcam's own pipeline would).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import medcam
from medcam.cli import main
from medcam.data.phantoms import write_phantom_case

NET = {
    "_target_": "SegResNet",
    "spatial_dims": 3,
    "in_channels": 4,
    "out_channels": 3,
    "init_filters": 8,
    "blocks_down": [1, 1],
    "blocks_up": [1],
}


def _bundle(root: Path, with_preprocessing: bool = True) -> Path:
    from monai.networks.nets import SegResNet

    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    cfg = {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data/medical/brats2018challenge",
        "device": "$torch.device('cpu')",
        "network_def": NET,
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True},
            ],
        },
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 1, "overlap": 0.5},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
            ],
        },
    }
    if not with_preprocessing:
        del cfg["preprocessing"], cfg["postprocessing"]
    (root / "configs" / "inference.json").write_text(json.dumps(cfg, indent=2))
    torch.manual_seed(3)
    net = SegResNet(spatial_dims=3, in_channels=4, out_channels=3, init_filters=8, blocks_down=(1, 1), blocks_up=(1,))
    with torch.no_grad():
        net.conv_final[-1].conv.bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


def _bundle_prediction(bundle: Path, files: list[Path]) -> np.ndarray:
    """What the bundle's own components predict (preprocessing -> inferer -> postprocessing), original grid."""
    from monai.bundle import ConfigParser
    from monai.data import decollate_batch

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    pre = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    post = parser.get_parsed_content("postprocessing")
    net = parser.get_parsed_content("network")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    net.eval()
    d = pre({"image": [str(f) for f in files]})
    batch = {"image": d["image"][None]}
    with torch.no_grad():
        batch["pred"] = inferer(batch["image"], net)
    out = post(decollate_batch(batch)[0])
    return np.asarray(out["pred"])


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Path:
    return write_phantom_case(tmp_path_factory.mktemp("bundle_case"), seed=4, spacing_mm=4.0)


def _files(case: Path, order=("t1ce", "t1", "t2", "flair")) -> list[Path]:
    cid = case.name
    return [case / f"{cid}_{m}.nii.gz" for m in order]


def test_bundle_runs_its_own_pipeline(tmp_path, case):
    bundle = _bundle(tmp_path / "brats_mri_segmentation")
    out = tmp_path / "out"
    args = ["explain", str(case), "--model", str(bundle), "--channel-order", "t1ce,t1,t2,flair", "-o", str(out)]
    r = CliRunner().invoke(main, [*args, "--no-png", "--no-slicer", "-q", "--regions", "TC,WT,ET"])
    assert r.exit_code == 0, (r.output, r.stderr)
    summary = json.loads((out / case.name / "summary.json").read_text())
    assert summary["model"]["pipeline"]["preprocessing"] == "bundle"
    assert summary["model"]["pipeline"]["inverse"] == "bundle Invertd"
    assert summary["model"]["activation"] == "sigmoid"
    # the bundle does not reorient: the preprocessed grid is the file's grid (LPS here)
    ref = nib.load(str(_files(case)[0]))
    assert summary["preprocessed_shape"] == list(ref.shape)
    theirs = _bundle_prediction(bundle, _files(case))
    assert theirs.shape == (3, *ref.shape)
    expected = {name: int(theirs[c].sum()) for c, name in enumerate(("TC", "WT", "ET"))}
    assert summary["predicted_voxels"] == expected
    assert 0 < expected["WT"] < theirs[0].size
    for row in summary["targets"]:
        hm = nib.load(str(out / case.name / row["heatmaps"]["hirescam"]))
        assert hm.shape == ref.shape
        np.testing.assert_allclose(hm.affine, ref.affine, atol=1e-5)


def test_bundle_without_preprocessing_falls_back(tmp_path, case):
    from medcam.pipeline import load_model

    bundle = _bundle(tmp_path / "b", with_preprocessing=False)
    loaded = load_model(str(bundle))
    assert loaded.pipeline["preprocessing"] == "medcam" and "no 'preprocessing'" in loaded.pipeline["reason"]
    assert loaded.bundle_preprocessing is None
    # preprocessing options given on the command line: medcam's pipeline, and the summary says why
    bundle2 = _bundle(tmp_path / "c")
    loaded = load_model(str(bundle2), preprocessing={"orientation": "RAS"})
    assert loaded.pipeline == {"preprocessing": "medcam", "inverse": "medcam", "reason": "preprocessing options given"}
    assert load_model(str(bundle2)).pipeline["preprocessing"] == "bundle"


# ---------------------------------------------------------------------------------------------------- the zoo's configs
def test_zoo_brats_config_on_a_real_case_with_slicer_scene_and_report(tmp_path, real_brats_case):
    """The model zoo's brats_mri_segmentation inference.json as shipped (seeded weights of its SegResNet) on a real
    BraTS case: the case folder holds the Slicer scene (its volumes keyed by modality, the crash of issue 25), the
    report reads it, the activation is the bundle's sigmoid, and the segmentation is the bundle's own
    (Activationsd -> Invertd -> AsDiscreted(threshold=0.5)) voxel for voxel. The case is a 64 x 64 x 48 crop and
    ``--roi-size`` sets the window to it: the shipped 240 x 240 x 160 window takes minutes per pass on a CI CPU."""
    from .conftest import bundle_components, write_bundle, zoo_config

    bundle = write_bundle(tmp_path / "brats_mri_segmentation", zoo_config("brats_mri_segmentation"), seed=5)
    out = tmp_path / "out"
    order = ("t1ce", "t1", "t2", "flair")  # the bundle's channel order (its datalist)
    args = ["explain", str(real_brats_case), "--model", str(bundle), "--channel-order", ",".join(order)]
    args += ["-o", str(out), "--regions", "TC,WT,ET", "--roi-size", "64,64,48", "--report", "-q"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, (r.output, r.stderr)
    cdir = out / real_brats_case.name
    summary = json.loads((cdir / "summary.json").read_text())
    assert summary["model"]["activation"] == "sigmoid"
    assert summary["model"]["pipeline"] == {"preprocessing": "bundle", "inverse": "bundle Invertd"}
    assert (cdir / "slicer" / "scene.mrml").is_file() and (cdir / "montage.png").is_file()
    scene = (cdir / "slicer" / "scene.mrml").read_text()
    assert all(f'fileName="image_{m}.nii.gz"' in scene for m in order)  # every modality, by its name
    assert (out / "report" / "index.html").is_file()
    files = [real_brats_case / f"{real_brats_case.name}_{m}.nii.gz" for m in order]
    theirs = bundle_components(bundle, files, roi_size=(64, 64, 48))["pred"]  # [3, X, Y, Z] 0/1
    seg = np.asarray(nib.load(str(cdir / "segmentation.nii.gz")).dataobj)
    bits = sum(theirs[c].astype(np.uint8) << c for c in range(3))
    np.testing.assert_array_equal(seg, bits)
    assert 0 < int((seg > 0).sum()) < seg.size
    assert summary["predicted_voxels"] == {n: int(theirs[c].sum()) for c, n in enumerate(("TC", "WT", "ET"))}


def _tiny_spleen_config() -> dict:
    """The zoo's spleen_ct_segmentation inference.json as shipped, but for ``network_def`` (the key a bundle's
    users override, ``monai.bundle run --network_def#...``): the same UNet, two levels of 4/8 channels."""
    from .conftest import zoo_config

    cfg = zoo_config("spleen_ct_segmentation")
    cfg["network_def"].update({"channels": [4, 8], "strides": [2], "num_res_units": 1})
    return cfg


@pytest.fixture(scope="module")
def spleen_bundle(tmp_path_factory) -> Path:
    from .conftest import write_bundle

    return write_bundle(tmp_path_factory.mktemp("zoo") / "spleen_ct_segmentation", _tiny_spleen_config(), seed=11)


def test_zoo_softmax_bundle_predicts_the_bundles_region_on_the_original_grid(tmp_path, spleen_bundle, ct_volume):
    """spleen_ct_segmentation (softmax + argmax, Orientationd RAS + Spacingd 1.5 x 1.5 x 2 mm) on a volume stored
    LPS-like at 3 x 3.5 x 5 mm: medcam explains the argmax region (not a sigmoid threshold), and its segmentation
    equals the bundle's own preprocessing -> inferer -> Activationsd(softmax) -> Invertd -> AsDiscreted(argmax)
    voxel for voxel on the original grid."""
    from .conftest import bundle_components

    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["explain", str(ct_volume), "--model", str(spleen_bundle), "-o", str(out),
                                  "--target", "channel:1", "--no-png", "-q"])  # fmt: skip
    assert r.exit_code == 0, (r.output, r.stderr)
    cdir = out / "ct_case"
    summary = json.loads((cdir / "summary.json").read_text())
    assert summary["model"]["activation"] == "softmax"
    ref = nib.load(str(ct_volume))
    theirs = bundle_components(spleen_bundle, ct_volume)
    assert summary["preprocessed_shape"] == list(theirs["image"].shape[1:]) != list(ref.shape)
    seg = np.asarray(nib.load(str(cdir / "segmentation.nii.gz")).dataobj)
    assert seg.shape == ref.shape and seg.dtype == np.uint8
    np.testing.assert_array_equal(seg, theirs["pred"][0].astype(np.uint8))
    assert 0 < int(seg.sum()) < seg.size
    # the explained region: the argmax of the bundle's logits on its grid
    on_grid = int((theirs["logits"][0].argmax(0) == 1).sum())
    assert summary["targets"][0]["roi_voxels"] == on_grid == summary["predicted_voxels"]["ch1"]
    hm = nib.load(str(cdir / summary["targets"][0]["heatmaps"]["hirescam"]))
    assert hm.shape == ref.shape and np.allclose(hm.affine, ref.affine)


@pytest.mark.parametrize("method", list(medcam.METHODS))
def test_every_method_through_the_bundle_adapter(tmp_path, spleen_bundle, ct_volume, method):
    """Each method of medcam.METHODS (listed, not named) through the bundle adapter and the one case pipeline."""
    from medcam.pipeline import explain_case, load_case, load_model, make_inferer, parse_targets, sliding_settings

    model = load_model(str(spleen_bundle))
    case = load_case(ct_volume, model)
    specs = parse_targets(["channel:1"], model.regions)
    inferer = make_inferer(model.roi_size, **sliding_settings(model.sliding))  # the bundle's own inferer settings
    s = explain_case(case, model, [method], specs, inferer=inferer, out_dir=tmp_path / "c", slicer=False, png=False)
    row = s["targets"][0]
    assert row["roi_voxels"] > 0 and np.isfinite(row["score"][method]) and row["map_max"][method] >= 0
    assert (tmp_path / "c" / row["heatmaps"][method]).is_file() and s["segmentation"]["file"] == "segmentation.nii.gz"
