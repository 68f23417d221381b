"""nnU-Net v2 model folders explained as nnUNetPredictor runs them (medcam.frameworks.nnunet).

The model folders are built once per session from phantoms with nnU-Net's own entry points (tests/_nnunet_build.py):
a region-based model (sigmoid, BraTS regions, 2 folds, mirroring over 3 axes, patch 12^3 so that a case needs
several tiles) and a label-based one (softmax, 1 fold).
"""

from __future__ import annotations

import copy
import functools
import glob
import itertools
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2")

import medcam  # noqa: E402
from medcam.frameworks import nnunet  # noqa: E402
from medcam.targets import BoxROI, PredictedROI  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "nnUNetTrainer__nnUNetPlans__3d_fullres"


@pytest.fixture(scope="session")
def nnunet_root(nnunet_models) -> Path:
    """The nnU-Net v2 model folders built once per run (``nnunet_models`` in tests/conftest.py)."""
    return nnunet_models


@pytest.fixture(scope="session")
def region_folder(nnunet_root) -> Path:
    return nnunet_root / "results" / "Dataset502_Phantom" / CONFIG


@pytest.fixture(scope="session")
def label_folder(nnunet_root) -> Path:
    return nnunet_root / "results" / "Dataset501_PhantomLabels" / CONFIG


@pytest.fixture(scope="session")
def case_files(nnunet_root) -> list[str]:
    return sorted(glob.glob(str(nnunet_root / "raw" / "Dataset502_Phantom" / "imagesTr" / "phantom_001_*.nii.gz")))


# ---------------------------------------------------------------------------------------------------- reference
def reference_maps(model, data, weights_fn, method: str):
    """Plain autograd through nnU-Net's own sliding-window prediction, float64.

    nnU-Net's pieces: ``pad_nd_image``, ``_internal_get_sliding_window_slicers``, ``compute_gaussian`` and the
    predictor's own mirroring function ``_internal_maybe_mirror_and_predict`` (its undecorated body, so that autograd
    sees it); the blending ``sum G y / sum G`` and the fold mean are written out literally (nnU-Net's loop does them
    in place in float16 under inference mode). Every activation of the hooked layer (one per network pass) is kept
    and ``dS/dA`` is taken by one ``torch.autograd.grad`` over the whole computation.
    """
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    pred = model.predictor
    net = model.network
    patch = model.patch_size
    acts: list[torch.Tensor] = []
    nets, hooks = [], []
    for params in model.parameters:  # one network per fold: loading weights in place would break the graph
        nf = copy.deepcopy(net)
        nf.load_state_dict(params)
        nets.append(nf)
        layer = dict(nf.named_modules())["encoder.stages.2"]
        hooks.append(layer.register_forward_hook(lambda m, i, o: acts.append(o) or o))
    padded, revert = pad_nd_image(data, patch, "constant", {"value": 0}, True, None)
    slicers = pred._internal_get_sliding_window_slicers(padded.shape[1:])
    gauss = compute_gaussian(tuple(patch), sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu"))
    gauss = gauss.double()
    y_sum = 0
    passes = []  # (slicer, mirror dims) per captured activation, in capture order
    combos = [(), *[c for i in range(3) for c in itertools.combinations([2, 3, 4], i + 1)]]
    try:
        with torch.enable_grad():
            for nf in nets:
                holder = types.SimpleNamespace(
                    network=nf, allowed_mirroring_axes=pred.allowed_mirroring_axes, use_mirroring=True
                )
                mirror = types.MethodType(nnUNetPredictor._internal_maybe_mirror_and_predict.__wrapped__, holder)
                num = torch.zeros((3 if model.label_manager.has_regions else 4, *padded.shape[1:]), dtype=torch.float64)
                den = torch.zeros(padded.shape[1:], dtype=torch.float64)
                for sl in slicers:
                    y = mirror(padded[sl][None].double())[0]
                    passes.extend((sl, c) for c in combos)
                    add = torch.zeros_like(num)
                    add[sl] = y * gauss
                    num = num + add
                    dg = torch.zeros_like(den)
                    dg[sl[1:]] = gauss
                    den = den + dg
                y_sum = y_sum + num / den
            y_vol = (y_sum / len(model.parameters))[(slice(None), *revert[1:])]
            w = weights_fn(y_vol[None].detach().float()).double()[0]
            score = (w * y_vol).sum()
            grads = torch.autograd.grad(score, acts)
    finally:
        for h in hooks:
            h.remove()
    acc = torch.zeros(padded.shape[1:], dtype=torch.float64)
    n_pass = len(combos) * len(model.parameters)
    up = functools.partial(torch.nn.functional.interpolate, size=patch, mode="trilinear", align_corners=False)
    if method == "hirescam":
        for (sl, c), a, g in zip(passes, acts, grads):
            m = up((g * a).sum(1, keepdim=True))
            acc[sl[1:]] += (torch.flip(m, c) if c else m)[0, 0]
    else:  # gradcam: global alpha = sum of all gradients / N, map blended like the output
        n_pos = float(np.prod([s * f / p for s, f, p in zip(data.shape[1:], acts[0].shape[2:], patch)]))
        alpha = sum(g.sum((0, 2, 3, 4)) for g in grads) / n_pos
        den = torch.zeros(padded.shape[1:], dtype=torch.float64)
        for sl in slicers:
            den[sl[1:]] += gauss
        for (sl, c), a in zip(passes, acts):
            m = up((alpha[None, :, None, None, None] * a).sum(1, keepdim=True))
            acc[sl[1:]] += (torch.flip(m, c) if c else m)[0, 0] * gauss / den[sl[1:]] / n_pass
    return acc[revert[1:]].detach(), y_vol.detach(), score.detach()


class _Float64Accumulation:
    """``torch`` as nnU-Net's predictor module sees it, with its float16 buffers made float64."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, dtype=None, **kwargs):
        return torch.zeros(*args, dtype=torch.float64 if dtype == torch.half else dtype, **kwargs)


@pytest.mark.parametrize("method", ["hirescam", "gradcam"])
def test_equals_autograd_through_nnunet_sliding_window(region_folder, case_files, method, monkeypatch):
    model = nnunet.load(region_folder, folds=(0, 1))
    assert len(model.mirror_axes) == 3 and len(model.parameters) == 2
    data, _ = model.preprocess(case_files)
    data = data[:, 2:18, 3:19, 3:15].contiguous()  # 2 x 2 x 1 overlapping tiles: 4 tiles x 8 mirrors x 2 folds
    model.network.double()
    try:
        n_tiles = len(model.predictor._internal_get_sliding_window_slicers(data.shape[1:]))
        assert n_tiles == 4
        target = BoxROI(model.channel("tumor core"), (4, 5, 3), (15, 14, 10))
        ref, y_ref, s_ref = reference_maps(model, data.double(), target.score_weights, method)
        cls = {"hirescam": medcam.SegHiResGradCAM, "gradcam": medcam.SegGradCAM}[method]
        cam = cls(model.network, "encoder.stages.2")
        res = nnunet.explain(cam, model, data.double(), [target], logits=y_ref, relu=False)
        # the reference follows nnU-Net: its logits equal the predictor's own run in float64 (nnU-Net accumulates
        # in float16, which loses the image corners where only Gaussian tails reach)
        import nnunetv2.inference.predict_from_raw_data as pfrd

        monkeypatch.setattr(pfrd, "torch", _Float64Accumulation())
        y_nn = model.predict_logits(data.double())
    finally:
        model.network.float()
    got = res.maps[0, 0].double()
    assert got.shape == ref.shape == data.shape[1:]
    assert float(ref.detach().abs().max()) > 0
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert float(res.scores[0, 0]) == pytest.approx(float(s_ref), rel=1e-5)
    torch.testing.assert_close(y_nn.double(), y_ref, rtol=1e-6, atol=1e-6 * float(y_ref.abs().max()))


@pytest.mark.parametrize("method", ["hirescam", "gradcam", "xgradcam", "gradcam++", "layercam"])
def test_one_tile_no_mirroring_equals_whole_volume(region_folder, case_files, method):
    model = nnunet.load(region_folder, folds=(0,), use_mirroring=False)
    data, _ = model.preprocess(case_files)
    x = data[:, 2:14, 4:16, 3:15].contiguous()  # exactly one 12^3 tile
    assert len(model.predictor._internal_get_sliding_window_slicers(x.shape[1:])) == 1
    targets = [BoxROI(0, (2, 2, 2), (10, 9, 11)), BoxROI(2, (0, 3, 1), (6, 12, 12))]
    cls = medcam.METHODS[method]
    whole = cls(model.network, "decoder.stages.0").explain(x[None], targets)
    # the scores use the given logits (nnU-Net's own are accumulated in float16: about 1 % off here)
    res = nnunet.explain(cls(model.network, "decoder.stages.0"), model, x, targets, logits=whole.output[0])
    assert res.stats["passes"] >= 1
    torch.testing.assert_close(res.maps, whole.maps, rtol=1e-4, atol=1e-5 * float(whole.maps.abs().max()))
    torch.testing.assert_close(res.scores, whole.scores, rtol=1e-5, atol=1e-5)


def test_segmentation_equals_nnunet_predictor(region_folder, case_files, tmp_path):
    import SimpleITK as sitk
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    model = nnunet.load(region_folder, folds=(0, 1))
    data, props = model.preprocess(case_files)
    res = nnunet.explain(medcam.SegHiResGradCAM(model.network), model, data, [model.target("whole tumor")])
    seg = model.segmentation(res.output[0], props)
    pred = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(region_folder), (0, 1), "checkpoint_final.pth")
    (tmp_path / "out").mkdir()
    pred.predict_from_files_sequential([case_files], str(tmp_path / "out"))
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "phantom_001.nii.gz")))
    assert seg.shape == theirs.shape
    np.testing.assert_array_equal(seg, theirs)
    assert 0 < int((theirs > 0).sum()) < theirs.size
    # maps go back to the original grid like the segmentation, and are written with the image's geometry
    orig = model.to_original_grid(res.maps[0], props)
    assert orig.shape == (1, *theirs.shape)
    out = model.write_map(orig[0], props, tmp_path / "map.nii.gz")
    img, ref = sitk.ReadImage(str(out)), sitk.ReadImage(case_files[0])
    assert img.GetSize() == ref.GetSize()
    np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing())
    np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin())
    np.testing.assert_allclose(img.GetDirection(), ref.GetDirection())


def test_targets_by_dataset_names(region_folder, label_folder, case_files):
    reg = nnunet.load(region_folder)
    assert reg.output_names == ["whole tumor", "tumor core", "enhancing tumor"]
    assert reg.activation == "sigmoid" and reg.channel("Enhancing Tumor") == 2
    lab = nnunet.load(label_folder, use_mirroring=False)
    assert lab.output_names == ["background", "necrosis", "edema", "enhancing tumor"]
    assert lab.activation == "softmax" and lab.channel("edema") == 2
    t = lab.target("edema")
    assert isinstance(t, PredictedROI) and t.channel == 2
    data, _ = lab.preprocess(case_files)
    y = lab.predict_logits(data)
    res = nnunet.explain(medcam.SegHiResGradCAM(lab.network), lab, data, [t], logits=y)
    expected_roi = int((y.argmax(0) == 2).sum())
    assert int(res.roi_voxels[0, 0]) == expected_roi
    with pytest.raises(nnunet.NnUNetError, match="not a label or region"):
        reg.channel("oedema")


def test_bad_inputs(region_folder, case_files, tmp_path, monkeypatch):
    import shutil

    with pytest.raises(nnunet.NnUNetError, match="does not exist"):
        nnunet.load(tmp_path / "nope")
    bad = tmp_path / "copy"
    shutil.copytree(region_folder, bad)
    with pytest.raises(nnunet.NnUNetError, match="has no fold_3"):
        nnunet.load(bad, folds=(3,))
    with pytest.raises(nnunet.NnUNetError, match="no checkpoint_best.pth"):
        nnunet.load(bad, checkpoint="checkpoint_best.pth")
    # a checkpoint of another architecture
    ck = torch.load(bad / "fold_1" / "checkpoint_final.pth", weights_only=False)
    first = next(iter(ck["network_weights"]))
    ck["network_weights"][first] = torch.zeros(3, 3)
    torch.save(ck, bad / "fold_1" / "checkpoint_final.pth")
    with pytest.raises(nnunet.NnUNetError, match="does not fit the network"):
        nnunet.load(bad, folds=(0, 1))
    (bad / "plans.json").unlink()
    with pytest.raises(nnunet.NnUNetError, match="not an nnU-Net model folder: plans.json missing"):
        nnunet.load(bad)
    model = nnunet.load(region_folder)
    with pytest.raises(nnunet.NnUNetError, match="takes 4 input channels"):
        model.preprocess(case_files[:3])
    data, _ = model.preprocess(case_files)
    with pytest.raises(nnunet.NnUNetError, match="3 channels; the model takes 4"):
        nnunet.explain(medcam.SegGradCAM(model.network), model, data[:3], [model.target("tumor core")])
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    monkeypatch.delattr(nnUNetPredictor, "_internal_get_sliding_window_slicers")
    with pytest.raises(nnunet.NnUNetError, match="API moved"):
        nnunet.load(region_folder)


def test_nnunet_paths_do_not_import_torchvision(region_folder, case_files):
    """PyPI's torchvision cannot load beside the CPU torch: the nnU-Net paths medcam uses run without it.

    (MONAI's optional imports may try torchvision and fail quietly; nnU-Net's timm-based architectures must not be
    imported at all.)
    """
    code = (
        "import sys, medcam\nfrom medcam.frameworks import nnunet\n"
        f"m = nnunet.load({str(region_folder)!r}, use_mirroring=False)\n"
        f"d, p = m.preprocess({case_files!r})\n"
        "r = nnunet.explain(medcam.SegGradCAM(m.network), m, d, [m.target('tumor core')])\n"
        "m.segmentation(r.output[0], p)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] == 'timm')\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})


def test_cli_explain_nnunet(region_folder, case_files, tmp_path):
    import json

    import SimpleITK as sitk
    from click.testing import CliRunner

    from medcam.cli import main

    from ._cli_helpers import assert_one_line_error

    out = tmp_path / "out"
    runner = CliRunner()
    args = ["explain", *case_files, "--model", f"nnunet:{region_folder}", "--folds", "0,1", "-o", str(out), "-q"]
    r = runner.invoke(main, [*args, "-M", "gradcam,hirescam", "--target", "tumor core"])
    assert r.exit_code == 0, (r.output, r.stderr)
    case = out / "phantom_001"
    summary = json.loads((case / "summary.json").read_text())
    assert summary["model"]["folds"] == [0, 1] and summary["model"]["mirror_axes"] == [0, 1, 2]
    (row,) = summary["targets"]  # the one case pipeline's schema (issue 25)
    assert list(row["heatmaps"].values()) == [
        "heatmaps/gradcam_tumor_core.nii.gz",
        "heatmaps/hirescam_tumor_core.nii.gz",
    ]
    ref = sitk.ReadImage(case_files[0])
    for file in row["heatmaps"].values():
        img = sitk.ReadImage(str(case / file))
        assert img.GetSize() == ref.GetSize() and row["roi_voxels"] > 0
        assert float(sitk.GetArrayFromImage(img).max()) > 0
    # bad input: one line, nothing written
    bad_out = tmp_path / "bad"
    cases = [
        (["--model", f"nnunet:{tmp_path}"], "not an nnU-Net model folder"),
        (["--checkpoint-name", "checkpoint_best.pth"], "no checkpoint_best.pth"),
        (["--folds", "0,4"], "has no fold_4"),
        (["--target", "oedema"], "unknown region 'oedema'"),
    ]
    for extra, needle in cases:
        a = [*args[:-3], "-o", str(bad_out), *extra]
        if extra[0] == "--model":
            a = ["explain", *case_files, *extra, "-o", str(bad_out)]
        assert_one_line_error(runner.invoke(main, a), needle)
    r = runner.invoke(main, ["explain", *case_files[:3], "--model", f"nnunet:{region_folder}", "-o", str(bad_out)])
    assert_one_line_error(r, "takes 4 input channels")
    assert not bad_out.exists() or not any(bad_out.iterdir())
    # the same case again: done with the same inputs and settings, so it is skipped (resume); other settings refuse
    r = runner.invoke(main, [*args, "-M", "gradcam,hirescam", "--target", "tumor core"])
    assert r.exit_code == 0 and "0 case(s) explained, 1 skipped" in r.output, r.output
    assert_one_line_error(runner.invoke(main, [*args, "--target", "tumor core"]), "other settings")


@pytest.mark.parametrize("method", ["hirescam", "gradcam", "xgradcam"])
def test_fused_prediction_equals_nnunet_predictor(region_folder, case_files, method):
    """Targets that do not need the prediction (box, mask, class): explain accumulates Y in its own gradient pass,
    operation by operation as nnUNetPredictor does; Y is bit-equal to the predictor's (float16 accumulation
    included), and maps and scores equal those of the run with the predictor's logits given."""
    model = nnunet.load(region_folder, folds=(0, 1))
    data, props = model.preprocess(case_files)
    x = data[:, 2:18, 3:19, 3:15].contiguous()  # 4 tiles x 8 mirrors x 2 folds; one tile outside the box
    # tiles start at 0 and 4 in the first two dims: the boxes leave the tile (4:16, 4:16, 0:12) out
    targets = [BoxROI(model.channel("tumor core"), (1, 1, 1), (4, 6, 5)), BoxROI(0, (5, 1, 2), (14, 3, 10))]
    threads = torch.get_num_threads()
    y_nn = model.predict_logits(x)
    cls = medcam.METHODS[method]
    fused = nnunet.explain(cls(model.network, "encoder.stages.2"), model, x, targets)
    given = nnunet.explain(cls(model.network, "encoder.stages.2"), model, x, targets, logits=y_nn)
    assert fused.stats["prediction"] == "fused" and given.stats["prediction"] == "given"
    assert torch.get_num_threads() == threads
    assert fused.output is not None and fused.output.dtype == torch.float32
    assert torch.equal(fused.output[0], y_nn)
    assert fused.stats["backward_windows"] == 3 < fused.stats["windows"] == 4
    assert fused.stats["passes"] == 4 * 8 * 2 + (4 * 8 * 2 if method == "xgradcam" else 0)
    assert float(given.maps.abs().max()) > 0
    torch.testing.assert_close(fused.maps, given.maps, rtol=1e-6, atol=1e-7 * float(given.maps.abs().max()))
    torch.testing.assert_close(fused.scores, given.scores, rtol=0, atol=0)
    # the whole case, mirroring off, one fold: the segmentation from the fused Y is nnU-Net's
    plain = nnunet.load(region_folder, folds=(0,), use_mirroring=False)
    res = nnunet.explain(cls(plain.network), plain, data, [medcam.targets.ClassROI(1)])
    y_plain = plain.predict_logits(data)
    assert res.stats["prediction"] == "fused" and torch.equal(res.output[0], y_plain)
    np.testing.assert_array_equal(plain.segmentation(res.output[0], props), plain.segmentation(y_plain, props))


def test_prediction_not_fused_when_a_target_needs_it(region_folder, case_files):
    model = nnunet.load(region_folder, folds=(0,), use_mirroring=False)
    data, _ = model.preprocess(case_files)
    cam = medcam.SegHiResGradCAM(model.network)
    res = nnunet.explain(cam, model, data, [BoxROI(0, (1, 1, 1), (5, 5, 5)), model.target("tumor core")])
    assert res.stats["prediction"] == "predictor"
    cam = medcam.SegHiResGradCAM(model.network, score="probability", output_activation="sigmoid")
    res = nnunet.explain(cam, model, data, [BoxROI(0, (1, 1, 1), (5, 5, 5))])
    assert res.stats["prediction"] == "predictor"
    assert torch.equal(res.output[0], model.predict_logits(data))
