"""Type aliases shared by medcam's modules."""

from __future__ import annotations

import os
from typing import Any, get_args

from .errors import MedcamError

__all__ = ["PathLike", "literal_value"]

#: a file-system path as users pass it: ``str`` or ``pathlib.Path`` (any ``os.PathLike[str]``)
PathLike = str | os.PathLike[str]


def literal_value(value: object, choices: Any, what: str, error: type[MedcamError] = MedcamError) -> Any:
    """``value`` if it is one of the values of the ``Literal`` alias ``choices`` (so a ``str`` option can be passed on
    as that type), else ``error`` naming the option ``what`` and its values."""
    allowed = get_args(choices)
    if value in allowed:
        return value
    names = [repr(c) for c in allowed]
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    raise error(f"{what} must be {listed}, got {value!r}")
