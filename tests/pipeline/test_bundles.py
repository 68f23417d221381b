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
