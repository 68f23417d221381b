"""Exceptions raised by medcam.

Every error medcam raises on bad input is a :class:`MedcamError` (a ``ValueError``) whose message names the problem
and how to fix it, raised before any expensive computation.
"""

from __future__ import annotations

__all__ = ["MedcamError", "LayerError", "TargetError", "ModelError"]


class MedcamError(ValueError):
    """Base class of medcam's input errors."""


class LayerError(MedcamError):
    """The layer to hook is unknown, ambiguous or never runs in forward."""


class TargetError(MedcamError):
    """A target (region of interest) does not fit the model output (channel out of range, wrong mask shape, ...)."""


class ModelError(MedcamError):
    """The model cannot be explained as given (TorchScript, non-tensor output, non-finite gradients, ...)."""
