"""Image geometry helpers shared by data loading, the pipeline and the phantoms."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["spacing_of"]


def spacing_of(affine: Any) -> tuple[float, ...]:
    """Voxel spacing (mm) along each array axis of an affine (4x4 numpy array or tensor): the column norms of its
    spatial block, e.g. ``(1.0, 1.0, 2.5)``."""
    a = np.asarray(affine.detach().cpu() if hasattr(affine, "detach") else affine, dtype=float)
    n = a.shape[0] - 1
    return tuple(float(v) for v in np.linalg.norm(a[:n, :n], axis=0))
