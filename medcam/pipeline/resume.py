"""Cohort bookkeeping: what a finished case was made from, whether a re-run may skip, refuse or redo it.

The resume rule: a case folder ``OUT/<case_id>/`` counts as done only if its ``summary.json`` records the same
inputs and the same settings as the run now asked for. Inputs are every file the case is made of (its images, its
label file, a per-case mask), each as resolved path + size + modification time (:func:`fingerprint`). Settings are
the run settings' signature. Anything else is a conflict:

* other files under the same case id (another patient, or folders whose files share a prefix): an error naming both
  the recorded and the new inputs;
* the same files since modified, or other settings, or a folder medcam did not write: an error saying which.

Conflicts are collected for every case of the run BEFORE anything is written (:func:`plan_cohort`), so a refused
run touches nothing; ``--overwrite`` redoes every existing case instead.

Staging: a case is written into ``OUT/.partial-<pid>@<host>-<hex>-<case_id>`` and renamed into place when complete
(:func:`staging_dir`). A run killed with SIGKILL (or a power cut) leaves its staging folder behind;
:func:`remove_stale_staging` removes those of dead processes of this host at the start of the next run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..types import PathLike
from .common import _jsonable
from .errors import PipelineError

logger = logging.getLogger(__package__)

SUMMARY_NAME = "summary.json"

__all__ = [
    "case_input_files",
    "fingerprint",
    "plan_cohort",
    "check_writable",
    "staging_dir",
    "remove_stale_staging",
    "read_summary",
    "SUMMARY_NAME",
]


def read_summary(case_dir: PathLike) -> dict[str, Any] | None:
    """The ``summary.json`` of a finished case folder, or None if absent/unreadable/not medcam's."""
    p = Path(case_dir) / SUMMARY_NAME
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "medcam_version" in data else None


# ---------------------------------------------------------------------------------------------- inputs of a case
def case_input_files(source: Any, extra: Iterable[str | os.PathLike] = ()) -> dict[str, Path]:
    """Every file a case is made of: ``{role: path}`` (roles ``t1``.. / ``seg`` for BraTS, ``ch0``.. for image
    files, then ``extra`` files such as per-case masks as ``mask0``, ``mask1``, ...).

    Args:
        source: a :class:`~medcam.pipeline.CaseSource`.
        extra: more files the case's explanation reads (per-case target masks).
    """
    files: dict[str, Path] = {}
    if source.kind == "brats_folder":
        from ..data.brats import discover_brats_case

        _, _, paths = discover_brats_case(source.source)
        files.update({k: Path(v) for k, v in paths.items()})
    elif source.kind == "brats_mapping":
        files.update({str(k): Path(v) for k, v in dict(source.source).items()})
    else:
        files.update({f"ch{i}": Path(p) for i, p in enumerate(source.source)})
    for i, p in enumerate(extra):
        files[f"mask{i}"] = Path(p)
    return files


def fingerprint(files: Mapping[str, str | os.PathLike]) -> dict[str, dict[str, Any]]:
    """``{role: {"path": resolved path, "size": bytes, "mtime_ns": int}}``; a missing file has size/mtime None."""
    out: dict[str, dict[str, Any]] = {}
    for role, p in files.items():
        path = Path(p).resolve()
        try:
            st = path.stat()
            size, mtime = int(st.st_size), int(st.st_mtime_ns)
        except OSError:
            size, mtime = None, None
        out[str(role)] = {"path": str(path), "size": size, "mtime_ns": mtime}
    return out


def _paths(fp: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    return {r: str(v.get("path")) for r, v in fp.items()}


def _describe(fp: Mapping[str, Mapping[str, Any]], limit: int = 2) -> str:
    paths = list(_paths(fp).values())
    folders = sorted({str(Path(p).parent) for p in paths})
    if len(folders) == 1:
        names = ", ".join(Path(p).name for p in paths[:limit]) + (", ..." if len(paths) > limit else "")
        return f"{folders[0]}/{{{names}}}"
    return ", ".join(paths[:limit]) + (", ..." if len(paths) > limit else "")


def settings_difference(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The settings that differ between two recorded settings mappings, as ``key: old -> new`` (nested keys
    dotted, e.g. ``numerics.torch_threads: 2 -> 1``)."""
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return [] if old == new else [f"{prefix or 'settings'}: {old!r} -> {new!r}"]
    out: list[str] = []
    for key in sorted(set(old) | set(new), key=str):
        name = f"{prefix}.{key}" if prefix else str(key)
        a, b = old.get(key, "(none)"), new.get(key, "(none)")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += settings_difference(a, b, name)
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def case_conflict(
    case_dir: Path,
    previous: Mapping[str, Any] | None,
    inputs: Mapping[str, Mapping[str, Any]],
    signature: str,
    settings: Mapping[str, Any] | None = None,
    device: str | None = None,
) -> str | None:
    """Why an existing case folder may not be skipped (None: it is done with these inputs and settings).

    Args:
        case_dir: the existing ``OUT/<case_id>`` folder.
        previous: its parsed ``summary.json`` (None: absent or not medcam's).
        inputs: :func:`fingerprint` of the case now asked for.
        signature: the settings signature of this run.
        settings: the settings of this run (to name what differs; optional).
        device: the device type this run computes on (``cpu``/``cuda``), if known: a case computed on another
            device has other maps (float rounding), so it is not mixed into this run's folder.
    """
    if previous is None:
        return f"'{case_dir}' exists and holds no medcam summary.json; refusing to touch it (move it away)"
    old = previous.get("inputs")
    if not isinstance(old, Mapping):
        return (
            f"'{case_dir}' was written without a record of its input files (older medcam), so it cannot be matched "
            "to this case"
        )
    if _paths(old) != _paths(inputs):
        return (
            f"case id '{case_dir.name}' is already used in '{case_dir.parent}' by another case: it was explained "
            f"from {_describe(old)}, this run gives {_describe(inputs)}. Give the cases distinct ids (--case-id, "
            "or the manifest's case_id column), or another --output"
        )
    changed = [
        r for r in inputs if (old[r].get("size"), old[r].get("mtime_ns")) != (inputs[r]["size"], inputs[r]["mtime_ns"])
    ]
    if changed:
        which = ", ".join(Path(inputs[r]["path"]).name for r in changed[:3])
        return f"the input files of case '{case_dir.name}' changed since it was explained ({which}: size or time)"
    if previous.get("settings_signature") != signature:
        diff = settings_difference(_jsonable(previous.get("settings")), _jsonable(dict(settings or {})))
        what = f" ({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''})" if diff and settings else ""
        return f"'{case_dir}' was explained with other settings{what}"
    was = (previous.get("numerics") or {}).get("device") if isinstance(previous.get("numerics"), Mapping) else None
    if device is not None and was is not None and was != device:
        return (
            f"'{case_dir}' was computed on {was}, this run computes on {device} (maps differ in the last bits); "
            "use the same --device to resume this folder"
        )
    return None


def plan_cohort(
    cases: Sequence[Any],
    out_dir: Path,
    inputs: Mapping[str, Mapping[str, Mapping[str, Any]]],
    signature: str,
    overwrite: bool,
    *,
    settings: Mapping[str, Any] | None = None,
    device: str | None = None,
) -> dict[str, str]:
    """Decide every case before anything is written: ``{case_id: "todo" | "done" | "redo"}``.

    ``"done"``: the folder holds this case with these inputs and settings (skipped). ``"redo"``: ``overwrite`` and
    an existing medcam case folder (replaced when the case is finished). Without ``overwrite`` any conflict raises.

    Raises:
        PipelineError: naming the first conflict and how many there are; nothing has been written.
    """
    plan: dict[str, str] = {}
    conflicts: list[str] = []
    for src in cases:
        case_dir = out_dir / src.case_id
        if not case_dir.exists():
            plan[src.case_id] = "todo"
            continue
        previous = read_summary(case_dir)
        if overwrite:
            if previous is None:
                raise PipelineError(
                    f"'{case_dir}' exists and holds no medcam summary.json; --overwrite only replaces folders written "
                    "by medcam (move it away)"
                )
            plan[src.case_id] = "redo"
            continue
        why = case_conflict(case_dir, previous, inputs[src.case_id], signature, settings, device)
        if why is None:
            plan[src.case_id] = "done"
        else:
            conflicts.append(why)
    if conflicts:
        more = f" (and {len(conflicts) - 1} more case(s) like it)" if len(conflicts) > 1 else ""
        raise PipelineError(
            f"{conflicts[0]}{more}. Nothing was run or written; pass --overwrite to redo such cases, or choose "
            "another --output"
        )
    return plan


# ---------------------------------------------------------------------------------------------- the output folder
def check_writable(out_dir: Path) -> None:
    """Create ``out_dir`` if needed and check a file can be created in it, before the first case is computed.

    Raises:
        PipelineError: naming the folder and the reason (not a folder, permission denied, read-only file system).
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".medcam-write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PipelineError(
            f"output folder '{out_dir}' is not writable ({e.strerror or type(e).__name__}); choose another --output "
            "or fix its permissions"
        ) from None


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", socket.gethostname()) or "host"


_STAGING = re.compile(r"^\.partial-(\d+)@([A-Za-z0-9_.]+)-[0-9a-f]{8}-")
_LEGACY = re.compile(r"^\.(partial|old)-[0-9a-f]{8}-")


def staging_dir(final: Path) -> Path:
    """The hidden staging folder for ``final`` (``.partial-<pid>@<host>-<hex>-<name>`` beside it)."""
    return final.parent / f".partial-{os.getpid()}@{_host()}-{uuid.uuid4().hex[:8]}-{final.name}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Remove staging folders left by killed runs: those of dead processes on this host, and unmarked ones of older
    medcam versions. Staging folders of other hosts (a split run sharing the folder) are left alone.

    Returns:
        the removed folders.
    """
    removed: list[Path] = []
    if not out_dir.is_dir():
        return removed
    host = _host()
    for d in out_dir.iterdir():
        if not d.name.startswith((".partial-", ".old-")) or not d.is_dir():
            continue
        m = _STAGING.match(d.name)
        stale = (m is not None and m.group(2) == host and not _alive(int(m.group(1)))) or (
            m is None and _LEGACY.match(d.name) is not None
        )
        if stale:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
            logger.info("removed %s, left by an interrupted run", d)
    return removed


def discard_staging(root: PathLike, case_id: str) -> None:
    """Remove the staging folders a killed attempt at ``case_id`` left in ``root``:
    ``root/.partial-[<pid>@<host>-]<hex8>-<case_id>`` (other cases' folders are left alone)."""
    # the names staging_dir gives (pid@host marked) and those of older versions (unmarked)
    pattern = re.compile(r"^\.partial-(?:\d+@[A-Za-z0-9_.]+-)?[0-9a-f]{8}-" + re.escape(case_id) + "$")
    root = Path(root)
    if not root.is_dir():
        return
    for p in root.glob(".partial-*"):
        if pattern.match(p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
