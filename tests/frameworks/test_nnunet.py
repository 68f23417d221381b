"""nnU-Net v2 model folders explained as nnUNetPredictor runs them (medcam.frameworks.nnunet).

The model folders are built once per session from phantoms with nnU-Net's own entry points (tests/_nnunet_build.py):
a region-based model (sigmoid, BraTS regions, 2 folds, mirroring over 3 axes, patch 12^3 so that a case needs
several tiles) and a label-based one (softmax, 1 fold).
"""

from __future__ import annotations

import copy
import functools
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

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def case_files(phantom_files) -> list[str]:
    """The phantom case's channel files as strings (as nnU-Net's predictor and the CLI take them)."""
    return [str(p) for p in phantom_files]


# ---------------------------------------------------------------------------------------------------- reference
def autograd_passes(model, data, weights_fn):
    """Plain autograd through nnU-Net's own sliding-window prediction, float64; ``.map(formula, mi_alpha)``.

    nnU-Net's pieces: ``pad_nd_image``, ``_internal_get_sliding_window_slicers``, ``compute_gaussian`` and the
    predictor's own mirroring function ``_internal_maybe_mirror_and_predict`` (its undecorated body, so that autograd
    sees it); the blending ``sum G y / sum G`` and the fold mean are written out literally (nnU-Net's loop does them
    in place in float16 under inference mode). Every activation of the hooked layer (one per network pass) is kept
    and ``dS/dA`` is taken by one ``torch.autograd.grad`` over the whole computation. The maps follow the executor's
    definition from these gradients: element-wise maps summed (flipped back); pooled channel weights from the
    formula's statistics summed over all passes (activation statistics weighted by each pass's blend weight
    ``G / n / (M F)``, flipped, area-averaged onto the feature grid), ``N`` = feature positions of the volume, the
    maps ``sum_k alpha_k A_k`` blended like the output. ``mi_alpha``: MI-CAM's channel weights (its estimate is tested
    in tests/test_micam.py; the passes and the blending are tested here).
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
    dims = [a + 2 for a in model.mirror_axes]
    combos = [(), *[c for i in range(len(dims)) for c in itertools.combinations(dims, i + 1)]]
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
    n_pass = len(combos) * len(model.parameters)
    den = torch.zeros(padded.shape[1:], dtype=torch.float64)
    for sl in slicers:
        den[sl[1:]] += gauss
    betas = [gauss / den[sl[1:]] / n_pass for sl, _ in passes]

    def map_of(formula, mi_alpha=None):
        args = (passes, acts, grads, betas, data.shape[1:], patch, padded.shape[1:])
        return _map_from_passes(formula, mi_alpha, *args)[revert[1:]].detach()

    return types.SimpleNamespace(map=map_of, y=y_vol.detach(), score=score.detach())


def _flip(t, dims):
    return torch.flip(t, dims) if dims else t


def _sum_stats(total, stats):
    for n, v in stats.items():
        total[n] = total[n] + v.double() if n in total else v.double()


def _map_from_passes(formula, mi_alpha, passes, acts, grads, betas, spatial, patch, shape):
    """The executor's map from the passes' activations and their autograd gradients ``[P]`` (float64)."""
    from medcam.formulas import ActivationPooledFormula, ElementwiseFormula

    up = functools.partial(torch.nn.functional.interpolate, size=patch, mode="trilinear", align_corners=False)
    acc = torch.zeros(shape, dtype=torch.float64)
    acts = [a.double() for a in acts]
    grads = [g.double() for g in grads]
    if isinstance(formula, ElementwiseFormula):
        for (sl, c), a, g in zip(passes, acts, grads):
            acc[sl[1:]] += _flip(up(formula.map(a, g)[:, None]), c)[0, 0]
        return acc
    feat = acts[0].shape[2:]
    n_pos = float(np.prod([s * f / p for s, f, p in zip(spatial, feat, patch)]))
    if mi_alpha is not None:
        alpha = mi_alpha.double()
    else:
        act_stats: dict = {}
        if isinstance(formula, ActivationPooledFormula):
            for (_, c), a, beta in zip(passes, acts, betas):
                w = torch.nn.functional.adaptive_avg_pool3d(_flip(beta[None, None], c), feat)
                _sum_stats(act_stats, formula.activation_statistics(a, w))
        grad_stats: dict = {}
        for a, g in zip(acts, grads):
            _sum_stats(grad_stats, formula.gradient_statistics(a, g, act_stats or None))
        alpha = formula.weights({**grad_stats, **act_stats}, n_pos)[0]
    for (sl, c), a, beta in zip(passes, acts, betas):
        m = up((alpha[None, :, None, None, None] * a).sum(1, keepdim=True))
        acc[sl[1:]] += _flip(m, c)[0, 0] * beta
    return acc


class _Float64Accumulation:
    """``torch`` as nnU-Net's predictor module sees it, with its float16 buffers made float64."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, dtype=None, **kwargs):
        return torch.zeros(*args, dtype=torch.float64 if dtype == torch.half else dtype, **kwargs)


def test_equals_autograd_through_nnunet_sliding_window(region_model_folder, case_files, monkeypatch):
    """HiResCAM and Grad-CAM through all 8 mirror combinations x 4 tiles x 2 folds against one float64 autograd
    run through nnU-Net's pieces, whose logits equal the predictor's own run (every method on fewer passes:
    test_every_method_equals_autograd_through_folds_tiles_mirrors)."""
    model = nnunet.load(region_model_folder, folds=(0, 1))
    assert len(model.mirror_axes) == 3 and len(model.parameters) == 2
    data, _ = model.preprocess(case_files)
    data = data[:, 2:18, 3:19, 3:15].contiguous()  # 2 x 2 x 1 overlapping tiles: 4 tiles x 8 mirrors x 2 folds
    model.network.double()
    try:
        n_tiles = len(model.predictor._internal_get_sliding_window_slicers(data.shape[1:]))
        assert n_tiles == 4
        target = BoxROI(model.channel("tumor core"), (4, 5, 3), (15, 14, 10))
        r = autograd_passes(model, data.double(), target.score_weights)
        y_ref, s_ref = r.y, r.score
        res = {}
        for cls in (medcam.SegHiResGradCAM, medcam.SegGradCAM):
            cam = cls(model.network, "encoder.stages.2")
            res[cls] = (
                nnunet.explain(cam, model, data.double(), [target], logits=y_ref, relu=False),
                r.map(cls.formula),
            )
        # the reference follows nnU-Net: its logits equal the predictor's own run in float64 (nnU-Net accumulates
        # in float16, which loses the image corners where only Gaussian tails reach)
        import nnunetv2.inference.predict_from_raw_data as pfrd

        monkeypatch.setattr(pfrd, "torch", _Float64Accumulation())
        y_nn = model.predict_logits(data.double())
    finally:
        model.network.float()
    for got_res, ref in res.values():
        got = got_res.maps[0, 0].double()
        assert got.shape == ref.shape == data.shape[1:]
        assert float(ref.detach().abs().max()) > 0
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        assert float(got_res.scores[0, 0]) == pytest.approx(float(s_ref), rel=1e-5)
    torch.testing.assert_close(y_nn.double(), y_ref, rtol=1e-6, atol=1e-6 * float(y_ref.abs().max()))


@pytest.fixture(scope="module")
def mirrored_case(region_model_folder, case_files):
    """The region model with 2 folds, mirroring over its last axis only (the predictor's ``allowed_mirroring_axes``
    narrowed, to keep the test fast), on a crop of 2 overlapping tiles: 2 folds x 2 tiles x 2 mirrors."""
    model = nnunet.load(region_model_folder, folds=(0, 1))
    model.predictor.allowed_mirroring_axes = (2,)
    data, _ = model.preprocess(case_files)
    data = data[:, 2:18, 4:16, 3:15].contiguous()
    assert len(model.predictor._internal_get_sliding_window_slicers(data.shape[1:])) == 2
    return model, data


@pytest.mark.parametrize("method", list(medcam.METHODS))
def test_every_method_equals_autograd_through_folds_tiles_mirrors(mirrored_case, method):
    """Every method of medcam.METHODS, by its own execution (MI-CAM's histogram passes, MI-Grad-CAM's NMI), on
    nnU-Net's folds x tiles x mirrors: the map equals the executor's definition on plain float64 autograd through
    nnU-Net's prediction (autograd_passes), and the score is S = sum W Y."""
    from medcam.micam import NMIGradCAM

    model, data = mirrored_case
    target = BoxROI(model.channel("tumor core"), (4, 3, 3), (15, 10, 10))
    model.network.double()
    try:
        r = autograd_passes(model, data.double(), target.score_weights)
        cam = medcam.METHODS[method](model.network, "encoder.stages.2")
        res = nnunet.explain(cam, model, data.double(), [target], logits=r.y, relu=False)
    finally:
        model.network.float()
    formula, mi = cam.formula, None
    if "mi_weights" in res.stats:  # MI-CAM: the weights its passes estimated
        mi = res.stats["mi_weights"][0, 0]
        assert float(mi.sum()) == pytest.approx(1.0, rel=1e-5)
    if "nmi_weights" in res.stats:  # MI-Grad-CAM: Grad-CAM's weights times these (not plain Grad-CAM)
        nmi = res.stats["nmi_weights"][0, 0]
        assert float(nmi.min()) < float(nmi.max()) and float(nmi.max()) <= 1 + 1e-6
        formula = NMIGradCAM(nmi[None])
    ref = r.map(formula, mi)
    got = res.maps[0, 0].double()
    assert got.shape == ref.shape == data.shape[1:] and float(ref.abs().max()) > 0
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert float(res.scores[0, 0]) == pytest.approx(float(r.score), rel=1e-5)
    assert res.stats["plan"] == "nnunet" and res.stats["mirrors"] == 2 and res.stats["folds"] == 2


def test_a_formula_the_executor_cannot_follow_is_refused_before_any_pass(region_model_folder, case_files):
    from medcam.formulas import Formula

    class Odd(Formula):
        def map(self, activation, grad, layer=None):
            return grad.sum(1)

    class OddCAM(medcam.BaseSegCAM):
        formula = Odd()

    model = nnunet.load(region_model_folder, folds=(0,))
    data, _ = model.preprocess(case_files)
    calls = []
    h = model.network.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(medcam.MedcamError, match="element-wise or pooled formula"):
            nnunet.explain(OddCAM(model.network, "encoder.stages.2"), model, data, [BoxROI(0, (1, 1, 1), (5, 5, 5))])
    finally:
        h.remove()
    assert len(calls) <= 1  # at most the small forward that resolves the layer, no pass over the case


@pytest.mark.parametrize("method", list(medcam.METHODS))
def test_one_tile_no_mirroring_equals_whole_volume(region_model_folder, case_files, method):
    model = nnunet.load(region_model_folder, folds=(0,), use_mirroring=False)
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


def test_segmentation_equals_nnunet_predictor(region_model_folder, case_files, tmp_path):
    """The segmentation from the explanation's own Y (2 folds) through nnU-Net's export is the file nnU-Net's
    ``predict_from_files_sequential`` writes. Mirroring is off on both sides (Y with mirrors is the predictor's to
    the bit: test_predicted_region_in_one_pass_equals_autograd, test_fused_prediction_equals_nnunet_predictor)."""
    import SimpleITK as sitk
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    model = nnunet.load(region_model_folder, folds=(0, 1), use_mirroring=False)
    data, props = model.preprocess(case_files)
    res = nnunet.explain(medcam.SegHiResGradCAM(model.network), model, data, [model.target("whole tumor")])
    assert res.stats["prediction"] == "one_pass" and res.stats["folds"] == 2
    seg = model.export_segmentation(res.output[0], props)
    pred = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False, use_mirroring=False)
    pred.initialize_from_trained_model_folder(str(region_model_folder), (0, 1), "checkpoint_final.pth")
    (tmp_path / "out").mkdir()
    pred.predict_from_files_sequential([case_files], str(tmp_path / "out"))
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "phantom_001.nii.gz")))
    assert seg.shape == theirs.shape
    np.testing.assert_array_equal(seg, theirs)
    assert 0 < int((theirs > 0).sum()) < theirs.size
    # maps go back to the original grid like the segmentation (the case folder writes them: test_nnunet_adapter.py)
    orig = model.to_original_grid(res.maps[0], props)
    assert orig.shape == (1, *theirs.shape)


def test_targets_by_dataset_names(region_model_folder, label_model_folder, case_files):
    reg = nnunet.load(region_model_folder)
    assert reg.output_names == ("whole tumor", "tumor core", "enhancing tumor")
    assert reg.activation == "sigmoid" and reg.channel("Enhancing Tumor") == 2
    lab = nnunet.load(label_model_folder, use_mirroring=False)
    assert lab.output_names == ("background", "necrosis", "edema", "enhancing tumor")
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


def test_bad_inputs(region_model_folder, case_files, tmp_path, monkeypatch):
    import shutil

    with pytest.raises(nnunet.NnUNetError, match="does not exist"):
        nnunet.load(tmp_path / "nope")
    bad = tmp_path / "copy"
    shutil.copytree(region_model_folder, bad)
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
    model = nnunet.load(region_model_folder)
    with pytest.raises(nnunet.NnUNetError, match="takes 4 input channels"):
        model.preprocess(case_files[:3])
    data, _ = model.preprocess(case_files)
    with pytest.raises(nnunet.NnUNetError, match="3 channels; the model takes 4"):
        nnunet.explain(medcam.SegGradCAM(model.network), model, data[:3], [model.target("tumor core")])
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    monkeypatch.delattr(nnUNetPredictor, "_internal_get_sliding_window_slicers")
    with pytest.raises(nnunet.NnUNetError, match="API moved"):
        nnunet.load(region_model_folder)


def test_nnunet_paths_do_not_import_torchvision(region_model_folder, case_files):
    """PyPI's torchvision cannot load beside the CPU torch: the nnU-Net paths medcam uses run without it.

    (MONAI's optional imports may try torchvision and fail quietly; nnU-Net's timm-based architectures must not be
    imported at all.)
    """
    code = (
        "import sys, medcam\nfrom medcam.frameworks import nnunet\n"
        f"m = nnunet.load({str(region_model_folder)!r}, use_mirroring=False)\n"
        f"d, p = m.preprocess({case_files!r})\n"
        "r = nnunet.explain(medcam.SegGradCAM(m.network), m, d, [m.target('tumor core')])\n"
        "m.export_segmentation(r.output[0], p)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] == 'timm')\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})


def test_cli_explain_nnunet(region_model_folder, case_files, tmp_path):
    import json

    import SimpleITK as sitk
    from click.testing import CliRunner

    from medcam.cli import main
    from medcam.pipeline import load_model

    from .._cli_helpers import assert_one_line_error

    out = tmp_path / "out"
    runner = CliRunner()
    # mirroring is tested in the API tests above (without --disable-tta the CLI's model mirrors, checked here)
    args = ["explain", *case_files, "--model", f"nnunet:{region_model_folder}", "--folds", "0,1", "--disable-tta"]
    args += ["-o", str(out), "-q"]
    assert load_model(f"nnunet:{region_model_folder}").adapter.mirror_axes == (0, 1, 2)
    r = runner.invoke(main, [*args, "-M", "gradcam,hirescam", "--target", "tumor core"])
    assert r.exit_code == 0, (r.output, r.stderr)
    case = out / "phantom_001"
    summary = json.loads((case / "summary.json").read_text())
    assert summary["model"]["folds"] == [0, 1] and summary["model"]["mirror_axes"] == []
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
    r = runner.invoke(
        main, ["explain", *case_files[:3], "--model", f"nnunet:{region_model_folder}", "-o", str(bad_out)]
    )
    assert_one_line_error(r, "takes 4 input channels")
    assert not bad_out.exists() or not any(bad_out.iterdir())
    # the same case again: done with the same inputs and settings, so it is skipped (resume); other settings refuse
    r = runner.invoke(main, [*args, "-M", "gradcam,hirescam", "--target", "tumor core"])
    assert r.exit_code == 0 and "0 case(s) explained, 1 skipped" in r.output, r.output
    assert_one_line_error(runner.invoke(main, [*args, "--target", "tumor core"]), "other settings")


@pytest.mark.parametrize("method", ["hirescam", "gradcam", "xgradcam"])
def test_fused_prediction_equals_nnunet_predictor(region_model_folder, case_files, method):
    """Targets that do not need the prediction (box, mask, class): explain accumulates Y in its own gradient pass,
    operation by operation as nnUNetPredictor does; Y is bit-equal to the predictor's (float16 accumulation
    included), and maps and scores equal those of the run with the predictor's logits given."""
    model = nnunet.load(region_model_folder, folds=(0, 1))
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
    plain = nnunet.load(region_model_folder, folds=(0,), use_mirroring=False)
    res = nnunet.explain(cls(plain.network), plain, data, [medcam.targets.ClassROI(1)])
    y_plain = plain.predict_logits(data)
    assert res.stats["prediction"] == "fused" and torch.equal(res.output[0], y_plain)
    np.testing.assert_array_equal(
        plain.export_segmentation(res.output[0], props), plain.export_segmentation(y_plain, props)
    )


def test_prediction_in_one_pass_when_a_target_needs_it(region_model_folder, case_files):
    """A predicted region or a probability score needs Y first: it is blended from the explanation's own passes
    (nnU-Net's float16 accumulation), bit-equal to the predictor, with no separate prediction."""
    model = nnunet.load(region_model_folder, folds=(0,), use_mirroring=False)
    data, _ = model.preprocess(case_files)
    data = data[:, 2:18, 3:19, 3:15].contiguous()  # 4 tiles
    y_nn = model.predict_logits(data)
    cam = medcam.SegHiResGradCAM(model.network)
    targets = [BoxROI(0, (1, 1, 1), (5, 5, 5)), model.target("tumor core")]
    res = nnunet.explain(cam, model, data, targets)
    assert res.stats["prediction"] == "one_pass" and torch.equal(res.output[0], y_nn)
    given = nnunet.explain(cam, model, data, targets, logits=y_nn)
    torch.testing.assert_close(res.maps, given.maps, rtol=1e-6, atol=1e-7 * float(given.maps.abs().max()))
    cam = medcam.SegHiResGradCAM(model.network, score="probability", output_activation="sigmoid")
    res = nnunet.explain(cam, model, data, [BoxROI(0, (1, 1, 1), (5, 5, 5))])
    assert res.stats["prediction"] == "one_pass"
    assert torch.equal(res.output[0], y_nn)
    # under amp the passes would not be the predictor's (it runs them without autocast on the CPU): two passes
    cam = medcam.SegHiResGradCAM(model.network, amp=True)
    res = nnunet.explain(cam, model, data, [model.target("tumor core")])
    assert res.stats["prediction"] == "predictor" and "autocast" in res.stats["one_pass"]


@pytest.mark.parametrize("method", list(medcam.METHODS))
def test_predicted_region_in_one_pass_equals_autograd(mirrored_case, method):
    """Every method of medcam.METHODS with a predicted region and no logits given, on 2 folds x 2 tiles x 2
    mirrors: Y from the explanation's own passes is the predictor's to the bit (float32 network); the maps equal
    plain float64 autograd through nnU-Net's prediction for that region (the fold's weights are loaded in place
    between kept graphs: each graph keeps its fold's), and all graphs kept or none kept give the same result."""
    from medcam.micam import NMIGradCAM

    model, data = mirrored_case
    target = model.target("tumor core")
    cls = medcam.METHODS[method]
    one = nnunet.explain(cls(model.network, "encoder.stages.2"), model, data, [target])
    assert torch.equal(one.output[0], model.predict_logits(data))
    model.network.double()
    try:
        res = {
            b: nnunet.explain(
                cls(model.network, "encoder.stages.2", graph_budget=b), model, data.double(), [target], relu=False
            )
            for b in (None, 0)
        }
        y64 = res[None].output
        r = autograd_passes(model, data.double(), lambda _: target.score_weights(y64))
    finally:
        model.network.float()
    assert torch.equal(res[0].maps, res[None].maps) and torch.equal(res[0].output, y64)
    formula, mi = medcam.METHODS[method].formula, None
    if "mi_weights" in res[None].stats:
        mi = res[None].stats["mi_weights"][0, 0]
    if "nmi_weights" in res[None].stats:
        formula = NMIGradCAM(res[None].stats["nmi_weights"][0, 0][None])
    ref = r.map(formula, mi)
    got = res[None].maps[0, 0].double()
    assert float(ref.abs().max()) > 0
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    if method in ("micam", "migradcam"):
        assert res[None].stats["prediction"] == "predictor" and "own passes" in res[None].stats["one_pass"]
    else:
        assert res[None].stats["prediction"] == "one_pass" and res[0].stats["graph_calls_recomputed"] > 0
