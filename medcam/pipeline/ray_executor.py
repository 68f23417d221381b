"""Cohorts on a Ray cluster: one actor per worker holds the model, cases go to whichever worker is free.

Used through ``explain_cohort(..., executor="ray")`` / ``medcam explain|evaluate ... --ray [ADDRESS]``; importing
this module needs the ``ray`` package (``pip install 'medcam[ray]'``).

* **Workers** are Ray actors. Each receives the work object (model included) once, from Ray's object store, moves the
  model to its device (``cuda`` when Ray gave it a GPU share, else ``cpu``) and then explains one case per call.
* **Scheduling**: cases are sorted largest first (bytes of their input files) and handed to workers as they free up,
  so the big cases do not end up last on a single worker.
* **Faults**: a case that raises is a ``"failed"`` record (from the worker, as in a local run). A worker process that
  dies during a case (SIGKILL, out of memory, pre-empted node) is replaced by a new actor; its case's staging folder
  is removed and the case is queued again, at the front, up to ``max_retries`` times, then recorded as failed.
* **A worker that cannot start** (the model cannot be unpickled or moved to its device) stops the run with a
  :class:`PipelineError`: no case could run there, and retrying every case would only repeat it.
* **Interruption of the driver**: the workers are killed, their staging folders removed; case folders only ever
  appear complete (the worker moves its staging folder into place), so a re-run resumes.
* **Logs**: each worker appends the ``medcam`` log records to ``<log_dir>/worker-<slot>-<pid>.log``.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
from ray import exceptions as rex

from .errors import PipelineError

# the work object follows medcam.pipeline.executors.CaseWork; not imported from there, which imports this module
# lazily (RayExecutor), so that the two modules form no import cycle
CaseWork = Any
Record = dict[str, Any]

logger = logging.getLogger(__package__)

#: errors that mean "the worker process is gone" (the case may succeed elsewhere): retried
_WORKER_LOST: tuple[type[BaseException], ...] = tuple(
    getattr(rex, n)
    for n in ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "OutOfMemoryError")
    if hasattr(rex, n)
) + ((rex.ObjectLostError,) if hasattr(rex, "ObjectLostError") else ())


class _CaseWorker:
    """The actor: the work set up once on this worker, then one case per :meth:`run` call."""

    def __init__(self, work: CaseWork, slot: int, log_dir: str | None, threads: int) -> None:
        import torch

        self.slot = slot
        if log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(Path(log_dir) / f"worker-{slot}-{os.getpid()}.log", encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root = logging.getLogger("medcam")
            root.addHandler(handler)
            root.setLevel(logging.INFO)
        torch.set_num_threads(max(1, threads))  # this worker process only
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.work = work.setup(device)
        logger.info(
            "worker %d (pid %d, node %s) ready on %s", slot, os.getpid(), ray.util.get_node_ip_address(), device
        )

    def run(self, source: Any) -> Record:
        logger.info("worker %d: case %s", self.slot, getattr(source, "case_id", source))
        return self.work.run_case(source)

    def pid(self) -> int:
        return os.getpid()


class RayExecutor:
    """Run a cohort's cases on Ray actors (see the module docstring).

    Args:
        address: ``None`` starts a local Ray instance with all local CPUs/GPUs (or uses the one this process already
            started with ``ray.init``); ``"auto"`` joins the cluster this machine belongs to (``ray start``);
            ``"ray://host:10001"`` joins through Ray Client.
        gpus_per_worker: GPU share per worker (``0.5`` packs two workers per GPU); None: 1 if the cluster has GPUs,
            else 0 (CPU workers).
        cpus_per_worker: CPU cores per worker (its torch thread count between cases; each case runs with the run's
            recorded ``--threads``, :mod:`medcam.pipeline.numerics`, as in a local run).
        workers: number of workers; None: as many as the cluster's GPUs (or CPUs) allow, at most one per case.
        max_retries: how often a case whose worker died is tried again before it is recorded as failed.
        init_kwargs: extra ``ray.init`` arguments when this executor starts or joins Ray (e.g. ``num_cpus=2``).
        log_dir: folder of the per-worker log files (None: the work's ``log_dir``, e.g. ``OUT/logs``).
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        gpus_per_worker: float | None = None,
        cpus_per_worker: float = 1,
        workers: int | None = None,
        max_retries: int = 2,
        init_kwargs: dict[str, Any] | None = None,
        log_dir: str | os.PathLike | None = None,
    ) -> None:
        if gpus_per_worker is not None and gpus_per_worker < 0:
            raise PipelineError(f"--gpus-per-worker must be >= 0, got {gpus_per_worker}")
        if gpus_per_worker is not None and gpus_per_worker > 1 and gpus_per_worker != int(gpus_per_worker):
            raise PipelineError(f"--gpus-per-worker above 1 must be a whole number, got {gpus_per_worker}")
        if cpus_per_worker <= 0:
            raise PipelineError(f"cpus per worker must be > 0, got {cpus_per_worker}")
        if max_retries < 0:
            raise PipelineError(f"--max-retries must be >= 0, got {max_retries}")
        if workers is not None and workers < 1:
            raise PipelineError(f"--workers must be >= 1, got {workers}")
        self.address = None if address in (None, "", "local") else address
        self.gpus_per_worker = gpus_per_worker
        self.cpus_per_worker = cpus_per_worker
        self.workers = workers
        self.max_retries = max_retries
        self.init_kwargs = dict(init_kwargs or {})
        self.log_dir = log_dir
        self.attempts: dict[str, int] = {}  #: per case id: attempts whose worker died (for tests and logs)
        self.last_error: dict[str, str] = {}  #: per case id: Ray's message of the last lost worker

    def device_type(self, work: Any) -> str | None:
        """The device type of the workers (``cuda`` with a GPU share, ``cpu`` without; None: decided by the cluster)."""
        if self.gpus_per_worker is None:
            return None
        return "cuda" if self.gpus_per_worker > 0 else "cpu"

    # ------------------------------------------------------------------------------------------- connection
    def _connect(self) -> bool:
        """Start/join Ray unless this process is already connected; True if this call connected."""
        if ray.is_initialized():
            return False
        # Ray's own driver-side messages follow medcam's verbosity (--quiet: errors only)
        level = max(logging.INFO, logging.getLogger("medcam").getEffectiveLevel())
        kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": level, **self.init_kwargs}
        if self.address and self.address.startswith("ray://"):
            kwargs.pop("include_dashboard", None)
        try:
            ray.init(address=self.address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = self.address or "a local instance"
            raise PipelineError(f"cannot start or join Ray at {where}: {' '.join(str(e).split())}") from e
        return True

    def _plan(self, n_cases: int) -> tuple[int, float]:
        res = ray.cluster_resources()
        gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 0))
        gpw = self.gpus_per_worker if self.gpus_per_worker is not None else (1.0 if gpus > 0 else 0.0)
        if self.workers is not None:
            n = self.workers
        elif gpw > 0:
            if gpus <= 0:
                raise PipelineError(
                    f"the Ray cluster has no GPU but --gpus-per-worker is {gpw}; use --gpus-per-worker 0 for CPU workers"
                )
            n = math.floor(gpus / gpw + 1e-9)
        else:
            n = math.floor(cpus / self.cpus_per_worker + 1e-9)
        n = max(1, min(n, n_cases))
        return n, gpw

    # ------------------------------------------------------------------------------------------------ run
    def run(self, work: CaseWork, sources: Sequence[Any], on_record: Callable[[Record], None]) -> None:
        """Run ``work.run_case`` for every source on Ray workers; ``on_record`` gets each record on the driver."""
        if not sources:
            return
        started = self._connect()
        actors: dict[int, Any] = {}
        inflight: dict[Any, tuple[int, Any]] = {}
        try:
            n, gpw = self._plan(len(sources))
            log_dir = self.log_dir if self.log_dir is not None else getattr(work, "log_dir", None)
            remote_cls = ray.remote(_CaseWorker).options(
                num_cpus=self.cpus_per_worker, num_gpus=gpw, max_restarts=0, max_task_retries=0
            )
            work_ref = ray.put(work)
            threads = max(1, int(self.cpus_per_worker))

            def new_actor(slot: int) -> Any:
                return remote_cls.remote(work_ref, slot, None if log_dir is None else str(log_dir), threads)

            logger.info(
                "Ray: %d worker(s), %s GPU and %s CPU each, %d case(s)", n, gpw, self.cpus_per_worker, len(sources)
            )
            actors = {slot: new_actor(slot) for slot in range(n)}
            next_slot = n
            queue = deque(sorted(sources, key=lambda s: -work.cost(s)))  # stable: ties keep the cohort order
            idle = deque(actors)
            self.attempts = {}
            while queue or inflight:
                while idle and queue:
                    slot = idle.popleft()
                    src = queue.popleft()
                    inflight[actors[slot].run.remote(src)] = (slot, src)
                done, _ = ray.wait(list(inflight), num_returns=1)
                for ref in done:
                    slot, src = inflight.pop(ref)
                    rec = self._collect(ref, work, src)
                    if rec is None:  # worker lost: replace it, retry the case unless it has used its retries
                        ray.kill(actors.pop(slot), no_restart=True)
                        actors[next_slot] = new_actor(next_slot)
                        slot, next_slot = next_slot, next_slot + 1
                        cid = _case_id(src)
                        if self.attempts[cid] <= self.max_retries:
                            queue.appendleft(src)
                        else:
                            rec = work.failed_record(
                                src,
                                f"WorkerDied: the worker process died {self.attempts[cid]} time(s) while doing this "
                                f"case (killed, out of memory or node lost); gave up after --max-retries "
                                f"{self.max_retries} (last: {self.last_error.get(cid, '?')})",
                            )
                    idle.append(slot)
                    if rec is not None:
                        on_record(rec)
                        if rec.get("stop"):  # the disk is full: no further case is handed out
                            queue.clear()
        finally:
            for actor in actors.values():
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            if inflight:  # interrupted: let the killed workers go, then remove their staging folders
                try:
                    ray.wait(list(inflight), num_returns=len(inflight), timeout=10)
                except BaseException:  # noqa: BLE001 - best effort while stopping
                    pass
                for _, src in inflight.values():
                    work.discard_partial(src)
            if started:
                ray.shutdown()

    def _collect(self, ref: Any, work: CaseWork, src: Any) -> Record | None:
        """The case's record, or None if its worker died (``self.attempts`` counts it, staging removed)."""
        try:
            return ray.get(ref)
        except _WORKER_LOST as e:
            if getattr(e, "actor_init_failed", False):  # the worker never started: no case can run there
                raise PipelineError(
                    f"a Ray worker could not start (setting up the model failed): {' '.join(str(e).split())[:800]}"
                    " - is medcam (and the model's code) installed on every node in the same version?"
                ) from None
            cid = _case_id(src)
            self.attempts[cid] = self.attempts.get(cid, 0) + 1
            logger.warning(
                "case %s: its worker died (%s), attempt %d of %d",
                cid,
                type(e).__name__,
                self.attempts[cid],
                self.max_retries + 1,
            )
            self.last_error[cid] = " ".join(str(e).split())[:300]
            work.discard_partial(src)
            return None
        except rex.RayTaskError as e:  # an error outside the case's own try (e.g. a result Ray cannot return)
            cause = e.cause if getattr(e, "cause", None) is not None else e
            return work.failed_record(src, f"{type(cause).__name__}: {' '.join(str(cause).split())[:500]}")


def _case_id(src: Any) -> str:
    return str(getattr(src, "case_id", src))
