"""The shipped demo network: a small MONAI SegResNet trained on BraTS-like phantoms.

Input: ``[B, 4, X, Y, Z]`` float32, channels T1, T1ce, T2, FLAIR (:data:`DEMO_CHANNELS`), resampled to
:data:`DEMO_SPACING_MM` mm isotropic in RAS orientation and z-scored per channel over the non-zero (brain) voxels,
exactly as :func:`medcam.data.load_brats_case` does with :func:`demo_preprocessing_kwargs`.
Output: ``[B, 3, X, Y, Z]`` logits of the overlapping regions TC, WT, ET (:data:`DEMO_REGIONS`); apply a sigmoid
and threshold at 0.5. Spatial sizes must be multiples of 8; use sliding-window inference with
:data:`DEMO_ROI_SIZE` windows for whole volumes.

The weights (``medcam/models/weights/demo_segresnet.pt``, a plain ``state_dict``) were produced by
``data_scripts/train_demo_model.py``; see ``medcam/models/MODEL_CARD.md`` for the training data, settings and
Dice scores. It is a demonstration model for explaining segmentations, NOT a clinical tool.
"""

from __future__ import annotations

import importlib.resources
import io
import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: input channel order (canonical modality names of :mod:`medcam.data.brats`)
DEMO_CHANNELS: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
#: output channel order (overlapping regions: tumour core, whole tumour, enhancing tumour)
DEMO_REGIONS: tuple[str, ...] = ("TC", "WT", "ET")
#: isotropic working resolution (mm) the network was trained at
DEMO_SPACING_MM: float = 2.0
#: sliding-window size (voxels at :data:`DEMO_SPACING_MM`) used for training crops and inference
DEMO_ROI_SIZE: tuple[int, int, int] = (96, 96, 96)
#: default layer to explain: the bottleneck (deepest encoder stage, 1/8 resolution, 64 channels)
DEMO_LAYER: str = "down_layers.3"
#: file name of the weights inside ``medcam.models.weights``
DEMO_WEIGHTS: str = "demo_segresnet.pt"
#: SegResNet constructor arguments (kept here so training and loading can never disagree)
DEMO_ARCH: dict[str, Any] = dict(
    spatial_dims=3,
    in_channels=4,
    out_channels=3,
    init_filters=8,
    blocks_down=(1, 2, 2, 4),
    blocks_up=(1, 1, 1),
    dropout_prob=None,
)


def demo_network() -> nn.Module:
    """The (untrained) demo architecture: MONAI ``SegResNet`` with 8 initial filters (about 1.18 M parameters).

    Returns:
        ``monai.networks.nets.SegResNet`` mapping ``[B, 4, X, Y, Z]`` to ``[B, 3, X, Y, Z]`` logits
        (X, Y, Z multiples of 8).
    """
    from monai.networks.nets import SegResNet

    return SegResNet(**DEMO_ARCH)


def demo_preprocessing_kwargs() -> dict[str, Any]:
    """Keyword arguments for :func:`medcam.data.load_brats_case` (or ``load_volumes``) matching training.

    RAS orientation, cropping to the bounding box of the non-zero (brain) voxels, resampling to
    :data:`DEMO_SPACING_MM` mm isotropic, and channel-wise z-score normalisation over non-zero voxels; no padding
    (sliding-window inference pads internally). This is THE definition of the demo's preprocessing: the Python recipe
    (``load_brats_case(..., **demo_preprocessing_kwargs())``), ``medcam explain --model demo`` and ``medcam demo`` all
    use it, so they give the same maps for the same case (maps are mapped back onto the uncropped original grid). The
    brain then fits in one or two 96^3 windows, several times faster on a CPU. Pass ``channel_order=DEMO_CHANNELS``
    too when calling ``load_brats_case`` (it is its default).

    Returns:
        dict with keys ``orientation``, ``spacing``, ``normalize``, ``crop_foreground``, ``divisible_by``.
    """
    s = float(DEMO_SPACING_MM)
    return {
        "orientation": "RAS",
        "spacing": (s, s, s),
        "normalize": True,
        "crop_foreground": True,
        "divisible_by": None,
    }


def demo_weights_bytes() -> bytes:
    """Raw bytes of the shipped weights file (read through ``importlib.resources``).

    Raises:
        FileNotFoundError: the weights file is missing from the installation.
    """
    res = importlib.resources.files("medcam.models.weights").joinpath(DEMO_WEIGHTS)
    if not res.is_file():
        raise FileNotFoundError(
            f"Demo weights '{DEMO_WEIGHTS}' not found in medcam.models.weights; reinstall medcam or re-create them "
            "with `python data_scripts/train_demo_model.py`."
        )
    return res.read_bytes()


def load_demo_model(device: str | torch.device = "cpu") -> nn.Module:
    """Build :func:`demo_network`, load the shipped weights (``weights_only=True``) and put it in eval mode.

    Args:
        device: torch device to place the model on.

    Returns:
        The trained SegResNet (eval mode, ``requires_grad`` left on so gradient-based CAMs work).
    """
    net = demo_network()
    state = torch.load(io.BytesIO(demo_weights_bytes()), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:  # tolerate a wrapped checkpoint
        state = state["state_dict"]
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    net.load_state_dict(state)
    logger.debug("loaded demo SegResNet weights (%d tensors)", len(state))
    return net.to(device).eval()
