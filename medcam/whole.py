"""Whole-image executor: one forward pass of the whole image, one backward pass per target.

The plan of one pass per sample (:func:`medcam.plan.whole_plan`), run by :func:`medcam.executor.execute`.
Order of operations (fixed): pre-ReLU map on the feature grid -> (bi/tri)linear upsampling (align_corners=False) to
the input size -> ReLU. Nothing is normalised; use :func:`medcam.normalize` explicitly.
"""

from __future__ import annotations

import torch

from .executor import execute
from .formulas import Formula
from .plan import whole_plan
from .result import CAMResult, Upsampler, interpolate_upsampler
from .runner import ModelRunner
from .targets import Target

__all__ = ["explain_whole"]


def explain_whole(
    runner: ModelRunner,
    method: Formula,
    targets: list[Target],
    image: torch.Tensor,
    *,
    upsampler: Upsampler = interpolate_upsampler,
    relu: bool = True,
    upsample: bool = True,
) -> CAMResult:
    """Maps of ``image`` ``[B, Cin, *S]`` (validated, layer resolved) for ``targets``; see :class:`CAMResult`."""
    return execute(runner, method, whole_plan(image), targets, upsampler=upsampler, relu=relu, upsample=upsample)
