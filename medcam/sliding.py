"""MONAI's sliding window as a pass plan: explain a whole volume window by window, with MONAI's semantics.

MONAI's ``sliding_window_inference`` blends window outputs ``y_w`` with the importance map ``omega`` (constant or
gaussian) of each window, ``Y(u) = sum_w omega_w(u) y_w(u) / sum_w omega_w(u)``: a :class:`~medcam.plan.PassPlan`
of one fold, no flips (:func:`monai_plan`), which :func:`medcam.executor.execute` explains exactly (equation (1)
there: ``dS/dy_w = W omega_w / sum_w' omega_w'``; no graph spans two windows, so memory is that of
``sw_batch_size`` windows whatever the volume size). Windows outside every ROI get no forward or backward pass
unless a pooled method needs their activations; with one window covering the volume the result is the
whole-volume one.

This module holds what is MONAI's: the inferer checks, MONAI's grid and padding (:class:`WindowGrid`), where the
volume-sized buffers live (:func:`stitch_device`), the plan and its prediction (``sliding_window_inference``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices, get_valid_patch_size
from monai.inferers import SlidingWindowInferer, sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from monai.utils import BlendMode, PytorchPadMode, ensure_tuple_rep, fall_back_tuple, look_up_option

from .errors import MedcamError
from .hooks import ActivationHook
from .plan import PassPlan
from .runner import ModelRunner

__all__ = ["monai_plan", "check_inferer", "stitch_device", "window_example", "WindowGrid"]

logger = logging.getLogger(__name__)


def check_inferer(inferer: Any) -> SlidingWindowInferer:
    """Refuse inferers medcam cannot follow exactly, with the reason."""
    if not isinstance(inferer, SlidingWindowInferer):
        raise MedcamError(
            f"inferer must be a monai.inferers.SlidingWindowInferer, got {type(inferer).__name__}; "
            "for whole-image explanation pass inferer=None"
        )
    if getattr(inferer, "with_coord", False):
        raise MedcamError("SlidingWindowInferer(with_coord=True) is not supported: the predictor must take one tensor")
    return inferer


def window_example(inferer: Any, image: torch.Tensor) -> torch.Tensor:
    """A zero input of one window ``[1, Cin, *roi]``, e.g. to choose ``layer="auto"`` at the windows' size."""
    roi = fall_back_tuple(inferer.roi_size, image.shape[2:])
    return torch.zeros((1, image.shape[1], *roi), dtype=image.dtype, device=image.device)


def stitch_device(inferer: Any, image: torch.Tensor) -> torch.device:
    """Where the volume-sized buffers live, decided as ``SlidingWindowInferer`` decides it.

    ``inferer.device`` if set; else the CPU when ``cpu_thresh`` is set and the volume has more voxels than it (a
    large volume is stitched in host memory while the windows run on the GPU); else the image's device.
    """
    if inferer.device is not None:
        return torch.device(inferer.device)
    thresh = getattr(inferer, "cpu_thresh", None)
    if thresh is not None and math.prod(image.shape[2:]) > thresh:
        return torch.device("cpu")
    return image.device


class WindowGrid:
    """MONAI's window grid, padding and importance map for one volume.

    Attributes:
        roi_size: window size per spatial dim.
        pad: F.pad-style padding (last dim first) applied to reach at least ``roi_size``.
        padded_size: spatial size after padding.
        slices: one tuple of spatial slices per window (MONAI order).
        importance: ``[*roi_size]`` blending weight ``omega`` (float32, on ``sw_device``).

    The normaliser ``sum_w omega_w`` is the plan's (:meth:`medcam.plan.PassPlan.full_count`, formed per window when
    few windows run).
    """

    def __init__(self, inferer: Any, spatial: tuple[int, ...], sw_device: torch.device):
        nd = len(spatial)
        self.spatial = spatial
        self.roi_size = tuple(fall_back_tuple(inferer.roi_size, spatial))
        pad: list[int] = []
        for k in range(nd - 1, -1, -1):  # as MONAI: symmetric padding up to roi_size, last dim first
            diff = max(self.roi_size[k] - spatial[k], 0)
            pad.extend([diff // 2, diff - diff // 2])
        self.pad = pad
        self.padded_size = tuple(max(s, r) for s, r in zip(spatial, self.roi_size))
        overlap = ensure_tuple_rep(inferer.overlap, nd)
        interval = _get_scan_interval(self.padded_size, self.roi_size, nd, overlap)
        self.slices: list[tuple[Any, ...]] = dense_patch_slices(self.padded_size, self.roi_size, interval)
        patch = get_valid_patch_size(self.padded_size, self.roi_size)
        mode = look_up_option(inferer.mode, BlendMode)
        self.importance = compute_importance_map(
            patch, mode=mode, sigma_scale=inferer.sigma_scale, device=sw_device, dtype=torch.float32
        )
        # offset of the original volume inside the padded one, per spatial dim
        self.crop = tuple(slice(pad[2 * (nd - 1 - d)], pad[2 * (nd - 1 - d)] + spatial[d]) for d in range(nd))

    def pad_tensor(self, x: torch.Tensor, padding_mode: str = "constant", cval: float = 0.0) -> torch.Tensor:
        if not any(self.pad):
            return x
        return F.pad(x, pad=self.pad, mode=look_up_option(padding_mode, PytorchPadMode), value=cval)

    def pad_zeros(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, pad=self.pad) if any(self.pad) else x


def monai_plan(inferer: Any, image: torch.Tensor, runner: ModelRunner | None = None) -> PassPlan:
    """The pass plan of ``SlidingWindowInferer`` on ``image`` ``[B, Cin, *S]``: MONAI's padding, window grid and
    importance map, one fold, no flips, ``sw_batch_size`` windows per call; its prediction is
    ``sliding_window_inference`` with the inferer's settings (float32 blending)."""
    check_inferer(inferer)
    sw_device = torch.device(inferer.sw_device) if inferer.sw_device is not None else image.device
    device = stitch_device(inferer, image)
    grid = WindowGrid(inferer, tuple(image.shape[2:]), sw_device)

    def predict_calls(
        plan: PassPlan, runner: ModelRunner, network: Callable[[torch.Tensor], torch.Tensor], progress: bool
    ) -> torch.Tensor:
        volume = plan.image[(slice(None), slice(None), *plan.crop)]
        with runner.autocast(plan.net_device):
            blended = sliding_window_inference(
                volume,
                grid.roi_size,
                inferer.sw_batch_size,
                network,
                overlap=inferer.overlap,
                mode=inferer.mode,
                sigma_scale=inferer.sigma_scale,
                padding_mode=inferer.padding_mode,
                cval=inferer.cval,
                sw_device=plan.net_device,
                device=plan.device,
                progress=progress,
            )
        assert isinstance(blended, torch.Tensor)
        return blended

    def predict(plan: PassPlan, runner: ModelRunner, hook: ActivationHook, progress: bool) -> torch.Tensor:
        return predict_calls(plan, runner, runner.hooked_predictor(hook), progress)

    return PassPlan(
        image=grid.pad_tensor(image, inferer.padding_mode, inferer.cval),
        crop=grid.crop,
        windows=grid.slices,
        importance=grid.importance.to(device),
        count=None,  # built when many windows run (PassPlan.full_count)
        device=device,
        net_device=sw_device,
        batch_size=int(inferer.sw_batch_size),
        predict=predict,
        predict_calls=predict_calls,
        description={"plan": "monai_sliding_window"},
    )
