"""Regions of interest (ROIs) of a segmentation output, and the score explained for each.

A target turns the model output ``y`` (shape ``[B, C, *S]``: batch, output channels, spatial dims; a classifier's
``[B, C]`` works too) into score weights ``W`` of the same shape such that the explained score is

    S_b = sum_{c, u} W[b, c, u] * y[b, c, u]

For the ROI targets of Seg-Grad-CAM (Vinogradova et al. 2020) ``W`` is the ROI weight map ``M`` (0/1 for masks) on the
target channel and zero elsewhere, i.e. ``S = sum_{u in ROI} y_c(u)``. :class:`ContrastROI` adds ``-alpha * M`` on a
reference channel (Finer-CAM). ``y`` is the raw output (logits) unless the explainer is asked to score probabilities.

Targets that need the model's prediction (:class:`PredictedROI`, :class:`ComponentROI`) read it from the output of the
same forward pass (or, with a sliding-window inferer, from one no-grad pass over the whole volume).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from .errors import TargetError

__all__ = [
    "Target",
    "ClassROI",
    "PredictedROI",
    "ComponentROI",
    "MaskROI",
    "BoxROI",
    "VoxelROI",
    "ContrastROI",
    "as_target_list",
]

logger = logging.getLogger(__name__)


def _axis_any(nz: torch.Tensor, dim: int) -> torch.Tensor:
    """``[S_dim]`` bool: whether any element of ``nz`` is set in each slice along ``dim``."""
    other = [d for d in range(nz.ndim) if d != dim]
    return nz.any(dim=other[0]) if len(other) == 1 else nz.permute(dim, *other).flatten(1).any(dim=1)


def span(set_: torch.Tensor) -> slice:
    """The slice from the first to the last set element of a 1-D bool tensor."""
    idx = torch.nonzero(set_).flatten()
    return slice(int(idx.min()), int(idx.max()) + 1)


def _check_channel(channel: int, output: torch.Tensor, what: str = "channel") -> None:
    if output.ndim < 2:
        raise TargetError(f"model output has shape {tuple(output.shape)}; expected [B, C, *spatial]")
    n = output.shape[1]
    if not 0 <= channel < n:
        raise TargetError(
            f"{what} {channel} is out of range: the model output has {n} channels (shape {tuple(output.shape)}); "
            f"use a channel in 0..{n - 1}"
        )


def _channel_index(channel: object, what: str = "channel") -> int:
    """``channel`` as a non-negative int; negative indices are refused (``-1`` would silently be the last channel)."""
    if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)):
        raise TargetError(f"{what} must be an int, got {type(channel).__name__}")
    if channel < 0:
        raise TargetError(
            f"{what} {int(channel)} is negative; give the output channel as a non-negative index (0 = first channel)"
        )
    return int(channel)


#: output activations a target understands; "none" = the model's outputs already are probabilities
ACTIVATIONS = ("sigmoid", "softmax", "none")


def looks_like_probabilities(output: torch.Tensor, activation: str) -> bool:
    """True when ``output`` is what the activation would produce already: every value in [0, 1] (and, for softmax,
    channels summing to 1), i.e. the network ends in its own sigmoid/softmax and gives probabilities, not logits."""
    if output.numel() == 0 or not output.is_floating_point():
        return False
    lo, hi = float(output.min()), float(output.max())
    if lo < 0.0 or hi > 1.0:
        return False
    if activation == "softmax":
        return bool(torch.allclose(output.float().sum(1), torch.ones((), device=output.device), atol=1e-3))
    return True


def _warn_if_probabilities(output: torch.Tensor, channel: int, activation: str, threshold: float | None) -> None:
    if activation == "softmax" and threshold is None:
        return  # argmax: the same on probabilities and logits
    if looks_like_probabilities(output, activation):
        logger.warning(
            "the model output lies in [0, 1]: it looks like probabilities already (the network ends in its own "
            "%s), and a %s on top of it gives a wrong predicted region for channel %d (sigmoid(p) > 0.5 holds for "
            "every p > 0); pass output_activation='none' / activation='none' (command line: --activation none) to "
            "threshold the outputs themselves",
            activation,
            activation,
            channel,
        )


def _predicted_mask(output: torch.Tensor, channel: int, activation: str, threshold: float | None) -> torch.Tensor:
    """Boolean mask ``[B, *S]`` of the voxels the model assigns to ``channel``.

    sigmoid: ``sigmoid(y_c) > threshold``; softmax: ``argmax_c y == channel`` when threshold is None, else
    ``softmax(y)_c > threshold``; none (outputs are probabilities): ``y_c > threshold``. Threshold default 0.5.
    Warns when the output looks like probabilities but a sigmoid/softmax is to be applied on top.
    """
    if activation in ("sigmoid", "softmax"):
        _warn_if_probabilities(output, channel, activation, threshold)
    if activation == "sigmoid":
        thr = 0.5 if threshold is None else threshold
        return torch.sigmoid(output[:, channel].float()) > thr
    if activation == "softmax":
        if threshold is None:
            return output.argmax(dim=1) == channel
        return torch.softmax(output.float(), dim=1)[:, channel] > threshold
    if activation == "none":
        return output[:, channel].float() > (0.5 if threshold is None else threshold)
    raise TargetError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


class Target:
    """Base class: a region of interest on one output channel.

    Subclasses implement :meth:`roi`. ``needs_prediction`` is True for targets defined by the model's own prediction.
    """

    needs_prediction: bool = False

    def __init__(self, channel: int):
        self.channel = _channel_index(channel)

    # -- to implement -------------------------------------------------------------------------------------------
    def roi(self, output: torch.Tensor) -> torch.Tensor:
        """ROI weight map ``M``.

        Args:
            output: model output ``[B, C, *S]`` (detached).
        Returns:
            float32 tensor ``[B, *S]`` on ``output.device``; 0/1 for region targets.
        """
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------------------------
    def score_weights(self, output: torch.Tensor) -> torch.Tensor:
        """Score weights ``W`` ``[B, C, *S]`` (float32) with ``S = sum(W * output)`` over all non-batch dims."""
        _check_channel(self.channel, output)
        w = torch.zeros(output.shape, dtype=torch.float32, device=output.device)
        w[:, self.channel] = self.roi(output)
        return w

    def boxed_roi(self, output: torch.Tensor) -> tuple[tuple[slice, ...], torch.Tensor] | None:
        """The ROI as its bounding box: ``(spatial slices, values [B, *box])``, zero outside the box; None when the
        target has no cheaper form than :meth:`roi` (the default). ``output`` may be a zero-stride stand-in of the
        output's shape. Lets a sliding-window explanation hold a small ROI of a large volume at the ROI's size."""
        return None

    @property
    def name(self) -> str:
        """Short name usable in file names and tables, e.g. ``class1``, ``predicted2``."""
        return f"{type(self).__name__.removesuffix('ROI').lower()}{self.channel}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channel={self.channel})"


class ClassROI(Target):
    """All voxels of an output channel: ``S = sum_u y_c(u)`` (the original Seg-Grad-CAM target)."""

    def roi(self, output: torch.Tensor) -> torch.Tensor:
        _check_channel(self.channel, output)
        return torch.ones((output.shape[0], *output.shape[2:]), dtype=torch.float32, device=output.device)


class PredictedROI(Target):
    """The model's own predicted region for a channel, from the same forward pass.

    Args:
        channel: output channel.
        activation: ``"sigmoid"`` (multi-label outputs such as BraTS TC/WT/ET: ``sigmoid(y_c) > threshold``),
            ``"softmax"`` (mutually exclusive classes: voxels whose argmax is ``channel``; with an explicit threshold,
            ``softmax(y)_c > threshold``) or ``"none"`` (the network ends in its own sigmoid/softmax, its outputs are
            probabilities: ``y_c > threshold``). A sigmoid/softmax on outputs that already lie in [0, 1] is warned
            about (``sigmoid(p) > 0.5`` holds for every voxel).
        threshold: probability threshold. None (default) means 0.5 for sigmoid and argmax for softmax.
    """

    needs_prediction = True

    def __init__(
        self,
        channel: int,
        activation: Literal["sigmoid", "softmax", "none"] = "sigmoid",
        threshold: float | None = None,
    ):
        super().__init__(channel)
        if activation not in ACTIVATIONS:
            raise TargetError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if threshold is not None and not 0.0 <= threshold < 1.0:
            raise TargetError(f"threshold must be a probability in [0, 1), got {threshold}")
        self.activation = activation
        self.threshold = threshold

    def roi(self, output: torch.Tensor) -> torch.Tensor:
        _check_channel(self.channel, output)
        return _predicted_mask(output, self.channel, self.activation, self.threshold).float()

    def __repr__(self) -> str:
        return f"PredictedROI(channel={self.channel}, activation={self.activation!r}, threshold={self.threshold})"


class ComponentROI(PredictedROI):
    """One connected component of the predicted region (skimage labelling, per sample).

    Args:
        channel, activation, threshold: as :class:`PredictedROI`.
        which: ``"largest"``, or an int rank by size (0 = largest, 1 = second largest, ...).
        point: optional voxel index (one int per spatial dim); if given, the component containing it is taken
            and ``which`` is ignored.
        connectivity: neighbourhood for labelling, 1 (faces, 6-neighbourhood in 3D) up to ndim (26 in 3D).
    """

    def __init__(
        self,
        channel: int,
        which: Literal["largest"] | int = "largest",
        activation: Literal["sigmoid", "softmax", "none"] = "sigmoid",
        threshold: float | None = None,
        point: Sequence[int] | None = None,
        connectivity: int | None = None,
    ):
        super().__init__(channel, activation, threshold)
        if which != "largest" and not (isinstance(which, (int, np.integer)) and which >= 0):
            raise TargetError(f"which must be 'largest' or a non-negative int rank, got {which!r}")
        self.which = 0 if which == "largest" else int(which)
        self.point = None if point is None else tuple(int(p) for p in point)
        self.connectivity = connectivity

    def roi(self, output: torch.Tensor) -> torch.Tensor:
        from skimage.measure import label

        pred = super().roi(output).cpu().numpy().astype(bool)
        out = np.zeros(pred.shape, dtype=np.float32)
        for b in range(pred.shape[0]):
            if not pred[b].any():
                continue
            labels = label(pred[b], connectivity=self.connectivity)
            if self.point is not None:
                if len(self.point) != labels.ndim:
                    raise TargetError(f"point {self.point} has {len(self.point)} coordinates, output has {labels.ndim}")
                lab = labels[self.point]
                if lab == 0:
                    logger.warning("ComponentROI: voxel %s is not in the predicted region of sample %d", self.point, b)
                    continue
            else:
                sizes = np.bincount(labels.ravel())[1:]
                order = np.argsort(-sizes, kind="stable")
                if self.which >= len(order):
                    logger.warning(
                        "ComponentROI: sample %d has %d components, rank %d requested", b, len(order), self.which
                    )
                    continue
                lab = order[self.which] + 1
            out[b] = labels == lab
        return torch.from_numpy(out).to(output.device)

    @property
    def name(self) -> str:
        return f"component{self.channel}-{self.which}"

    def __repr__(self) -> str:
        return f"ComponentROI(channel={self.channel}, which={self.which}, point={self.point})"


class MaskROI(Target):
    """A user mask (weights allowed) on an output channel.

    Args:
        mask: tensor or numpy array of shape ``[*S]`` or ``[1, *S]`` (broadcast to the batch), ``[B, *S]`` (one per
            sample) or ``[B, 1, *S]``; bool or float weights, same spatial size as the model output.
        channel: output channel.
    """

    def __init__(self, mask: torch.Tensor | np.ndarray, channel: int):
        super().__init__(channel)
        if isinstance(mask, np.ndarray):
            mask = torch.from_numpy(np.ascontiguousarray(mask))
        if not isinstance(mask, torch.Tensor):
            raise TargetError(f"mask must be a torch tensor or numpy array, got {type(mask).__name__}")
        if not torch.isfinite(mask.float()).all():
            raise TargetError("mask contains NaN or inf values")
        if not bool((mask != 0).any()):
            logger.warning(
                "MaskROI on channel %d: the mask is all zero (empty ROI), so the score is 0 and the map all zero; "
                "check the mask (is it on the output grid, with the ROI non-zero?)",
                int(channel),
            )
        self.mask = mask

    def roi(self, output: torch.Tensor) -> torch.Tensor:
        return self._mask(output).expand(output.shape[0], *output.shape[2:]).clone()

    def boxed_roi(self, output: torch.Tensor) -> tuple[tuple[slice, ...], torch.Tensor] | None:
        m = self._mask(output)
        nz = m.ne(0).any(dim=0)  # [*S]
        if not bool(nz.any()):
            return None
        box = tuple(span(_axis_any(nz, d)) for d in range(nz.ndim))
        return box, m[(slice(None), *box)].expand(output.shape[0], *[s.stop - s.start for s in box]).clone()

    def _mask(self, output: torch.Tensor) -> torch.Tensor:
        """The mask as float32 ``[1 or B, *S]`` on ``output``'s device, checked against the output's shape."""
        spatial = tuple(output.shape[2:])
        b = output.shape[0]
        m = self.mask.to(device=output.device, dtype=torch.float32)
        nd = len(spatial)
        if m.ndim == nd + 2 and m.shape[1] == 1:
            m = m[:, 0]
        if m.ndim == nd:
            m = m[None]
        if m.ndim != nd + 1 or tuple(m.shape[1:]) != spatial or m.shape[0] not in (1, b):
            raise TargetError(
                f"MaskROI mask has shape {tuple(self.mask.shape)} but the model output is {tuple(output.shape)}: "
                f"give a mask of shape {spatial}, [1, *{spatial}] or [{b}, *{spatial}] (resample it to the "
                "output grid first)"
            )
        return m

    def __repr__(self) -> str:
        return f"MaskROI(channel={self.channel}, mask_shape={tuple(self.mask.shape)})"


class BoxROI(Target):
    """An axis-aligned box ``start <= index < stop`` (one int per spatial dim) on an output channel."""

    def __init__(self, channel: int, start: Sequence[int], stop: Sequence[int]):
        super().__init__(channel)
        self.start, self.stop = tuple(int(s) for s in start), tuple(int(s) for s in stop)
        if len(self.start) != len(self.stop):
            raise TargetError(f"BoxROI start {self.start} and stop {self.stop} have different lengths")
        if any(a >= b for a, b in zip(self.start, self.stop)) or any(a < 0 for a in self.start):
            raise TargetError(f"BoxROI needs 0 <= start < stop in every dim, got start={self.start} stop={self.stop}")

    def roi(self, output: torch.Tensor) -> torch.Tensor:
        spatial = tuple(output.shape[2:])
        if len(self.start) != len(spatial):
            raise TargetError(f"BoxROI has {len(self.start)} dims but the output has spatial shape {spatial}")
        if any(b > s for b, s in zip(self.stop, spatial)):
            raise TargetError(f"BoxROI stop {self.stop} lies outside the output spatial shape {spatial}")
        m = torch.zeros((output.shape[0], *spatial), dtype=torch.float32, device=output.device)
        m[(slice(None), *(slice(a, b) for a, b in zip(self.start, self.stop)))] = 1.0
        return m

    def boxed_roi(self, output: torch.Tensor) -> tuple[tuple[slice, ...], torch.Tensor] | None:
        spatial = tuple(output.shape[2:])
        if len(self.start) != len(spatial) or any(b > s for b, s in zip(self.stop, spatial)):
            return None  # roi() raises the error
        box = tuple(slice(a, b) for a, b in zip(self.start, self.stop))
        shape = (output.shape[0], *(b - a for a, b in zip(self.start, self.stop)))
        return box, torch.ones(shape, dtype=torch.float32, device=output.device)

    def __repr__(self) -> str:
        return f"BoxROI(channel={self.channel}, start={self.start}, stop={self.stop})"


class VoxelROI(Target):
    """A single output voxel (one int index per spatial dim)."""

    def __init__(self, channel: int, index: Sequence[int]):
        super().__init__(channel)
        self.index = tuple(int(i) for i in index)

    def roi(self, output: torch.Tensor) -> torch.Tensor:
        spatial = tuple(output.shape[2:])
        if len(self.index) != len(spatial) or any(not 0 <= i < s for i, s in zip(self.index, spatial)):
            raise TargetError(f"VoxelROI index {self.index} is outside the output spatial shape {spatial}")
        m = torch.zeros((output.shape[0], *spatial), dtype=torch.float32, device=output.device)
        where: tuple[slice | int, ...] = (slice(None), *self.index)
        m[where] = 1.0
        return m

    def boxed_roi(self, output: torch.Tensor) -> tuple[tuple[slice, ...], torch.Tensor] | None:
        spatial = tuple(output.shape[2:])
        if len(self.index) != len(spatial) or any(not 0 <= i < s for i, s in zip(self.index, spatial)):
            return None  # roi() raises the error
        box = tuple(slice(i, i + 1) for i in self.index)
        return box, torch.ones((output.shape[0],) + (1,) * len(spatial), dtype=torch.float32, device=output.device)

    def __repr__(self) -> str:
        return f"VoxelROI(channel={self.channel}, index={self.index})"


class ContrastROI(Target):
    """Finer-CAM style contrast: ``S = sum_u M(u) (y_c(u) - alpha * y_ref(u))`` (Zhang et al. 2025).

    Args:
        channel: explained channel ``c``.
        reference_channel: the competing channel ``ref``.
        alpha: contrast strength; 0 gives the base target.
        region: the ROI ``M``: any target on ``channel`` (default :class:`ClassROI`).
    """

    def __init__(self, channel: int, reference_channel: int, alpha: float = 1.0, region: Target | None = None):
        super().__init__(channel)
        self.reference_channel = _channel_index(reference_channel, "reference_channel")
        self.alpha = float(alpha)
        self.region = region if region is not None else ClassROI(channel)
        self.needs_prediction = self.region.needs_prediction

    def roi(self, output: torch.Tensor) -> torch.Tensor:
        return self.region.roi(output)

    def score_weights(self, output: torch.Tensor) -> torch.Tensor:
        _check_channel(self.reference_channel, output, "reference_channel")
        w = super().score_weights(output)
        w[:, self.reference_channel] -= self.alpha * w[:, self.channel]
        return w

    @property
    def name(self) -> str:
        return f"contrast{self.channel}-{self.reference_channel}"

    def __repr__(self) -> str:
        return f"ContrastROI(channel={self.channel}, reference_channel={self.reference_channel}, alpha={self.alpha})"


def as_target_list(targets: Target | Sequence[Target]) -> list[Target]:
    """Normalise a target or a sequence of targets to a non-empty list, with a clear error otherwise."""
    if isinstance(targets, Target):
        return [targets]
    tl = list(targets)
    if not tl:
        raise TargetError("no targets given: pass e.g. [targets.ClassROI(1)]")
    for t in tl:
        if not isinstance(t, Target):
            raise TargetError(f"expected medcam.targets.Target objects, got {type(t).__name__}: {t!r}")
    return tl
