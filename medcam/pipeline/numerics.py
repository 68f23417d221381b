"""The numerics that change a case's maps, recorded with the settings and applied to every case wherever it runs.

A case's maps are sums of many products; how a CPU splits those sums over threads, which convolution algorithm
cuDNN picks, whether matrix products use TF32 all change the last bits of every voxel (up to 4e-4 of a map's
maximum for Grad-CAM on a 2-core machine, 1 thread against 2). So that a case gives the same folder wherever it
runs (this process, a Ray worker, another node of a split run), the cohort loop

* records these numerics in the run settings (:func:`numerics_settings`; part of the settings signature, so a
  resume with other numerics is refused like any other settings change, naming what differs), and in every case's
  ``summary.json`` together with the device the case ran on (:func:`case_numerics`);
* applies them around every case, on the driver and on every worker alike, and restores the process's own values
  afterwards (:func:`applied`).

**The default is one torch thread** (:data:`DEFAULT_THREADS`): the only thread count that every machine and every
Ray worker (one CPU each by default) can honour without oversubscribing, and it gives bit-equal maps wherever the
case runs. ``--threads N`` (recorded) is faster on a many-core CPU; every case of the folder must then use the same
``N``. On a GPU the CPU thread count barely matters for speed; it is still recorded and applied.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .errors import PipelineError

__all__ = ["DEFAULT_THREADS", "numerics_settings", "applied", "case_numerics", "check_threads"]

#: torch intra-op threads of every case unless ``--threads`` says otherwise (see the module docstring)
DEFAULT_THREADS = 1


def check_threads(threads: int | None) -> int:
    """``threads`` (None: :data:`DEFAULT_THREADS`) checked to be a whole number >= 1.

    Raises:
        PipelineError: naming ``--threads`` and the value.
    """
    if threads is None:
        return DEFAULT_THREADS
    if isinstance(threads, bool) or int(threads) != threads or int(threads) < 1:
        raise PipelineError(f"--threads must be a whole number >= 1, got {threads!r}")
    return int(threads)


def _flags() -> dict[str, Any]:
    """This process's torch switches that change results (deterministic algorithms, cuDNN, TF32, dtype)."""
    return {
        "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cuda_matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": str(torch.get_float32_matmul_precision()),
        "default_dtype": str(torch.get_default_dtype()).replace("torch.", ""),
    }


def numerics_settings(threads: int | None = None) -> dict[str, Any]:
    """The numerics of a run, as recorded in its settings: ``torch_threads`` (:func:`check_threads`) and the switches
    of this (the driver's) process, which :func:`applied` sets on every worker too."""
    return {"torch_threads": check_threads(threads), **_flags()}


def _set(numerics: Mapping[str, Any]) -> None:
    torch.set_num_threads(int(numerics["torch_threads"]))
    if "deterministic_algorithms" in numerics:
        torch.use_deterministic_algorithms(bool(numerics["deterministic_algorithms"]))
    for key, obj, attr in (
        ("cudnn_deterministic", torch.backends.cudnn, "deterministic"),
        ("cudnn_benchmark", torch.backends.cudnn, "benchmark"),
        ("cuda_matmul_tf32", torch.backends.cuda.matmul, "allow_tf32"),
        ("cudnn_tf32", torch.backends.cudnn, "allow_tf32"),
    ):
        if key in numerics:
            setattr(obj, attr, bool(numerics[key]))
    if "float32_matmul_precision" in numerics:
        torch.set_float32_matmul_precision(str(numerics["float32_matmul_precision"]))


@contextlib.contextmanager
def applied(numerics: Mapping[str, Any] | None) -> Iterator[None]:
    """Run the block with ``numerics`` (from :func:`numerics_settings`) in effect in this process; the process's own
    thread count and switches are restored afterwards, also on error. None: nothing is changed."""
    if not numerics:
        yield
        return
    before = {"torch_threads": torch.get_num_threads(), **_flags()}
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    _set(numerics)
    try:
        yield
    finally:
        _set(before)
        if before["deterministic_algorithms"]:
            torch.use_deterministic_algorithms(True, warn_only=warn_only)


def case_numerics(device: Any = None) -> dict[str, Any]:
    """The numerics in effect now (inside :func:`applied`) and the device type a case ran on (``cpu``/``cuda``/
    ...; None when the work does not say), as recorded in the case's ``summary.json``."""
    dev = None if device is None else torch.device(str(device)).type
    return {"torch_threads": torch.get_num_threads(), **_flags(), "device": dev}
