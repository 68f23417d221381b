"""Atomic file writing with overwrite protection.

Every writer in medcam goes through :func:`atomic_write`: the content is written to a hidden temporary file in the
destination folder and then moved into place with :func:`os.replace`, so a crash never leaves a half-written file and
an existing file is replaced in one step. Existing outputs are refused unless ``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..errors import OutputExistsError
from ..types import PathLike

logger = logging.getLogger(__name__)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", socket.gethostname()) or "host"


def check_output_path(path: PathLike, overwrite: bool = False) -> Path:
    """Validate an output path before any expensive work.

    Args:
        path: destination file.
        overwrite: allow replacing an existing file.

    Returns:
        The path as :class:`~pathlib.Path`.

    Raises:
        OutputExistsError: the file exists and ``overwrite`` is False.
        IsADirectoryError: the path is an existing directory.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"Output path '{path}' is a directory; give a file name.")
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"Output file '{path}' already exists; refusing to overwrite it. "
            "Pass overwrite=True to replace it, or choose another file name."
        )
    return path


@contextlib.contextmanager
def atomic_write(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Context manager yielding a temporary path to write to; moved onto ``path`` on success.

    The temporary file lives in the destination folder (same file system, so :func:`os.replace` is atomic), is
    named ``.tmp-<pid>@<host>-<hex>-<name>`` (so that a later cohort run can tell one left by a killed process,
    :func:`medcam.pipeline.resume.remove_leftovers`) and ends with the destination's name, so writers that pick the format from the extension (``.nii.gz``,
    ``.seg.nrrd``, ``.png``) behave as for the final name. On an exception the temporary file is removed and the
    destination is left untouched. Parent folders are created.

    Example::

        with atomic_write("out/map.nii.gz") as tmp:
            nib.save(img, tmp)

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False (checked before and after writing).
    """
    path = check_output_path(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{os.getpid()}@{_host()}-{uuid.uuid4().hex[:12]}-{path.name}"
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"atomic_write: nothing was written to the temporary file for '{path}'.")
        if path.exists() and not overwrite:  # appeared while we were writing
            raise OutputExistsError(f"Output file '{path}' appeared while writing; refusing to overwrite it.")
        os.replace(tmp, path)
        logger.debug("wrote %s", path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: PathLike, data: bytes, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`). Returns the final path."""
    with atomic_write(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: PathLike, text: str, overwrite: bool = False, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`). Returns the final path."""
    return write_bytes_atomic(path, text.encode(encoding), overwrite=overwrite)
