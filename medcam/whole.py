"""Whole-image executor: one forward pass of the whole image, one backward pass per target.

Order of operations (fixed): pre-ReLU map on the feature grid -> (bi/tri)linear upsampling (align_corners=False) to
the input size -> ReLU. Nothing is normalised; use :func:`medcam.normalize` explicitly.
"""

from __future__ import annotations

import logging

import torch

from .formulas import Formula
from .result import CAMResult, Upsampler, interpolate_upsampler
from .runner import ModelRunner
from .targets import Target

__all__ = ["explain_whole"]

logger = logging.getLogger(__name__)


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
    spatial = tuple(image.shape[2:])
    with runner.session("grad") as hook:
        y, a = runner.forward(image, hook)
        y_det = y.detach().float()
        af = runner.to_feature_map(a.detach(), spatial)
        scores, voxels, g_outs = [], [], []
        for t in targets:
            w = t.score_weights(y_det)
            voxels.append((t.roi(y_det) != 0).reshape(y_det.shape[0], -1).sum(1))
            g, s = runner.output_gradient(y_det, w)
            scores.append(s)
            g_out: torch.Tensor | None = g
            if not bool((g != 0).any()):
                logger.warning("target %r has an empty ROI: its map is all zero", t)
                g_out = None
            g_outs.append(g_out)
        grads = iter(runner.activation_grads(y, a, [g for g in g_outs if g is not None]))
        maps = [
            torch.zeros((af.shape[0], *af.shape[2:]), device=af.device)
            if g_out is None
            else method.map(af, runner.to_feature_map(next(grads), spatial), runner.layer_name)
            for g_out in g_outs
        ]
        del y, a
    m = torch.stack(maps, dim=1)
    if upsample:
        m = upsampler(m, spatial)
    if relu:
        m = torch.relu(m)
    return CAMResult(
        maps=m.float().to(image.device),
        scores=torch.stack(scores, 1).float().cpu(),
        roi_voxels=torch.stack(voxels, 1).cpu(),
        targets=targets,
        layer=str(runner.layer_name),
        feature_shape=tuple(af.shape[2:]),
        output=y_det,
    )
