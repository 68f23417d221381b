"""Fixtures shared by test modules of several folders (the nnU-Net v2 model folders, a small demo model)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def nnunet_models(tmp_path_factory) -> Path:
    """A region-based (sigmoid, 2 folds, patch 12^3) and a label-based (softmax) model folder, built once per run
    and shared by xdist workers; ``MEDCAM_TEST_NNUNET_ROOT`` reuses an earlier build."""
    pytest.importorskip("nnunetv2")
    if os.environ.get("MEDCAM_TEST_NNUNET_ROOT"):
        return Path(os.environ["MEDCAM_TEST_NNUNET_ROOT"])
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "nnunet_models"
    root.mkdir(exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".done").exists():
            subprocess.run(
                [sys.executable, "-m", "tests._nnunet_build", str(root), "--regions", "--patch", "12", "12", "12"],
                cwd=ROOT, check=True, capture_output=True,
                env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
            )  # fmt: skip
            (root / ".done").touch()
    return root


@pytest.fixture
def small_demo(monkeypatch):
    """The demo API (``--model demo``) with a seeded random SegResNet of 8 filters, a 12 mm working grid and one
    24^3 window (fast on 2 CPU cores): the command's plumbing, not the shipped weights, is what such a test checks."""
    import torch
    from monai.networks.nets import SegResNet

    from medcam.models import demo

    def net(device: str = "cpu") -> torch.nn.Module:
        torch.manual_seed(0)
        return (
            SegResNet(spatial_dims=3, in_channels=4, out_channels=3, init_filters=8, blocks_down=(1, 1, 1, 1))
            .eval()
            .to(device)
        )

    monkeypatch.setattr(demo, "load_demo_model", net)
    monkeypatch.setattr(demo, "DEMO_ROI_SIZE", (24, 24, 24))
    monkeypatch.setattr(demo, "DEMO_SPACING_MM", 12.0)
    monkeypatch.setattr(demo, "demo_preprocessing_kwargs", lambda: {
        "orientation": "RAS", "spacing": (12.0,) * 3, "normalize": True, "crop_foreground": False,
        "divisible_by": None})  # fmt: skip
    return demo
