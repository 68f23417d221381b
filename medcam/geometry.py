"""Image geometry helpers shared by data loading, the pipeline and the phantoms."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import MedcamDataError

__all__ = ["spacing_of"]


def spacing_of(affine: Any) -> tuple[float, ...]:
    """Voxel spacing (mm) along each array axis of an affine (4x4 numpy array or tensor): the column norms of its
    spatial block, e.g. ``(1.0, 1.0, 2.5)``."""
    a = np.asarray(affine.detach().cpu() if hasattr(affine, "detach") else affine, dtype=float)
    n = a.shape[0] - 1
    return tuple(float(v) for v in np.linalg.norm(a[:n, :n], axis=0))


def parse_slice_at(slice_at: str) -> tuple[float, float, float] | None:
    """None for "roi"/"max"; the RAS point (mm) of ``"x,y,z"``.

    Raises:
        MedcamDataError: anything else."""
    if slice_at in ("roi", "max"):
        return None
    try:
        x, y, z = (float(v) for v in str(slice_at).split(","))
    except ValueError:
        raise MedcamDataError(f"slice position must be 'roi', 'max' or 'x,y,z' (RAS mm), got {slice_at!r}") from None
    return x, y, z
