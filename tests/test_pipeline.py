"""medcam.pipeline: target specs, model loading (demo / factory / bundle), inputs, explain_case, cohorts."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medcam.errors import ModelError, TargetError
from medcam.pipeline import (
    PipelineError,
    discover_cases,
    explain_case,
    explain_cohort,
    load_case,
    load_model,
    make_inferer,
    parse_target,
    parse_targets,
    predict,
    split_parts,
)

REGIONS = ("TC", "WT", "ET")
TINY_SPACING = 8.0
TINY_ROI = (24, 24, 24)


def tiny_net() -> torch.nn.Module:
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    return SegResNet(spatial_dims=3, in_channels=4, out_channels=3, init_filters=8, blocks_down=(1, 1, 1, 1)).eval()


@pytest.fixture
def tiny_demo(monkeypatch):
    """The demo API with a random SegResNet, 8 mm working grid and 24^3 windows (fast on CPU)."""
    from medcam.models import demo

    monkeypatch.setattr(demo, "load_demo_model", lambda device="cpu": tiny_net().to(device))
    monkeypatch.setattr(demo, "DEMO_ROI_SIZE", TINY_ROI)
    monkeypatch.setattr(demo, "DEMO_SPACING_MM", TINY_SPACING)
    monkeypatch.setattr(
        demo,
        "demo_preprocessing_kwargs",
        lambda: {
            "orientation": "RAS",
            "spacing": (TINY_SPACING,) * 3,
            "normalize": True,
            "crop_foreground": False,
            "divisible_by": None,
        },
    )
    return demo


@pytest.fixture(scope="module")
def cases_root(tmp_path_factory) -> Path:
    from medcam.data.phantoms import write_phantom_case

    root = tmp_path_factory.mktemp("cases")
    write_phantom_case(root, seed=3, spacing_mm=3.0)
    write_phantom_case(root, seed=4, spacing_mm=3.0)
    return root


# ----------------------------------------------------------------------------------------------- target specs
@pytest.mark.parametrize(
    "spec,kind,channel,rank,name",
    [
        ("ET", "predicted", 2, None, "ET"),
        ("wt:predicted", "predicted", 1, None, "WT"),
        ("ET:class", "class", 2, None, "ET-class"),
        ("TC:component=largest", "component", 0, 1, "TC-component1"),
        ("TC:component=2", "component", 0, 2, "TC-component2"),
        ("channel:1:class", "class", 1, None, "WT-class"),
    ],
)
def test_parse_target_grammar(spec, kind, channel, rank, name):
    t = parse_target(spec, REGIONS)
    assert (t.kind, t.channel, t.rank, t.name) == (kind, channel, rank, name)


def test_parse_target_errors(tmp_path):
    with pytest.raises(TargetError, match="unknown region 'NCR'.*TC, WT, ET"):
        parse_target("NCR", REGIONS)
    with pytest.raises(TargetError, match="unknown mode"):
        parse_target("ET:biggest", REGIONS)
    with pytest.raises(TargetError, match="ranks start at 1"):
        parse_target("ET:component=0", REGIONS)
    with pytest.raises(TargetError, match="does not exist"):
        parse_target(f"mask:{tmp_path / 'nope.nii.gz'}:WT", REGIONS)
    with pytest.raises(TargetError, match="0 <= x0 < x1"):
        parse_target("box:5,5,5:4,9,9:ET", REGIONS)
    with pytest.raises(TargetError, match="given twice"):
        parse_targets(["ET", "ET:predicted"], REGIONS)
    with pytest.raises(TargetError, match="out of range"):
        parse_target("channel:3", REGIONS)


def test_parse_mask_and_box_specs(tmp_path):
    m = tmp_path / "lesion_mask.nii.gz"
    m.write_bytes(b"x")
    t = parse_target(f"mask:{m}:ET", REGIONS)
    assert (t.kind, t.channel, t.path, t.name) == ("mask", 2, str(m), "mask-lesionmask-ET")
    assert parse_target(f"mask:{m}", REGIONS).region == "WT"  # default region
    with pytest.raises(TargetError, match="say which output region"):
        parse_target(f"mask:{m}", ("a", "b"))
    b = parse_target("box:1,2,3:4,5,6", REGIONS)
    assert b.box == ((1, 2, 3), (4, 5, 6)) and b.channel == 1
    # channel targets without region names
    c = parse_target("channel:0:component=largest", ())
    assert (c.region, c.kind, c.name) == ("ch0", "component", "ch0-component1")


# ----------------------------------------------------------------------------------------------- models
def test_load_demo_without_weights_is_a_clear_error(monkeypatch):
    from medcam.models import demo

    def missing(device="cpu"):
        raise FileNotFoundError("Demo weights 'demo_segresnet.pt' not found")

    monkeypatch.setattr(demo, "load_demo_model", missing)
    with pytest.raises(ModelError, match="not found"):
        load_model("demo")
    # the architecture alone (medcam layers) needs no weights
    assert load_model("demo", weights=False).net.__class__.__name__ == "SegResNet"


def test_fake_monai_bundle(tmp_path):
    from monai.networks.nets import SegResNet

    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    cfg = {
        "network_def": {
            "_target_": "monai.networks.nets.SegResNet",
            "spatial_dims": 3,
            "in_channels": 4,
            "out_channels": 3,
            "init_filters": 8,
            "blocks_down": [1, 1],
            "blocks_up": [1],
        },
        "network": "$@network_def.to('cpu')",
    }
    (bundle / "configs" / "inference.json").write_text(json.dumps(cfg))
    torch.manual_seed(1)
    ref = SegResNet(spatial_dims=3, in_channels=4, out_channels=3, init_filters=8, blocks_down=(1, 1), blocks_up=(1,))
    torch.save(ref.state_dict(), bundle / "models" / "model.pt")
    loaded = load_model(str(bundle), regions=REGIONS, channel_order=("t1ce", "t1", "t2", "flair"))
    assert loaded.kind == "bundle" and loaded.in_channels == 4 and loaded.channel_order[0] == "t1ce"
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded.net(x), ref.eval()(x))
    # wrong weights for the architecture: named keys in the message
    torch.save({"foo": torch.zeros(1)}, bundle / "models" / "model.pt")
    with pytest.raises(ModelError, match="do not fit"):
        load_model(str(bundle))
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(PipelineError, match="no models/model.pt"):
        load_model(str(bundle))
    (bundle / "configs" / "inference.json").unlink()
    with pytest.raises(PipelineError, match="not a MONAI bundle"):
        load_model(str(bundle))


def _bundle_with_inferer(root, inferer):
    from monai.networks.nets import SegResNet

    root.joinpath("configs").mkdir(parents=True)
    root.joinpath("models").mkdir()
    cfg = {
        "network_def": {
            "_target_": "monai.networks.nets.SegResNet",
            "spatial_dims": 3,
            "in_channels": 4,
            "out_channels": 3,
            "init_filters": 8,
            "blocks_down": [1, 1],
            "blocks_up": [1],
        },
        "inferer": inferer,
    }
    (root / "configs" / "inference.json").write_text(json.dumps(cfg))
    net = SegResNet(spatial_dims=3, in_channels=4, out_channels=3, init_filters=8, blocks_down=(1, 1), blocks_up=(1,))
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


def test_bundle_sliding_window_settings_are_reused(tmp_path, caplog):
    """A bundle's own SlidingWindowInferer sets roi/overlap/sw_batch/mode unless the command line overrides them."""
    from medcam.pipeline import make_inferer, sliding_settings

    sw = {
        "_target_": "SlidingWindowInferer",
        "roi_size": [32, 32, 16],
        "sw_batch_size": 2,
        "overlap": 0.5,
        "mode": "gaussian",
    }
    loaded = load_model(str(_bundle_with_inferer(tmp_path / "a", sw)))
    assert loaded.roi_size == (32, 32, 16)
    assert loaded.sliding == {"overlap": 0.5, "sw_batch_size": 2, "mode": "gaussian"}
    inferer = make_inferer(loaded.roi_size, **sliding_settings(loaded.sliding, overlap=None, sw_batch_size=None))
    assert (inferer.overlap, inferer.sw_batch_size, str(getattr(inferer.mode, "value", inferer.mode))) == (
        0.5,
        2,
        "gaussian",
    )
    assert sliding_settings(loaded.sliding, overlap=0.1, mode=None) == {
        "overlap": 0.1,
        "sw_batch_size": 2,
        "mode": "gaussian",
    }
    # --roi-size still wins over the bundle's
    assert load_model(str(tmp_path / "a"), roi_size=(16, 16, 16)).roi_size == (16, 16, 16)
    # no sliding-window inferer: whole image and medcam's defaults
    simple = load_model(str(_bundle_with_inferer(tmp_path / "b", {"_target_": "SimpleInferer"})))
    assert simple.roi_size is None and sliding_settings(simple.sliding) == {
        "overlap": 0.25,
        "sw_batch_size": 1,
        "mode": "constant",
    }
    # an inferer that cannot be built alone: a warning, then the defaults
    broken = {"_target_": "SlidingWindowInferer", "roi_size": "@missing_key"}
    with caplog.at_level("WARNING", logger="medcam"):  # a CLI test may have set medcam's level
        odd = load_model(str(_bundle_with_inferer(tmp_path / "c", broken)))
    assert odd.roi_size is None and odd.sliding == {} and "inferer could not be built" in caplog.text


def test_factory_checkpoint_and_torchscript(tmp_path):
    fac = tmp_path / "my_nets.py"
    fac.write_text(
        "import torch\n"
        "def build():\n    return torch.nn.Sequential(torch.nn.Conv3d(2, 3, 1))\n"
        "def scripted():\n    return torch.jit.script(build())\n"
    )
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 3, 1))
    ck = tmp_path / "w.pt"
    torch.save({"state_dict": net.state_dict()}, ck)
    loaded = load_model(f"{fac}:build", checkpoint=ck)
    assert loaded.kind == "factory" and loaded.in_channels == 2
    assert torch.equal(loaded.net[0].weight, net[0].weight)
    ts = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(net), str(ts))
    with pytest.raises(ModelError, match="TorchScript"):
        load_model(str(ts))
    with pytest.raises(ModelError, match="TorchScript"):
        load_model(f"{fac}:build", checkpoint=ts)
    with pytest.raises(ModelError, match="TorchScript"):
        load_model(f"{fac}:scripted")
    with pytest.raises(PipelineError, match="no callable 'nope'"):
        load_model(f"{fac}:nope")
    with pytest.raises(PipelineError, match="not found"):
        load_model("no_such_model")


# ----------------------------------------------------------------------------------------------- inputs
def test_discover_cases(cases_root, tmp_path):
    (cases_root / "notes").mkdir(exist_ok=True)
    cohort = discover_cases([cases_root])
    assert [c.case_id for c in cohort] == ["Phantom_00003", "Phantom_00004"]
    one = discover_cases([cases_root / "Phantom_00003"])
    assert len(one) == 1 and one[0].kind == "brats_folder"
    files = sorted((cases_root / "Phantom_00003").glob("*_t*.nii.gz"))
    vol = discover_cases(files)
    assert len(vol) == 1 and vol[0].kind == "volumes" and len(vol[0].source) == len(files)
    csv = tmp_path / "m.csv"
    c3 = cases_root / "Phantom_00003"
    csv.write_text(
        "case_id,folder,t1,t1ce,t2,flair\n"
        f"a,{cases_root / 'Phantom_00004'},,,,\n"
        f"b,,{c3}/Phantom_00003_t1.nii.gz,{c3}/Phantom_00003_t1ce.nii.gz,{c3}/Phantom_00003_t2.nii.gz,"
        f"{c3}/Phantom_00003_flair.nii.gz\n"
    )
    man = discover_cases([csv])
    assert [(c.case_id, c.kind) for c in man] == [("a", "brats_folder"), ("b", "brats_mapping")]
    with pytest.raises(PipelineError, match="does not exist"):
        discover_cases([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="no BraTS case"):
        discover_cases([tmp_path / "empty"])


def test_split_parts_cover_the_cohort_once():
    from medcam.pipeline import CaseSource

    cases = [CaseSource(f"c{i}", "volumes", []) for i in (5, 1, 4, 2, 3)]
    parts = [split_parts(cases, 3, i) for i in range(3)]
    ids = [c.case_id for p in parts for c in p]
    assert sorted(ids) == ["c1", "c2", "c3", "c4", "c5"] and len(set(ids)) == 5
    assert [c.case_id for c in parts[0]] == ["c1", "c4"]
    with pytest.raises(PipelineError, match="part-id"):
        split_parts(cases, 2, 2)


# ----------------------------------------------------------------------------------------------- explaining
def test_mask_target_matches_the_case_pipeline(tiny_demo, cases_root, tmp_path):
    """A mask on the original grid is mapped exactly like the label through the preprocessing."""
    from medcam.pipeline import build_targets

    model = load_model("demo")
    case = load_case(cases_root / "Phantom_00003", model)
    seg = nib.load(str(cases_root / "Phantom_00003" / "Phantom_00003_seg.nii.gz"))
    wt = tmp_path / "wt.nii.gz"
    nib.save(nib.Nifti1Image((np.asarray(seg.dataobj) > 0).astype(np.uint8), seg.affine), str(wt))
    (t,) = build_targets(parse_targets([f"mask:{wt}:WT"], REGIONS), case)
    m = t.mask.numpy()
    ref = case.label[1].numpy() > 0
    assert m.shape == tuple(case.image.shape[1:])
    assert (m > 0).sum() > 5 and np.mean((m > 0) == ref) > 0.995
    # a mask on another grid is refused
    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.uint8), np.eye(4)), str(bad))
    with pytest.raises(TargetError, match="original image grid"):
        build_targets(parse_targets([f"mask:{bad}"], REGIONS), case)


def test_explain_case_writes_maps_on_the_original_grid(tiny_demo, cases_root, tmp_path):
    model = load_model("demo")
    case = load_case(cases_root / "Phantom_00003", model)
    specs = parse_targets(["WT", "ET:class", "box:20,20,20:40,50,40:TC"], REGIONS)
    inferer = make_inferer(model.roi_size)
    out = tmp_path / "case"
    s = explain_case(case, model, ["hirescam", "gradcam"], specs, None, inferer, out, png=True, slicer=True)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["targets"] == json.loads(json.dumps(s["targets"]))
    assert s["layer"] == "down_layers.3" and s["status"] == "ok"
    assert set(s["versions"]) >= {"medcam", "torch", "monai"} and s["timings"]["total_s"] > 0
    # independent check of ROI sizes and scores from the blended output
    image = case.image.as_tensor()[None]
    y = predict(model.net, image, inferer)
    wt_roi = torch.sigmoid(y[0, 1]) > 0.5
    rows = {r["name"]: r for r in s["targets"]}
    assert rows["WT"]["roi_voxels"] == int(wt_roi.sum()) == s["predicted_voxels"]["WT"]
    assert rows["WT"]["score"]["hirescam"] == pytest.approx(float(y[0, 1][wt_roi].sum()), rel=1e-4, abs=1e-3)
    assert rows["ET-class"]["roi_voxels"] == int(np.prod(case.image.shape[1:]))
    assert rows["ET-class"]["score"]["gradcam"] == pytest.approx(float(y[0, 2].sum()), rel=1e-4)
    assert 0 < rows["box-TC"]["roi_voxels"] < rows["ET-class"]["roi_voxels"]
    # heatmaps: original shape and affine, non-negative, finite
    t1 = nib.load(str(cases_root / "Phantom_00003" / "Phantom_00003_t1.nii.gz"))
    for r in s["targets"]:
        for m in ("hirescam", "gradcam"):
            img = nib.load(str(out / r["heatmaps"][m]))
            arr = np.asarray(img.dataobj)
            assert arr.shape == t1.shape and np.allclose(img.affine, t1.affine, atol=1e-4)
            assert np.isfinite(arr).all() and arr.min() >= 0
            assert (out / r["overlays"][m]).read_bytes()[:4] == b"\x89PNG"
    assert (out / "slicer" / "scene.mrml").is_file() and (out / "slicer" / "segmentation.seg.nrrd").is_file()
    assert not list(tmp_path.glob(".partial-*"))
    # never overwrites without being asked
    with pytest.raises(PipelineError, match="already exists"):
        explain_case(case, model, ["hirescam"], specs[:1], None, inferer, out)


def test_cohort_failures_resume_and_parts(tiny_demo, cases_root, tmp_path):
    import shutil

    root = tmp_path / "cohort"
    for d in ("Phantom_00003", "Phantom_00004"):
        shutil.copytree(cases_root / d, root / d)
    broken = root / "Broken_00001"
    broken.mkdir()
    for m in ("t1", "t1ce", "t2", "flair"):
        (broken / f"Broken_00001_{m}.nii.gz").write_bytes(b"not a nifti at all")
    model = load_model("demo")
    specs = parse_targets(["WT"], REGIONS)
    inferer = make_inferer(model.roi_size)
    out = tmp_path / "out"
    kw = dict(png=False, slicer=False, progress=False, settings={"m": 1})
    run = explain_cohort(discover_cases([root]), model, ["hirescam"], specs, None, inferer, out, **kw)
    assert (run["ok"], run["skipped"], run["failed"]) == (2, 0, 1)
    failed = [c for c in run["cases"] if c["status"] == "failed"]
    assert failed[0]["case_id"] == "Broken_00001" and "Broken_00001_t1.nii.gz" in failed[0]["error"]
    assert not (out / "Broken_00001").exists()
    on_disk = json.loads((out / "cohort_summary.json").read_text())
    assert on_disk["failed"] == 1 and len(on_disk["cases"]) == 3
    # resume: finished cases are skipped, the broken one is retried (and fails again)
    mtime = (out / "Phantom_00003" / "summary.json").stat().st_mtime_ns
    run2 = explain_cohort(discover_cases([root]), model, ["hirescam"], specs, None, inferer, out, **kw)
    assert (run2["ok"], run2["skipped"], run2["failed"]) == (0, 2, 1)
    assert (out / "Phantom_00003" / "summary.json").stat().st_mtime_ns == mtime
    # other settings: the whole run is refused before anything is written (issue 19), not silently skipped
    with pytest.raises(PipelineError, match="other settings"):
        explain_cohort(
            discover_cases([root]), model, ["hirescam"], specs, None, inferer, out, **{**kw, "settings": {"m": 2}}
        )
    # parts: each part writes its own run summary and handles its own share
    out2 = tmp_path / "out2"
    cases = discover_cases([root / "Phantom_00003"]) + discover_cases([root / "Phantom_00004"])
    r0 = explain_cohort(cases, model, ["hirescam"], specs, None, inferer, out2, num_parts=2, part_id=1, **kw)
    assert [c["case_id"] for c in r0["cases"]] == ["Phantom_00004"]
    assert (out2 / "cohort_summary.part1-of-2.json").is_file() and not (out2 / "Phantom_00003").exists()


def test_resolve_device_errors():
    from medcam.pipeline import PipelineError, resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(PipelineError, match="unknown --device 'gpu9'"):
        resolve_device("gpu9")
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="CUDA is not available"):
            resolve_device("cuda:0")
