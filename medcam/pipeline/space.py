"""Full disks, found before the work and at the first failed write (issue 30).

* Before the first case, :func:`check_free_space` compares the free space of the output file system with the
  expected size of one case (the largest output folder of a finished case of this folder, else the largest case's
  input files) and refuses the run naming both numbers.
* A case that fails because the file system is full (``ENOSPC``, ``EDQUOT`` for a quota, or a short write
  reported without errno, as numpy does, on a file system with less than 1 MiB left) is recorded as failed
  with a :class:`DiskFullError` naming the path; the cohort loop then attempts no further case, and still writes
  its summary (the failed case's staging folder is removed first, which frees its space).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from .errors import PipelineError

__all__ = ["DiskFullError", "disk_full", "check_free_space", "NO_SPACE"]

#: errno values that mean "no space left" (a full file system, or a full quota)
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFullError(PipelineError):
    """The output file system is full (or the user's quota is used up); names the path that could not be written."""


def disk_full(error: BaseException, where: Path) -> DiskFullError | None:
    """A :class:`DiskFullError` if ``error`` (or an error it was raised from) is a full-disk ``OSError``, else None.

    Args:
        where: the path to name when the error does not name one (the case folder).
    """
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DiskFullError):
            return e
        if isinstance(e, OSError) and (e.errno in NO_SPACE or (e.errno is None and _nearly_full(where))):
            path = e.filename or where
            return DiskFullError(
                f"no space left on the file system of '{path}' ({e.strerror or 'ENOSPC'}); the cohort stopped here: "
                "free space (or choose another --output) and run the same command to resume"
            )
        e = e.__cause__ or e.__context__
    return None


def _nearly_full(where: Path) -> bool:
    """A short write without errno (numpy's ``"N requested and M written"``) on a file system with < 1 MiB free."""
    for p in (where, *where.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free < 2**20
            except OSError:
                return False
    return False


def check_free_space(folder: Path, need: int, what: str = "one case") -> None:
    """Refuse to start when ``folder``'s file system has less than ``need`` bytes free.

    Raises:
        DiskFullError: naming the folder, the free space and ``need`` (in MiB).
    """
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if need > 0 and free < need:
        raise DiskFullError(
            f"only {free / 2**20:.1f} MiB free on the file system of '{folder}', and {what} needs about "
            f"{need / 2**20:.1f} MiB; free space or choose another --output (nothing was run)"
        )
