"""The adapter protocol (medcam.frameworks.base) and the MONAI adapters (medcam.pipeline.adapters): the activation
read from a bundle's own postprocessing transforms, case sources resolved once, the demo/factory adapter through the
one case pipeline with every method of medcam.METHODS."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import medcam
from medcam.frameworks.base import Activation, Framework, FrameworkAdapter, read_monai_postprocessing


@pytest.mark.parametrize(
    "items, activation, argmax, threshold, invertd",
    [
        ([{"_target_": "Activationsd", "keys": "pred", "softmax": True},
          {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}], Activation.SOFTMAX, True, None, False),
        ([{"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
          {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.4}], Activation.SIGMOID, False, 0.4, False),
        ([{"_target_": "AsDiscreted", "keys": "pred", "argmax": True, "to_onehot": 3}], Activation.SOFTMAX, True,
         None, False),
        ([{"_target_": "Activationsd", "keys": ["pred", "x"], "softmax": [False, True]}], Activation.SOFTMAX, False,
         None, False),
        ([], None, False, None, False),
    ],
)  # fmt: skip
def test_postprocessing_read_from_the_transforms_own_fields(items, activation, argmax, threshold, invertd):
    """Activationsd keeps its flags per key on itself (its converter holds none): softmax + argmax is SOFTMAX."""
    from monai.bundle import ConfigParser

    parser = ConfigParser({"post": {"_target_": "Compose", "transforms": items}})
    post = read_monai_postprocessing(parser.get_parsed_content("post"))
    assert (post.activation, post.argmax, post.threshold, post.invertd) == (activation, argmax, threshold, invertd)


def test_case_sources_carry_their_resolved_files(tmp_path, monkeypatch):
    """A BraTS folder is parsed once, at discovery: loading and fingerprinting use the files the source carries."""
    import medcam.brats_layout as brats
    from medcam.data.phantoms import write_phantom_case
    from medcam.pipeline import CaseLayout, discover_cases

    case = write_phantom_case(tmp_path / "c", seed=1, spacing_mm=8.0)
    (src,) = discover_cases([case])
    assert src.kind is CaseLayout.BRATS_FOLDER and src.folder == case
    assert set(src.files) == {"t1", "t1ce", "t2", "flair", "seg"} and all(p.is_file() for p in src.files.values())
    calls = []
    monkeypatch.setattr(brats, "discover_brats_case", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(
        AssertionError("parsed again")))  # fmt: skip
    from medcam.pipeline.run import _cohort_inputs

    _, inputs = _cohort_inputs([src], [])
    assert set(inputs[src.case_id]) == set(src.files) and not calls


def _factory_model():
    from medcam.pipeline import LoadedModel

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(4, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 1)).eval()
    return LoadedModel(net=net, kind="factory", spec="tiny", regions=("A", "B"), activation="softmax",
                       preprocessing={"orientation": "RAS", "spacing": (8.0, 8.0, 8.0), "normalize": True,
                                      "crop_foreground": False, "divisible_by": None})  # fmt: skip


def test_loaded_models_have_typed_kind_activation_and_an_adapter():
    model = _factory_model()
    assert model.kind is Framework.FACTORY and model.activation is Activation.SOFTMAX
    assert isinstance(model.adapter, FrameworkAdapter) and model.adapter.output_names == ("A", "B")
    assert model.describe()["activation"] == "softmax" and json.dumps(model.describe()["kind"]) == '"factory"'


@pytest.mark.parametrize("method", list(medcam.METHODS))
def test_every_method_through_the_monai_adapter(tmp_path, method):
    """Each method of medcam.METHODS (listed, not named) through the factory adapter: a case folder whose
    segmentation is the argmax of the network's output mapped back to the original grid."""
    from medcam.data.phantoms import write_phantom_case
    from medcam.pipeline import explain_case, load_case, parse_targets

    case_dir = write_phantom_case(tmp_path / "case", seed=2, spacing_mm=8.0)
    model = _factory_model()
    case = load_case(case_dir, model)
    s = explain_case(case, model, [method], parse_targets(["B"], model.regions), out_dir=tmp_path / "o",
                     slicer=False, png=False)  # fmt: skip
    row = s["targets"][0]
    assert row["roi_voxels"] > 0 and np.isfinite(row["score"][method])
    seg = nib.load(str(tmp_path / "o" / "segmentation.nii.gz"))
    with torch.no_grad():
        y = model.net(case.image.as_tensor()[None].float())
    expect = np.rint(case.invert(y[0].argmax(0).float(), nearest=True)).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(seg.dataobj), expect)
    assert Path(s["reference_image"]).name.endswith("_t1.nii.gz") and s["segmentation"]["dtype"] == "uint8"


@pytest.mark.parametrize("budget", [None, 0])
def test_sliding_window_case_written_from_the_explanations_own_pass(tmp_path, budget):
    """A predicted-region target through MONAI's sliding window: no separate inference (one network call per
    batch of windows, all graphs kept), the segmentation written from the explanation's prediction equals MONAI's
    sliding_window_inference mapped back; the budget (recorded in the summary's settings) changes nothing."""
    from monai.inferers import SlidingWindowInferer, sliding_window_inference

    from medcam.data.phantoms import write_phantom_case
    from medcam.pipeline import explain_case, load_case, parse_targets

    case_dir = write_phantom_case(tmp_path / "case", seed=2, spacing_mm=8.0)
    model = _factory_model()
    case = load_case(case_dir, model)
    inferer = SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=2, overlap=0.25)
    image = case.image.as_tensor()[None].float()
    with torch.no_grad():
        y = sliding_window_inference(image, (8, 8, 8), 2, model.net, overlap=0.25)
    n_calls = -(-len(medcam.sliding.monai_plan(inferer, image).windows) // 2)
    calls = []
    hook = model.net.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        s = explain_case(case, model, ["hirescam"], parse_targets(["B"], model.regions), "1", inferer=inferer,
                         out_dir=tmp_path / "o", slicer=False, png=False,
                         settings={"graph_budget": budget})  # fmt: skip
    finally:
        hook.remove()
    assert s["timings"]["prediction"] == "one_pass" and s["settings"]["graph_budget"] == budget
    recomputed = 0 if budget is None else n_calls
    assert len(calls) == n_calls + recomputed
    seg = nib.load(str(tmp_path / "o" / "segmentation.nii.gz"))
    expect = np.rint(case.invert(y[0].argmax(0).float(), nearest=True)).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(seg.dataobj), expect)


def test_channel_indexed_layout_for_every_adapter(tmp_path):
    """nnU-Net's input layout (``CASE_XXXX.nii.gz``) is the case pipeline's, not nnU-Net's: a MONAI model with 4
    input channels discovers it, orders image files by their channel index, and refuses a case missing a channel
    (or another number of files) at discovery, naming it."""
    from medcam.pipeline import CaseLayout, load_model
    from medcam.pipeline.errors import PipelineError

    folder = tmp_path / "imagesTs"
    folder.mkdir()
    for cid in ("a", "b"):
        for c in range(4):
            nib.save(nib.Nifti1Image(np.full((4, 4, 4), c, np.float32), np.eye(4)), folder / f"{cid}_{c:04d}.nii.gz")
    (folder / "notes.txt").write_text("not a case")
    adapter = load_model("demo", weights=False).adapter
    cases = adapter.discover([folder])
    assert [c.case_id for c in cases] == ["a", "b"] and all(c.kind is CaseLayout.VOLUMES for c in cases)
    assert [p.name for p in cases[1].channel_files()] == [f"b_{c:04d}.nii.gz" for c in range(4)]
    (one,) = adapter.discover(sorted(folder.glob("b_*.nii.gz"), reverse=True))
    assert one.case_id == "b" and one.channel_files() == cases[1].channel_files()
    (named,) = adapter.discover(sorted(folder.glob("b_*.nii.gz")), case_id="x")
    assert named.case_id == "x"
    with pytest.raises(PipelineError, match="takes 4 input channels"):
        adapter.discover(sorted(folder.glob("b_*.nii.gz"))[:3])
    with pytest.raises(PipelineError, match="--case-id names ONE case, but the input holds 2 cases"):
        adapter.discover([folder], case_id="x")
    one_case = tmp_path / "one"
    one_case.mkdir()
    for f in folder.glob("a_*.nii.gz"):
        (one_case / f.name).symlink_to(f)
    assert [c.case_id for c in adapter.discover([one_case], case_id="x")] == ["x"]
    with pytest.raises(PipelineError, match="use letters, digits"):
        adapter.discover([one_case], case_id="x/y")
    (folder / "b_0002.nii.gz").unlink()
    with pytest.raises(PipelineError, match=r"case 'b' .* has channel files \['0000', '0001', '0003'\]"):
        adapter.discover([folder])
