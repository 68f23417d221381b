"""The pipeline's own exception, :class:`PipelineError` (shared by all its modules)."""

from __future__ import annotations

from ..errors import MedcamError


class PipelineError(MedcamError):
    """Bad command-line level input: unknown model spec, unreadable manifest, output folder conflicts..."""
