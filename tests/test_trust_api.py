"""Issue 19, Python API and start-up: one demo preprocessing, input checks, reused layers, plain-named BraTS folders,
probability outputs, the Grad-CAM++ sign warning, in-place ops after the hooked layer, lazy imports."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import medcam
from medcam.errors import MedcamError, TargetError
from medcam.targets import ClassROI, ContrastROI, MaskROI, PredictedROI
from tests._data_fixtures import REAL, needs_real
from tests._nets import LinearHeadNet

REPO = Path(__file__).resolve().parents[1]


def small_segresnet(init_filters: int = 8) -> nn.Module:
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    return SegResNet(
        spatial_dims=3,
        in_channels=2,
        out_channels=3,
        init_filters=init_filters,
        blocks_down=(1, 2, 2),
        blocks_up=(1, 1),
    )


# ----------------------------------------------------------------------------------------------- item 3
def test_demo_preprocessing_has_one_definition_used_by_python_and_cli(tmp_path):
    """The Python recipe (load_brats_case(**demo_preprocessing_kwargs())) and the CLI's demo model load a case alike."""
    from medcam.data import load_brats_case
    from medcam.data.phantoms import write_phantom_case
    from medcam.models import demo
    from medcam.pipeline import discover_cases, load_case, load_model

    write_phantom_case(tmp_path, seed=5, spacing_mm=3.0)
    folder = tmp_path / "Phantom_00005"
    loaded = load_model("demo", weights=False)
    assert loaded.preprocessing == demo.demo_preprocessing_kwargs()
    py = load_brats_case(folder, channel_order=demo.DEMO_CHANNELS, **demo.demo_preprocessing_kwargs())
    cli = load_case(discover_cases([folder])[0], loaded)
    assert tuple(py.image.shape) == tuple(cli.image.shape)
    assert torch.equal(py.image.as_tensor(), cli.image.as_tensor())
    assert torch.allclose(torch.as_tensor(py.image.affine), torch.as_tensor(cli.image.affine))
    # the crop is part of the definition: the preprocessed volume is smaller than the uncropped one
    full = load_brats_case(folder, **{**demo.demo_preprocessing_kwargs(), "crop_foreground": False})
    assert np.prod(py.image.shape[1:]) < np.prod(full.image.shape[1:])


# ----------------------------------------------------------------------------------------------- item 8
def test_unbatched_image_with_a_sliding_inferer_gets_medcams_shape_error():
    from monai.inferers import SlidingWindowInferer

    net = LinearHeadNet(cin=2)
    cam = medcam.SegHiResGradCAM(net, layer="feat", inferer=SlidingWindowInferer((8, 8, 8)))
    with pytest.raises(MedcamError, match=r"image\[None\]"):
        cam(torch.rand(2, 16, 16, 16), ClassROI(0))
    with pytest.raises(MedcamError, match=r"roi_size \(8, 8, 8\)"):
        cam(torch.rand(1, 2, 16, 16), ClassROI(0))


def test_negative_channel_indices_are_rejected():
    for make in (
        lambda: ClassROI(-1),
        lambda: PredictedROI(-2),
        lambda: MaskROI(torch.ones(4, 4, 4), -1),
        lambda: ContrastROI(0, -1),
    ):
        with pytest.raises(TargetError, match="non-negative"):
            make()


def test_all_zero_mask_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="medcam"):
        MaskROI(torch.zeros(4, 4, 4), 0)
    assert any("all zero" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medcam"):
        MaskROI(torch.ones(4, 4, 4), 0)
    assert not caplog.records


# ----------------------------------------------------------------------------------------------- item 9
def test_modules_that_run_twice_are_flagged_and_refused_before_any_case():
    from medcam.layers import check_layer_runs_once, list_layers

    net = small_segresnet()
    x = torch.zeros(1, 2, 16, 16, 16)
    infos = list_layers(net, x)
    names = [i.name for i in infos]
    assert len(names) == len(set(names)), "every module listed once"
    by = {i.name: i for i in infos}
    assert by["down_layers.1.1.act"].calls == 2  # ResBlock applies its ReLU twice
    assert by["down_layers.1"].calls == 1
    assert medcam.layers.auto_layer(net, x) == "down_layers.2"
    with pytest.raises(MedcamError, match="runs 2 times"):
        check_layer_runs_once(net, "down_layers.1.1.act", x)
    check_layer_runs_once(net, "down_layers.1", x)  # no error


# ----------------------------------------------------------------------------------------------- item 10
def _plain_case(root: Path, name: str, src: Path | None = None) -> Path:
    from medcam.data.phantoms import write_phantom_case

    if src is None:
        write_phantom_case(root / "_src", seed=7, spacing_mm=4.0)
        src = root / "_src" / "Phantom_00007"
    case = root / name
    case.mkdir(parents=True)
    for m in ("t1", "t1ce", "t2", "flair"):
        shutil.copyfile(src / f"Phantom_00007_{m}.nii.gz", case / f"{m}.nii.gz")
    return case


def test_plain_named_case_folder_is_a_brats_case_with_the_folder_as_id(tmp_path):
    from medcam.data.brats import discover_brats_case
    from medcam.pipeline import discover_cases

    case = _plain_case(tmp_path, "patient_A")
    layout, cid, paths = discover_brats_case(case)
    assert layout == "plain" and cid == "patient_A" and paths["flair"] == case / "flair.nii.gz"
    assert "seg" not in paths
    assert [c.case_id for c in discover_cases([case])] == ["patient_A"]
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    shutil.move(str(case), cohort / "patient_A")
    _plain_case(cohort, "patient_B", src=tmp_path / "_src" / "Phantom_00007")
    assert [c.case_id for c in discover_cases([cohort])] == ["patient_A", "patient_B"]


@needs_real
def test_shared_real_folders_are_cases(tmp_path):
    from medcam.data.brats import discover_brats_case

    assert discover_brats_case(REAL / "tcga_fg_6692")[:2] == ("plain", "tcga_fg_6692")
    layout, cid, paths = discover_brats_case(REAL / "brats_glioma_case_brainlesion")  # 2023 names t1n, t1c, ...
    assert (layout, cid, paths["t1ce"].name) == ("plain", "brats_glioma_case_brainlesion", "t1c.nii.gz")


def test_no_case_error_points_to_the_command_line(tmp_path):
    from medcam.data.brats import discover_brats_case
    from medcam.data.loading import MedcamDataError

    (tmp_path / "x.nii.gz").write_bytes(b"")
    with pytest.raises(MedcamDataError) as e:
        discover_brats_case(tmp_path)
    assert "manifest" in str(e.value) and "t1.nii.gz" in str(e.value)


# ----------------------------------------------------------------------------------------------- item 12
class SigmoidNet(nn.Module):
    """Ends in a sigmoid, as much binary-segmentation code does: outputs are probabilities."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.feat = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Conv3d(4, 1, 1)

    def forward(self, x):
        return torch.sigmoid(self.head(self.feat(x)))


def test_probability_outputs_are_detected_and_none_activation_accepted(caplog):
    net = SigmoidNet()
    x = torch.randn(1, 1, 12, 12, 12)
    with torch.no_grad():
        p = net(x)
    with caplog.at_level(logging.WARNING, logger="medcam"):
        res = medcam.SegHiResGradCAM(net, layer="feat").explain(x, PredictedROI(0))
    assert any("probabilit" in r.getMessage() and "none" in r.getMessage() for r in caplog.records)
    assert int(res.roi_voxels) == p.numel()  # what sigmoid(p) > 0.5 gives: every voxel, now with a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medcam"):
        cam = medcam.SegHiResGradCAM(net, layer="feat", output_activation="none")
        res = cam.explain(x, PredictedROI(0, activation="none"))
    assert not [r for r in caplog.records if "probabilit" in r.getMessage()]
    assert int(res.roi_voxels) == int((p > 0.5).sum()) < p.numel()
    # score="probability" with outputs that already are probabilities: S = sum_ROI p
    cam = medcam.SegHiResGradCAM(net, layer="feat", output_activation="none", score="probability")
    res = cam.explain(x, ClassROI(0))
    assert torch.allclose(res.scores[0, 0], p.sum(), rtol=1e-5)


def test_pipeline_accepts_activation_none(tmp_path):
    from medcam.pipeline import build_targets, load_model, parse_targets

    f = tmp_path / "netmod.py"
    f.write_text(
        "import torch\ndef build():\n    return torch.nn.Sequential(torch.nn.Conv3d(4, 2, 1), torch.nn.Sigmoid())\n"
    )
    loaded = load_model(f"{f}:build", activation="none", regions=["A", "B"])
    assert loaded.activation == "none"
    (t,) = build_targets(parse_targets(["B"], loaded.regions), None, activation=loaded.activation)
    y = torch.tensor([0.2, 0.7]).reshape(1, 1, 2, 1, 1).repeat(1, 2, 1, 1, 1)
    assert t.roi(y).flatten().tolist() == [0.0, 1.0]


# ----------------------------------------------------------------------------------------------- item 13
def test_gradcampp_warns_on_signed_activations(caplog):
    net = LinearHeadNet(cin=2)  # `feat` = a convolution's output: signed
    x = torch.randn(1, 2, 8, 8, 8)
    with caplog.at_level(logging.WARNING, logger="medcam"):
        medcam.SegGradCAMPlusPlus(net, layer="feat")(x, ClassROI(0))
    msgs = [r.getMessage() for r in caplog.records if "Grad-CAM++" in r.getMessage()]
    assert msgs and "'feat'" in msgs[0] and "negative" in msgs[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medcam"):
        medcam.SegGradCAMPlusPlus(net, layer="enc.1")(x, ClassROI(0))  # post-ReLU: non-negative
    assert not [r for r in caplog.records if "Grad-CAM++" in r.getMessage()]


# ----------------------------------------------------------------------------------------------- item 14
def _cloning_reference(net: nn.Module, layer: nn.Module, x: torch.Tensor, channel: int) -> torch.Tensor:
    """HiResCAM pre-ReLU on the feature grid, with the layer output CLONED at the hook: later in-place ops (ReLU
    inplace, ``x += identity``) act on the clone, so the saved activation and its gradient are the layer's own."""
    store = {}

    def hook(m, i, o):
        store["a"] = o
        return o.clone()

    h = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            y = net(x)
            (g,) = torch.autograd.grad(y[:, channel].sum(), store["a"])
    finally:
        h.remove()
    return (g * store["a"].detach()).sum(1)


def test_every_segresnet_layer_matches_a_reference_that_clones_at_the_hook():
    from medcam.layers import list_layers

    net = small_segresnet().eval()
    x = torch.randn(1, 2, 16, 16, 16)
    names = [i.name for i in list_layers(net, x) if i.calls == 1]
    assert len(names) > 20 and "down_layers.1.1.norm1" in names and "up_layers.0" in names
    modules = dict(net.named_modules())
    for name in names:
        got = medcam.SegHiResGradCAM(net, layer=name)(x, ClassROI(1), relu=False, upsample=False)[:, 0]
        ref = _cloning_reference(net, modules[name], x, 1)
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4), name


# ----------------------------------------------------------------------------------------------- item 11
def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


def test_help_and_one_line_errors_do_not_import_torch(tmp_path):
    p = _python(
        "import sys\nfrom medcam.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    assert p.returncode == 0, p.stderr
    assert "evaluate" in p.stdout and "TORCH False" in p.stdout
    p = _python(
        "import sys\nfrom medcam.cli import main\n"
        f"try:\n    main(['explain', {str(tmp_path / 'missing')!r}, '-o', {str(tmp_path / 'o')!r}])\n"
        "except SystemExit as e:\n    print('RC', e.code)\nprint('TORCH', 'torch' in sys.modules)\n"
    )
    assert "RC 1" in p.stdout and "TORCH False" in p.stdout, (p.stdout, p.stderr)
    assert p.stderr.startswith("medcam: error: input") and p.stderr.count("\n") == 1
    # `import medcam` stays light; the public names still resolve
    p = _python("import sys, medcam\nassert 'torch' not in sys.modules\nprint(medcam.SegGradCAM.__name__)\n")
    assert p.returncode == 0 and "SegGradCAM" in p.stdout, p.stderr
