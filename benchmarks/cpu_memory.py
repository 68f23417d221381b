"""Host-memory reuse for a benchmark's own process (glibc only); not part of the medcam package.

Why: a sliding-window explanation allocates and frees the same large tensors window after window. By default glibc
hands freed memory at the top of its heap back to the OS (``M_TRIM_THRESHOLD``, 128 KiB and up) and serves large
blocks by fresh ``mmap`` calls, so every window page-faults its tensors in again. The explanation holds more memory
per window than inference (the decoder's autograd graph), so it pays more. On the benchmark's CPU case (4x128x128x96,
64^3 windows, 2 cores; ``benchmarks/sliding_window.py --keep-freed-memory``, numbers in docs/benchmarks.md) it made inference
14-18 % and a 1- or 3-target explanation 15-22 % faster; the ratio between the two moves little.
The price: the process keeps its peak heap after the call instead of returning it to the OS.

Neither medcam nor its command line change allocator settings (process-global state); the benchmark applies it to
both sides with ``--keep-freed-memory``. In your own process, copy this function or start Python with
``MALLOC_TRIM_THRESHOLD_=2147483647``.
"""

from __future__ import annotations

import ctypes
import logging
import sys

__all__ = ["keep_freed_memory"]

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_C_INT_MAX = 2**31 - 1


def keep_freed_memory(trim_threshold: int = _C_INT_MAX, mmap_threshold: int = 2**30) -> bool:
    """Ask glibc to keep freed memory for reuse: trim and mmap thresholds in bytes (C ``int``, at most 2 GiB - 1).

    Blocks up to ``mmap_threshold`` come from the heap, whose freed top is kept up to ``trim_threshold``. Old glibc
    versions refuse mmap thresholds over 32 MiB: 32 MiB is then used. Returns True if the trim threshold was applied
    (False on other platforms or C libraries, where nothing changes).

    Raises:
        ValueError: a threshold outside 0 .. 2**31 - 1.
    """
    for name, value in (("trim_threshold", trim_threshold), ("mmap_threshold", mmap_threshold)):
        if not 0 <= int(value) <= _C_INT_MAX:  # ctypes would wrap a larger value round to a negative C int
            raise ValueError(f"{name}={value} bytes: give 0 to {_C_INT_MAX} (2 GiB - 1), the range of a C int")
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no glibc (e.g. musl): leave the allocator alone
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) != 1:
        return False
    if mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) != 1:
        mallopt(_M_MMAP_THRESHOLD, min(int(mmap_threshold), 32 * 2**20))
    logger.debug("keep_freed_memory: trim threshold %d, mmap threshold %d", trim_threshold, mmap_threshold)
    return True
