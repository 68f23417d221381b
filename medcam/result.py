"""What an explanation produces (:class:`CAMResult`) and how maps reach the input grid (:func:`interpolate_upsampler`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .errors import MedcamError
from .targets import Target

__all__ = ["CAMResult", "Upsampler", "interpolate_upsampler"]

#: ``upsampler(maps [B, K, *f], size tuple) -> [B, K, *size]``
Upsampler = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


def interpolate_upsampler(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Default upsampler: linear/bilinear/trilinear interpolation with ``align_corners=False``.

    Linear interpolation cannot overshoot (unlike the cubic spline resizing of some tools), so a non-negative map
    stays non-negative and the maximum is not exceeded.
    """
    nd = maps.ndim - 2
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}.get(nd)
    if mode is None:
        raise MedcamError(f"cannot upsample a map with {nd} spatial dims")
    if tuple(maps.shape[2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode=mode, align_corners=False)


@dataclass
class CAMResult:
    """What one explanation call produced.

    Attributes:
        maps: float32 ``[B, K, *S]`` (input grid) or ``[B, K, *f]`` (layer grid when ``upsample=False``), one map
            per target, ReLU applied unless ``relu=False``; on the input's device, or with a sliding-window
            inferer where MONAI puts its blended output (``inferer.device``, the CPU past ``cpu_thresh``).
        scores: float32 ``[B, K]`` explained score ``S = sum W * y`` per sample and target (logit units, or
            probability units with ``score="probability"``).
        roi_voxels: int64 ``[B, K]`` number of output voxels with non-zero ROI weight.
        targets: the targets, in map order.
        layer: dotted name of the hooked layer.
        feature_shape: spatial shape of the layer's output for one forward (one window with an inferer).
        output: the model output ``[B, C, *S]`` (detached; the blended output with an inferer, when it was
            computed), or None.
        stats: counters, e.g. ``windows``, ``backward_windows`` for the sliding-window executor.
    """

    maps: torch.Tensor
    scores: torch.Tensor
    roi_voxels: torch.Tensor
    targets: list[Target]
    layer: str
    feature_shape: tuple[int, ...]
    output: torch.Tensor | None = None
    stats: dict[str, Any] = field(default_factory=dict)
