"""The shipped demo SegResNet: weights file, architecture, and a sanity check of its segmentation on a phantom."""

from __future__ import annotations

import importlib.resources

import numpy as np
import pytest
import torch

from medcam.models import (
    DEMO_CHANNELS,
    DEMO_LAYER,
    DEMO_REGIONS,
    DEMO_ROI_SIZE,
    DEMO_SPACING_MM,
    demo_network,
    demo_preprocessing_kwargs,
    load_demo_model,
)

#: WT Dice on held-out phantom seed 10000 measured at 0.99 (see MODEL_CARD.md); checked with a wide margin
MIN_WT_DICE = 0.6


def _weights():
    return importlib.resources.files("medcam.models.weights").joinpath("demo_segresnet.pt")


def test_weights_shipped_and_small():
    res = _weights()
    assert res.is_file()
    assert len(res.read_bytes()) <= 10 * 1024 * 1024


def test_constants():
    assert DEMO_CHANNELS == ("t1", "t1ce", "t2", "flair")
    assert DEMO_REGIONS == ("TC", "WT", "ET")
    assert all(s % 8 == 0 for s in DEMO_ROI_SIZE)
    kw = demo_preprocessing_kwargs()
    assert kw["spacing"] == (DEMO_SPACING_MM,) * 3 and kw["normalize"] is True and kw["orientation"] == "RAS"
    assert DEMO_LAYER in dict(demo_network().named_modules())


def test_load_and_output_shape():
    model = load_demo_model()
    assert not model.training
    x = torch.randn(1, 4, 32, 40, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 3, 32, 40, 48)
    assert torch.isfinite(y).all()


def test_segments_heldout_phantom():
    """End-to-end on a held-out phantom at the demo resolution: same preprocessing as the CLI, WT Dice threshold."""
    pytest.importorskip("nilearn")  # the phantom generator reads nilearn's template files
    from monai.data import MetaTensor

    from medcam.data.brats import labels_to_regions
    from medcam.data.phantoms import generate_phantom
    from medcam.data.preprocessing import build_preprocessing

    ph = generate_phantom(seed=10000, spacing_mm=DEMO_SPACING_MM)  # training used seeds < 10000
    # the CLI's preprocessing plus a brain crop padded to a multiple of 8 (one forward pass instead of windows;
    # intensities are unchanged because the z-score uses the non-zero voxels only)
    kw = {**demo_preprocessing_kwargs(), "crop_foreground": True, "divisible_by": 8}
    tf = build_preprocessing(keys=("image", "label"), **kw)
    aff = torch.as_tensor(ph.affine)
    data = tf(
        {
            "image": MetaTensor(torch.from_numpy(ph.image.copy()), affine=aff),
            "label": MetaTensor(torch.from_numpy(labels_to_regions(ph.label).astype(np.float32)), affine=aff),
        }
    )
    model = load_demo_model()
    with torch.no_grad():
        y = model(data["image"].as_tensor()[None])
    pred = (torch.sigmoid(y)[0] > 0.5).numpy()
    ref = data["label"].as_tensor().numpy() > 0.5
    wt = 2 * np.logical_and(pred[1], ref[1]).sum() / (pred[1].sum() + ref[1].sum())
    assert wt >= MIN_WT_DICE, f"WT Dice {wt:.3f} on phantom 10000"
    assert pred[1].sum() < 3 * ref[1].sum()  # no gross over-segmentation
