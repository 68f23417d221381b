"""The cohort loop, in one place: parts, resume, locks, staged case folders, failure records, the folder's record.

Used by ``medcam explain`` (:func:`medcam.pipeline.explain_cohort`) and ``medcam evaluate``
(:func:`medcam.pipeline.evaluate_files`). What a case *is* comes from the caller as a :data:`CaseWork` function
``work(source, staging_dir) -> summary``; this module decides whether to run it, where, and what is recorded:

* :func:`process_case` handles ONE case and returns its record; it is the unit another executor (a Ray actor, a job
  array) calls: it needs only the source, the case folder and the work function.
* The resume rule (:mod:`medcam.pipeline.resume`): a case folder whose ``summary.json`` records the same input
  files, the same settings and whose output files still have their recorded sizes and checksums is skipped; a
  damaged medcam case folder is redone (said so); a folder medcam did not write fails that case and is never
  touched; other inputs or settings refuse the whole run BEFORE anything is written
  (:func:`~medcam.pipeline.resume.plan_cohort`); ``overwrite=True`` redoes every medcam case folder.
* Before the first case: the output folder is checked writable (a 64 KiB probe), leftovers of killed runs are
  removed (:func:`~medcam.pipeline.resume.remove_leftovers`) and the free space is compared with the size of a case
  (:mod:`medcam.pipeline.space`).
* Each case runs under its lock (:mod:`medcam.pipeline.locks`: a second run into the same folder skips the cases in
  progress elsewhere) and with the run's numerics (:mod:`medcam.pipeline.numerics`: same maps wherever it runs).
* A case is written into a hidden staging folder beside its final place and moved there when complete
  (:func:`staged_case_dir`), so an interrupted run leaves only complete case folders. A ``KeyboardInterrupt``
  (Ctrl-C; SIGTERM under :func:`medcam.signals.stop_on_signals`) abandons the current case and propagates.
* A failing case is recorded (``status="failed"``, ``error``) and the loop goes on; nothing of it stays on disk. A
  full disk (``ENOSPC``) stops the loop: the remaining cases are recorded as not attempted, the summary is written.
* :func:`run_cohort` decides on the driver which of this part's cases are done (resume), hands the others to an
  executor (:mod:`medcam.pipeline.executors`: this process, or Ray workers with ``executor="ray"``) as one
  :class:`CohortJob` (picklable; :meth:`CohortJob.run_case` is :func:`process_case`), and merges the records into
  the folder's record ``cohort_summary.json`` (:mod:`medcam.pipeline.folder_record`; a split run also writes its
  own ``cohort_summary.part<i>-of-<N>.json``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..types import PathLike
from .cases import CaseSource, split_parts
from .common import _jsonable
from .errors import PipelineError
from .executors import Executor, input_bytes, resolve_executor, work_device
from .folder_record import merge_folder_record
from .locks import FileLock, describe_holder, lock_path, remove_dead_lock
from .numerics import applied, case_numerics, numerics_settings
from .resume import (
    SUMMARY_NAME,
    case_input_files,
    check_writable,
    discard_staging,
    fingerprint,
    foreign_folder,
    output_record,
    plan_cohort,
    read_summary,
    remove_leftovers,
    staging_dir,
    summary_state,
)
from .space import check_free_space, disk_full

__all__ = [
    "CaseWork",
    "CohortJob",
    "SUMMARY_NAME",
    "discard_staging",
    "process_case",
    "run_cohort",
    "source_inputs",
    "staged_case_dir",
    "write_case",
    "read_summary",
    "json_key",
    "settings_signature",
    "versions",
]

logger = logging.getLogger(__package__)

#: ``work(source, staging_dir) -> summary``: do one case, writing its files into ``staging_dir`` (which exists and
#: is empty); the returned summary is written as ``summary.json`` by the loop (with version and settings signature).
#: For an executor with workers (Ray) it must be picklable; it may have ``setup(device) -> work`` (e.g. move its model
#: to the worker's device, once per worker) and ``__getstate__`` (e.g. pickle its model on the CPU).
CaseWork = Callable[[CaseSource, Path], dict[str, Any]]


def versions() -> dict[str, str]:
    """Versions of medcam and the libraries that shape its results."""
    import monai
    import nibabel

    return {
        "medcam": __version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "nibabel": nibabel.__version__,
        "python": platform.python_version(),
    }


#: recorded settings that change how a case is computed but not its results (the graph budget only decides which
#: network calls are recomputed; the maps are identical either way): resume does not compare them
RESULT_NEUTRAL_SETTINGS = ("graph_budget",)


def settings_signature(settings: Mapping[str, Any]) -> str:
    """A short hash of the run settings that decide the results (what resume compares; not
    :data:`RESULT_NEUTRAL_SETTINGS`)."""
    kept = {k: v for k, v in settings.items() if k not in RESULT_NEUTRAL_SETTINGS}
    return hashlib.sha256(json.dumps(_jsonable(kept), sort_keys=True).encode()).hexdigest()[:16]


def json_key(path: PathLike, key: str) -> Any:
    """``json.load(path)[key]`` or None if unreadable/absent."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def _replace_dir(staging: Path, final: Path, overwrite: bool) -> None:
    """Move the finished staging folder onto ``final`` (replacing a previous medcam output only if allowed)."""
    if final.exists():
        if not overwrite:
            raise PipelineError(f"output folder '{final}' already exists; pass --overwrite to replace it")
        if summary_state(final) not in ("ok", "damaged"):
            raise PipelineError(foreign_folder(final))
        old = final.parent / f".old-{uuid.uuid4().hex[:8]}-{final.name}"
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)


@contextlib.contextmanager
def staged_case_dir(final: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A hidden, empty staging folder beside ``final``, moved onto ``final`` when the block completes.

    On error the staging folder is removed and ``final`` is untouched. An existing ``final`` is replaced only with
    ``overwrite`` and only if it is a medcam output folder.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise PipelineError(f"output folder '{final}' already exists; pass --overwrite to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(final)
    staging.mkdir()
    try:
        yield staging
        _replace_dir(staging, final, overwrite)
    except Exception as e:
        full = disk_full(e, final.parent)  # judged before the staging folder is removed (which frees space)
        if full is not None:
            raise full from e
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def write_case(
    work: Callable[[Path], dict[str, Any]],
    case_id: str,
    case_dir: PathLike,
    *,
    settings: Mapping[str, Any],
    overwrite: bool = False,
    inputs: Mapping[str, Any] | None = None,
    device: Any = None,
) -> dict[str, Any]:
    """``work(staging_dir) -> summary`` for one case, then ``summary.json`` (with version, settings signature,
    ``inputs``, the :func:`~medcam.pipeline.resume.fingerprint` of the case's files that the resume rule compares,
    and ``numerics``, the :func:`~medcam.pipeline.numerics.case_numerics` in effect and the ``device`` it ran on)
    into the staging folder, moved to ``case_dir`` when complete; returns the summary written."""
    from ..io import write_text_atomic

    with staged_case_dir(case_dir, overwrite) as staging:
        summary = {
            "medcam_version": __version__,
            "status": "ok",
            "case_id": case_id,
            **work(staging),
            "versions": versions(),
            "settings": _jsonable(dict(settings)),
            "settings_signature": settings_signature(settings),
            "inputs": _jsonable(dict(inputs)) if inputs is not None else None,
            "numerics": case_numerics(device),
            "outputs": output_record(staging),
        }
        write_text_atomic(staging / SUMMARY_NAME, json.dumps(_jsonable(summary), indent=2) + "\n")
    return summary


def source_inputs(src: CaseSource, extra: Sequence[PathLike] = ()) -> dict[str, Any]:
    """:func:`~medcam.pipeline.resume.fingerprint` of every file case ``src`` is made of (plus ``extra`` files, e.g.
    per-case masks); a broken case folder is fingerprinted as the folder (its failure is reported when it is run)."""
    from ..data.loading import MedcamDataError

    try:
        files: Mapping[str, PathLike] = case_input_files(src, extra)
    except MedcamDataError:
        files = {"folder": Path(str(src.source))}
    return fingerprint(files)


def process_case(
    src: CaseSource,
    case_dir: PathLike,
    work: CaseWork,
    *,
    settings: Mapping[str, Any],
    overwrite: bool = False,
    plan: str | None = None,
    inputs: Mapping[str, Any] | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """One case of a cohort: skipped if done, else ``work`` into a staged folder; failures recorded, not raised.

    Args:
        plan: ``"todo" | "done" | "redo" | "foreign"`` as decided by :func:`~medcam.pipeline.resume.plan_cohort`
            for the whole run; None: decided here for this case alone (a conflict is then this case's failure).
        inputs: fingerprint of the case's files (default :func:`source_inputs`), recorded in its summary.
        reason: why a damaged case folder is redone (recorded as ``redone``).

    Returns the record ``{case_id, source, status: ok|skipped|failed, summary | error, seconds}``; a case that
    filled the disk also has ``stop`` (the executor attempts no further case). A ``KeyboardInterrupt`` abandons the
    case (its staging folder removed) and propagates.
    """
    t0 = time.perf_counter()
    case_dir = Path(case_dir)
    rec: dict[str, Any] = {"case_id": src.case_id, "source": src.describe()}
    try:
        if inputs is None:
            inputs = source_inputs(src)
        if plan is None:
            one, why = _Renamed(src, case_dir.name), dict[str, str]()
            plan = plan_cohort(
                [one], case_dir.parent, {one.case_id: inputs}, settings_signature(settings), overwrite,
                settings=settings, reasons=why,
            )[one.case_id]  # fmt: skip
            reason = why.get(one.case_id, reason)
        if plan == "foreign":
            raise PipelineError(foreign_folder(case_dir))
        if reason is not None and plan == "redo":
            rec["redone"] = reason
            logger.warning("case %s: %s; redoing it", src.case_id, reason)
        if plan == "done":
            rec.update(status="skipped")
            logger.info("case %s already done (same inputs and settings): skipped", src.case_id)
        else:
            write_case(
                lambda staging: work(src, staging),
                src.case_id,
                case_dir,
                settings=settings,
                overwrite=plan == "redo",
                inputs=inputs,
                device=work_device(work),
            )
            rec.update(status="ok")
        rec["summary"] = f"{case_dir.name}/{SUMMARY_NAME}"
    except Exception as e:  # noqa: BLE001 - one bad case must not stop a cohort: recorded with its error
        full = disk_full(e, case_dir)
        if full is not None:  # the disk is full: no further case can be written either
            e = full
            rec["stop"] = str(full)
        msg = " ".join(str(e).split()) or type(e).__name__
        rec.update(status="failed", error=f"{type(e).__name__}: {msg}")
        logger.error("case %s failed: %s", src.case_id, msg)
        logger.debug("traceback of case %s", src.case_id, exc_info=True)
    except KeyboardInterrupt:
        logger.debug("case %s abandoned (interrupted)", src.case_id)
        raise
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


@dataclass
class CohortJob:
    """The per-case job of :func:`run_cohort` as an executor gets it (picklable, shipped once to each worker).

    :meth:`run_case` is :func:`process_case` (staged case folder, failure record), wherever it runs.
    """

    work: CaseWork
    root: Path
    settings: Mapping[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    log_root: Path | None = None
    #: ``{case_id: "todo" | "redo"}`` decided by :func:`~medcam.pipeline.resume.plan_cohort` on the driver
    plans: Mapping[str, str] = field(default_factory=dict)
    #: ``{case_id: fingerprint}`` of each case's input files, recorded in its summary
    inputs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: ``{case_id: why}``: why a damaged case folder is redone, or a folder is not medcam's
    reasons: Mapping[str, str] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        """Where workers of a distributed executor write their logs (``OUT/logs``)."""
        return self.log_root if self.log_root is not None else self.root / "logs"

    def setup(self, device: str | None = None) -> CohortJob:
        """The job on this worker: the work's own ``setup(device)`` if it has one."""
        setup = getattr(self.work, "setup", None)
        if setup is None:
            return self
        return replace(self, work=setup(device))

    def run_case(self, src: CaseSource) -> dict[str, Any]:
        """:func:`process_case` under the case's lock (:mod:`medcam.pipeline.locks`), with the run's numerics
        (``settings["numerics"]``: torch threads, deterministic switches) in effect, here or on a worker alike, and
        this process's own restored afterwards.

        A case whose lock a live run holds (another process, another node) is skipped, its record saying where it
        runs. Under the lock the case is decided again when its folder changed since the plan (another run
        finished or redid it meanwhile)."""
        lock = FileLock(lock_path(self.root, src.case_id))
        if not lock.acquire():
            where = describe_holder(lock.holder)
            logger.warning("case %s is being done by %s: skipped here", src.case_id, where)
            return {
                "case_id": src.case_id, "source": src.describe(), "status": "skipped", "seconds": 0.0,
                "elsewhere": f"in progress in {where}",
            }  # fmt: skip
        try:
            plan = self.plans.get(src.case_id)
            if not self.overwrite and plan in ("todo", "redo") and self._changed(src.case_id, plan):
                plan = None  # decided again, under the lock
            with applied(self.settings.get("numerics")):
                return process_case(
                    src,
                    self.root / src.case_id,
                    self.work,
                    settings=self.settings,
                    overwrite=self.overwrite,
                    plan=plan,
                    inputs=self.inputs.get(src.case_id),
                    reason=self.reasons.get(src.case_id),
                )
        finally:
            lock.release()

    def _changed(self, case_id: str, plan: str) -> bool:
        """Whether the case folder changed since the plan: it appeared (``todo``), or it holds a summary other than
        the damaged one planned for (``redo``: another run may have redone it)."""
        case_dir = self.root / case_id
        if plan == "todo":
            return case_dir.exists()
        return summary_state(case_dir) == "ok" and "summary.json" not in self.reasons.get(case_id, "")

    def failed_record(self, src: CaseSource, error: str) -> dict[str, Any]:
        return {"case_id": src.case_id, "source": src.describe(), "status": "failed", "error": error, "seconds": 0.0}

    def discard_partial(self, src: CaseSource) -> None:
        """Remove the staging folders of a killed attempt at ``src`` and its lock once its holder is dead (Ray may
        report a worker's death before its process has exited: waited for up to 10 s, then left to the next run's
        stale-lock clean-up)."""
        discard_staging(self.root, src.case_id)
        path, deadline = lock_path(self.root, src.case_id), time.monotonic() + 10.0
        while not remove_dead_lock(path) and path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)

    def cost(self, src: CaseSource) -> float:
        """Bytes of the case's input files (largest cases are scheduled first)."""
        return input_bytes(src)


def with_numerics(settings: Mapping[str, Any], threads: int | None = None) -> dict[str, Any]:
    """``settings`` with the run's ``numerics`` (:func:`~medcam.pipeline.numerics.numerics_settings`): those already
    recorded in ``settings`` unless ``threads`` is given, else the default thread count."""
    out = dict(settings)
    if threads is not None or not isinstance(out.get("numerics"), Mapping):
        out["numerics"] = numerics_settings(threads)
    return out


class _Renamed:
    """A case source seen under the name of its case folder (for :func:`plan_cohort` on one folder)."""

    def __init__(self, src: CaseSource, case_id: str):
        self.source, self.case_id = src, case_id


def run_cohort(
    cases: Sequence[CaseSource],
    work: CaseWork,
    out_dir: PathLike,
    *,
    settings: Mapping[str, Any],
    case_root: PathLike | None = None,
    num_parts: int = 1,
    part_id: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    on_case: Callable[[dict[str, Any]], None] | None = None,
    executor: str | Executor | None = None,
    log_dir: PathLike | None = None,
    inputs: Mapping[str, Mapping[str, Any]] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run ``work`` on this part's cases (one :func:`process_case` each) and write the run summary.

    Every case is planned first (:func:`~medcam.pipeline.resume.plan_cohort`: a conflict refuses the whole run
    before anything is written), then the output folder is checked writable, leftovers of killed runs removed and
    the free space checked against the size of a case (module docstring).

    Args:
        case_root: where the case folders go (``case_root/<case_id>``); default ``out_dir``.
        executor: who does the cases that are not done yet: None/``"local"`` this process, one after the other;
            ``"ray"`` a Ray cluster with the defaults of ``RayExecutor``; or an executor object (e.g.
            ``RayExecutor("auto", gpus_per_worker=0.5)``). Resume is decided here, before the executor; the
            records are in cohort order whoever ran the cases.
        log_dir: the workers' log folder of a distributed executor (default ``out_dir/logs``).
        inputs: ``{case_id: fingerprint}`` of every case's files (default :func:`source_inputs` of each case).
        threads: torch intra-op threads of every case, wherever it runs (default: ``settings["numerics"]`` if
            recorded there, else :data:`~medcam.pipeline.numerics.DEFAULT_THREADS`); recorded in the settings
            with the deterministic switches (:mod:`medcam.pipeline.numerics`), so resume never mixes numerics.
    Returns:
        The run summary: ``cases`` [records], counts ``ok``/``skipped``/``failed`` (``stopped``: why the run
        stopped early, a full disk). It is merged into the folder's record ``out_dir/cohort_summary.json``
        (:mod:`medcam.pipeline.folder_record`, its ``last_run``) and, for a split run, also written as
        ``cohort_summary.part<i>-of-<N>.json``; ``path`` names that file.
    """
    from ..io import write_text_atomic

    out_dir = Path(out_dir)
    root = Path(case_root) if case_root is not None else out_dir
    mine = split_parts(cases, num_parts, part_id)
    run_path = _run_summary_path(out_dir, num_parts, part_id)
    settings = with_numerics(settings, threads)
    # everything decided before anything is written: a refused run touches nothing
    fps = {src.case_id: (inputs or {}).get(src.case_id) or source_inputs(src) for src in mine}
    runner = resolve_executor(executor)
    device = getattr(runner, "device_type", lambda w: None)(work)
    reasons: dict[str, str] = {}
    plan = plan_cohort(
        mine, root, fps, settings_signature(settings), overwrite, settings=settings, device=device, reasons=reasons
    )
    for folder in dict.fromkeys([out_dir, root]):
        check_writable(folder)
        remove_leftovers(folder)
    logs = Path(log_dir) if log_dir is not None else out_dir / "logs"
    job = CohortJob(work, root, dict(settings), overwrite, logs, plan, fps, reasons)
    recorder = _Recorder(len(mine), progress, on_case)
    todo = _record_done_cases(mine, plan, recorder)
    if todo:
        check_free_space(root, _case_bytes(mine, plan, root, job))
    try:
        if todo:
            runner.run(job, todo, recorder)
    finally:
        recorder.close()
    records = [recorder.by_id.get(src.case_id) or _not_attempted(src, recorder.stop) for src in mine]
    run = _run_summary(out_dir, num_parts, part_id, len(cases), records, settings)
    if recorder.stop:
        run["stopped"] = recorder.stop
    folder = merge_folder_record(out_dir, root, run, [c.case_id for c in cases])
    if num_parts > 1:
        write_text_atomic(run_path, json.dumps(_jsonable(run), indent=2) + "\n", overwrite=True)
    run["path"] = str(run_path if num_parts > 1 else folder)
    return run


def _not_attempted(src: CaseSource, stop: str | None) -> dict[str, Any]:
    """The record of a case the executor did not attempt (the cohort stopped at a full disk)."""
    why = f"not attempted: {stop}" if stop else "not attempted (the executor returned no record)"
    return {"case_id": src.case_id, "source": src.describe(), "status": "failed", "error": why, "seconds": 0.0}


def _case_bytes(mine: Sequence[CaseSource], plan: Mapping[str, str], root: Path, job: CohortJob) -> int:
    """The expected size of one case's outputs: the largest finished case folder of this folder (from the sizes its
    summary records), else the largest input files of a case still to do (a lower bound)."""
    done = []
    for src in mine:
        if plan.get(src.case_id) == "done":
            outputs = (read_summary(root / src.case_id) or {}).get("outputs") or {}
            done.append(sum(int(v.get("size") or 0) for v in outputs.values()))
    if done:
        return max(done)
    return int(max((job.cost(s) for s in mine if plan.get(s.case_id) != "done"), default=0))


def _run_summary_path(out_dir: Path, num_parts: int, part_id: int) -> Path:
    """``cohort_summary.json`` (``cohort_summary.part<i>-of-<N>.json`` for a split run); one that medcam did not
    write is refused."""
    name = "cohort_summary.json" if num_parts == 1 else f"cohort_summary.part{part_id}-of-{num_parts}.json"
    path = out_dir / name
    if path.exists() and json_key(path, "medcam_version") is None:
        raise PipelineError(f"'{path}' exists and was not written by medcam; refusing to overwrite it")
    return path


class _Recorder:
    """Collects the case records as the executor reports them (any order), with a progress bar over cases."""

    def __init__(self, total: int, progress: bool, on_case: Callable[[dict[str, Any]], None] | None):
        from tqdm.auto import tqdm

        self.by_id: dict[str, dict[str, Any]] = {}
        self.stop: str | None = None  #: why the cohort stopped (a full disk), from a case's record
        self.on_case = on_case
        self.bar = tqdm(total=total, desc="medcam cases", unit="case", disable=not progress or total == 1)

    def __call__(self, rec: dict[str, Any]) -> None:
        self.by_id[rec["case_id"]] = rec
        self.stop = self.stop or rec.get("stop")
        self.bar.update(1)
        self.bar.set_postfix_str(rec["case_id"])
        if self.on_case is not None:
            self.on_case(rec)

    def close(self) -> None:
        self.bar.close()


def _record_done_cases(
    mine: Sequence[CaseSource], plan: Mapping[str, str], record: Callable[[dict[str, Any]], None]
) -> list[CaseSource]:
    """Record the cases already done as skipped; the others, still to do, in cohort order. Resume is decided here,
    on the driver: an executor only gets the cases still to do."""
    todo = []
    for src in mine:
        if plan[src.case_id] != "done":
            todo.append(src)
            continue
        logger.info("case %s already done (same inputs and settings): skipped", src.case_id)
        record(
            {
                "case_id": src.case_id,
                "source": src.describe(),
                "status": "skipped",
                "summary": f"{src.case_id}/{SUMMARY_NAME}",
                "seconds": 0.0,
            }
        )
    return todo


def _run_summary(
    out_dir: Path,
    num_parts: int,
    part_id: int,
    cases_total: int,
    records: list[dict[str, Any]],
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """The run summary: this part's records in cohort order, their counts, the settings and the versions."""
    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "skipped", "failed")}
    return {
        "medcam_version": __version__,
        "output": str(out_dir),
        "num_parts": num_parts,
        "part_id": part_id,
        "cases_total": cases_total,
        "cases_in_part": len(records),
        **counts,
        "cases": records,
        "settings": _jsonable(dict(settings)),
        "settings_signature": settings_signature(settings),
        "versions": versions(),
    }
