"""Exceptions raised by medcam.

Every error medcam raises on bad input is a :class:`MedcamError` (a ``ValueError``) whose message names the problem
and how to fix it, raised before any expensive computation. The command line prints a :class:`MedcamError` as one
line; any other exception escaping medcam is a bug.
"""

from __future__ import annotations

__all__ = [
    "MedcamError",
    "LayerError",
    "TargetError",
    "ModelError",
    "MedcamDataError",
    "PhantomError",
    "OutputExistsError",
]


class MedcamError(ValueError):
    """Base class of medcam's input errors."""


class LayerError(MedcamError):
    """The layer to hook is unknown, ambiguous or never runs in forward."""


class TargetError(MedcamError):
    """A target (region of interest) does not fit the model output (channel out of range, wrong mask shape, ...)."""


class ModelError(MedcamError):
    """The model cannot be explained as given (TorchScript, non-tensor output, non-finite gradients, ...)."""


class MedcamDataError(MedcamError):
    """Bad input data (missing/unreadable file, inconsistent grids, not 3D, empty or non-finite image...).

    The message names the offending file and says how to fix the problem.
    """


class PhantomError(MedcamError):
    """Invalid phantom parameters or missing template files."""


class OutputExistsError(MedcamError, FileExistsError):
    """An output file already exists and ``overwrite`` is False (also a ``FileExistsError``)."""
