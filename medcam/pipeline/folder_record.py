"""``cohort_summary.json``: the record of every case of an output folder, whichever run or part did it (issue 30).

Each run merges its records into the folder's ``cohort_summary.json`` under the summary's lock
(:mod:`medcam.pipeline.locks`), read-modify-written atomically, so that two runs (or the parts of a split run)
writing to one folder never lose each other's cases. Per case it keeps the LAST outcome:

* ``status``: ``ok`` (its folder holds its maps) or ``failed`` (``error``); a case a later run found done keeps its
  ``ok`` (with ``checked`` = when it was found done), so a resume does not turn the folder into "skipped" cases;
* ``when`` (UTC, ISO 8601), ``settings_signature`` (which settings made it), ``run`` (host, pid, part);
* ``numerics`` of the case (threads, device; :mod:`medcam.pipeline.numerics`); the folder's ``numerics_mixed``
  lists the distinct ones when the cases were made with different numerics (a warning is logged).

The counts ``ok``/``failed`` count the folder's cases; ``last_run`` is the run summary of the run that wrote it
last (its own ``ok``/``skipped``/``failed`` and records). ``medcam report`` reads this file.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .common import _jsonable
from .locks import FileLock, host_name, lock_path
from .resume import read_summary

logger = logging.getLogger(__package__)

__all__ = ["FOLDER_SUMMARY", "merge_folder_record", "read_folder_record"]

FOLDER_SUMMARY = "cohort_summary.json"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_folder_record(out_dir: Path) -> dict[str, Any] | None:
    """The folder's record (None if absent, unreadable, or a run summary of an older medcam)."""
    try:
        data = json.loads((Path(out_dir) / FOLDER_SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("record") == "folder" else None


def _entry(rec: Mapping[str, Any], previous: Mapping[str, Any] | None, case_root: Path, run: dict[str, Any]) -> Any:
    """The folder's entry for one case after this run's record ``rec`` (None: leave the previous one)."""
    if rec.get("elsewhere"):
        return None  # another run does it and records it
    summary = read_summary(case_root / rec["case_id"]) if rec["status"] != "failed" else None
    if rec["status"] == "skipped" and previous is not None and previous.get("status") == "ok":
        return {**previous, "checked": _now()}
    entry = {k: v for k, v in rec.items() if k not in ("stop",)}
    entry.update(when=_now(), run=run)
    if rec["status"] == "skipped":
        entry.update(status="ok", checked=entry["when"])
    if summary is not None:
        entry.update(settings_signature=summary.get("settings_signature"), numerics=summary.get("numerics"))
    return entry


def merge_folder_record(
    out_dir: Path, case_root: Path, run: dict[str, Any], order: Sequence[str], wait_s: float = 120.0
) -> Path:
    """Merge the run summary ``run`` into ``out_dir/cohort_summary.json`` under its lock; returns its path.

    Args:
        case_root: where the case folders are (their ``summary.json`` give settings and numerics).
        order: the cohort's case ids (cases the record already lists keep their place, new ones follow in this
            order).
        wait_s: how long to wait for another run holding the summary's lock.
    """
    from ..io import write_text_atomic

    path = out_dir / FOLDER_SUMMARY
    lock = FileLock(lock_path(out_dir, FOLDER_SUMMARY))
    if not lock.acquire(wait_s=wait_s):
        logger.warning("%s is locked by another run for %.0f s: merged without its lock", path, wait_s)
    try:
        old = read_folder_record(out_dir) or {}
        entries = {str(e["case_id"]): e for e in old.get("cases", []) if isinstance(e, dict) and "case_id" in e}
        who = {"host": host_name(), "pid": os.getpid(), "part": f"{run['part_id']} of {run['num_parts']}"}
        for rec in run["cases"]:
            new = _entry(rec, entries.get(rec["case_id"]), case_root, who)
            if new is not None:
                entries[rec["case_id"]] = new
        known = [str(c) for c in old.get("order", [])] + [str(e["case_id"]) for e in old.get("cases", [])]
        merged = list(dict.fromkeys([*known, *order]))  # the cohort order of earlier runs first
        rank = {cid: i for i, cid in enumerate(merged)}
        cases = sorted(entries.values(), key=lambda e: (rank.get(e["case_id"], len(rank)), e["case_id"]))
        record = {**_folder_record(out_dir, cases, run), "order": merged}
        write_text_atomic(path, json.dumps(_jsonable(record), indent=2) + "\n", overwrite=True)
    finally:
        lock.release()
    return path


def _folder_record(out_dir: Path, cases: list[dict[str, Any]], run: Mapping[str, Any]) -> dict[str, Any]:
    kinds = {json.dumps(c.get("numerics"), sort_keys=True) for c in cases if c.get("numerics")}
    mixed = [json.loads(k) for k in sorted(kinds)] if len(kinds) > 1 else None
    if mixed:
        logger.warning(
            "the cases of %s were computed with different numerics (threads/device/switches): %s", out_dir, mixed
        )
    last = {k: v for k, v in run.items() if k not in ("settings", "versions", "path")}
    return {
        "record": "folder",
        "medcam_version": run["medcam_version"],
        "output": str(out_dir),
        "updated": _now(),
        "cases_total": len(cases),
        "ok": sum(c["status"] == "ok" for c in cases),
        "skipped": 0,
        "failed": sum(c["status"] == "failed" for c in cases),
        "numerics_mixed": mixed,
        "cases": cases,
        "settings": run["settings"],
        "settings_signature": run["settings_signature"],
        "versions": run["versions"],
        "last_run": last,
    }
