"""Who runs the cases of a cohort: this process (:class:`LocalExecutor`) or a Ray cluster (``RayExecutor``).

The cohort loop (:func:`medcam.pipeline.run_cohort`, used by :func:`medcam.pipeline.explain_cohort` and
``medcam.pipeline.evaluate.evaluate_files``) decides on the driver which cases are already done (resume) and hands
the others, one case per unit of work, to an executor together with a *work* object
(:class:`medcam.pipeline.cohort.CohortJob`). The work object is picklable and knows how to set itself up on a worker
(:meth:`CaseWork.setup`: e.g. move the model to the worker's device, once per worker) and how to do one case
(:meth:`CaseWork.run_case`: :func:`~medcam.pipeline.process_case`: load, explain or score, write the case folder
through a staging folder, and return the case's record; a case that raises is returned as a ``"failed"`` record,
never raised). Both executors call the same two methods, so a case gives the same folder and the same record
wherever it runs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .errors import PipelineError

Record = dict[str, Any]


@runtime_checkable
class CaseWork(Protocol):
    """One kind of per-case job (explain, evaluate), picklable, shipped once to every worker."""

    def setup(self, device: str | None = None) -> CaseWork:
        """The work ready to run on this worker (model on ``device``; None keeps the configured device)."""
        ...

    def run_case(self, source: Any) -> Record:
        """Do one case and return its record (``case_id``, ``status`` ok/failed, ``error``, ``seconds``...)."""
        ...

    def failed_record(self, source: Any, error: str) -> Record:
        """The record of a case that could not be done at all (e.g. its worker died every time)."""
        ...

    def discard_partial(self, source: Any) -> None:
        """Remove what a killed attempt at ``source`` may have left (its staging folders)."""
        ...

    def cost(self, source: Any) -> float:
        """Relative size of the case, for largest-first scheduling (e.g. bytes of its input files)."""
        ...


@runtime_checkable
class Executor(Protocol):
    """Runs ``work.run_case`` for every source and reports each record as it completes."""

    def run(self, work: CaseWork, sources: Sequence[Any], on_record: Callable[[Record], None]) -> None: ...


def input_bytes(src: Any) -> float:
    """Bytes of a case's input files (a :class:`~medcam.pipeline.CaseSource`: folder, mapping or file list); 0 if
    unknown. The size used for largest-first scheduling."""
    paths = src.source.values() if isinstance(src.source, Mapping) else src.source
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    total = 0
    for p in map(Path, paths):
        try:
            total += sum(f.stat().st_size for f in p.iterdir() if f.is_file()) if p.is_dir() else p.stat().st_size
        except OSError:
            pass
    return float(total)


def work_device(work: Any) -> str | None:
    """The device a work object computes on (its ``device``, or its prepared settings' ``device``), or None."""
    device = getattr(work, "device", None)
    if device is None:
        device = getattr(getattr(work, "prepared", None), "device", None)
    return None if device is None else str(device)


class LocalExecutor:
    """Every case in this process, one after the other, in the order given (the classic ``medcam explain`` loop)."""

    def device_type(self, work: Any) -> str | None:
        """The device type the cases will run on here (the work's own device), for the resume check."""
        device = work_device(getattr(work, "work", work))
        return None if device is None else device.split(":")[0]

    def run(self, work: CaseWork, sources: Sequence[Any], on_record: Callable[[Record], None]) -> None:
        ready = work.setup()
        for src in sources:
            rec = ready.run_case(src)
            on_record(rec)
            if rec.get("stop"):  # the disk is full: the remaining cases are not attempted
                break


RAY_INSTALL_HINT = "Ray is not installed: pip install 'medcam[ray]'  (or: pip install 'ray[client]')"


def ray_available() -> bool:
    """True if the ``ray`` package can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


_ADDRESS = re.compile(r"^(auto|local|ray://[^\s/]+(:\d+)?|[A-Za-z0-9_.\-]+:\d+)$")


def ray_executor(address: str | None = None, **options: Any) -> Executor:
    """A ``RayExecutor`` for ``address`` (None/``"local"``: a local instance; ``"auto"``; ``"ray://host:10001"``;
    ``"host:6379"``), checked before anything runs.

    Raises:
        PipelineError: ``ray`` not installed (with the install command) or an address that is none of the above.
    """
    if address is not None and not _ADDRESS.match(address):
        raise PipelineError(
            f"--ray {address!r} is not a Ray address: use --ray alone (a local Ray instance), --ray auto (the "
            "cluster this machine joined with `ray start`) or --ray ray://HEAD:10001; write --ray=ADDRESS or put "
            "--ray after the inputs"
        )
    if not ray_available():
        raise PipelineError(RAY_INSTALL_HINT)
    from .ray_executor import RayExecutor

    return RayExecutor(address, **options)


def resolve_executor(executor: str | Executor | None, **ray_options: Any) -> Executor:
    """``None``/``"local"`` -> :class:`LocalExecutor`; ``"ray"`` -> ``RayExecutor(**ray_options)``; an object
    with a ``run`` method is returned as it is.

    Raises:
        PipelineError: unknown name, or ``"ray"`` without the ``ray`` package (the message says how to install it).
    """
    if executor is None or executor == "local":
        if ray_options:
            raise PipelineError(f"options {sorted(ray_options)} need executor='ray'")
        return LocalExecutor()
    if executor == "ray":
        return ray_executor(**ray_options)
    if isinstance(executor, str):
        raise PipelineError(f"unknown executor {executor!r}; use 'local', 'ray' or an executor object")
    if not callable(getattr(executor, "run", None)):
        raise PipelineError(f"executor {executor!r} has no run(work, sources, on_record) method")
    return executor
