"""Type aliases shared by medcam's modules."""

from __future__ import annotations

import os

__all__ = ["PathLike"]

#: a file-system path as users pass it: ``str`` or ``pathlib.Path`` (any ``os.PathLike[str]``)
PathLike = str | os.PathLike[str]
