"""Cohort bookkeeping: what a finished case was made from, whether a re-run may skip, refuse or redo it.

The resume rule: a case folder ``OUT/<case_id>/`` counts as done only if its ``summary.json`` records the same
inputs and the same settings as the run now asked for, and every output file it records is there with its recorded
size and SHA-256 (:func:`output_record`, :func:`verify_outputs`). Inputs are every file the case is made of (its
images, its label file, a per-case mask), each as resolved path + size + modification time (:func:`fingerprint`).
Settings are the run settings' signature (numerics included: :mod:`medcam.pipeline.numerics`). Then
(:func:`plan_cohort`, one rule and one message for each kind of folder):

* a medcam case folder that is damaged (``summary.json`` unreadable, an output file missing, truncated or modified)
  is redone without asking, and the run's record says why (``redone``);
* a folder medcam did not write is never touched, with or without ``--overwrite`` (:func:`foreign_folder`): that
  case fails, the others run;
* other files under the same case id, the same files since modified, other settings, another device: a conflict.
  Conflicts are collected for every case of the run BEFORE anything is written, so a refused run touches nothing;
  ``--overwrite`` redoes every existing medcam case folder instead.

Staging and leftovers: a case is written into ``OUT/.partial-<pid>@<host>-<hex>-<case_id>`` (under the case's lock,
:mod:`medcam.pipeline.locks`) and renamed into place when complete (:func:`staging_dir`); files are written through
``.tmp-<pid>@<host>-<hex>-<name>`` (:mod:`medcam.io.atomic`). A run killed with SIGKILL (or a power cut, or on
another node) leaves them behind; :func:`remove_leftovers` removes them at the start of the next run (and says which
it keeps: those of live runs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..types import PathLike
from .common import _jsonable
from .errors import PipelineError
from .locks import STALE_AFTER_S, holder_alive, host_name, lock_path, pid_alive, read_lock

logger = logging.getLogger(__package__)

SUMMARY_NAME = "summary.json"

__all__ = [
    "case_input_files",
    "fingerprint",
    "plan_cohort",
    "check_writable",
    "staging_dir",
    "remove_stale_staging",
    "remove_leftovers",
    "output_record",
    "verify_outputs",
    "summary_state",
    "foreign_folder",
    "read_summary",
    "SUMMARY_NAME",
]


def summary_state(case_dir: PathLike) -> str:
    """``"ok"`` (a medcam ``summary.json``), ``"damaged"`` (a ``summary.json`` that cannot be read as JSON: medcam
    writes it last, so the folder is medcam's and was damaged since), ``"absent"`` (no ``summary.json``) or
    ``"foreign"`` (a readable JSON that medcam did not write)."""
    p = Path(case_dir) / SUMMARY_NAME
    if not p.is_file():
        return "absent"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "damaged"
    return "ok" if isinstance(data, dict) and "medcam_version" in data else "foreign"


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def output_record(folder: PathLike) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size": bytes, "sha256": hex}}`` of every file under a case folder but its
    ``summary.json`` (which records it), as written into the summary and verified on resume."""
    folder = Path(folder)
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        if rel != SUMMARY_NAME:
            out[rel] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    return out


def verify_outputs(case_dir: Path, previous: Mapping[str, Any]) -> str | None:
    """Why a finished case folder's files are not those its summary recorded (None: every file is there with its
    recorded size and checksum)."""
    recorded = previous.get("outputs")
    if not isinstance(recorded, Mapping):
        return "its summary.json records no output checksums (written by an older medcam)"
    for rel, want in recorded.items():
        f = case_dir / rel
        if not f.is_file():
            return f"its file {rel} is missing"
        if f.stat().st_size != want.get("size"):
            return f"its file {rel} has {f.stat().st_size} bytes, {want.get('size')} were written"
        if _sha256(f) != want.get("sha256"):
            return f"its file {rel} was modified since it was written (checksum differs)"
    return None


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
    if _paths(old) != _paths(inputs) and sorted(set(_paths(old).values()) & set(_paths(inputs).values())):
        gone = sorted(set(_paths(old).values()) - set(_paths(inputs).values()))
        new = sorted(set(_paths(inputs).values()) - set(_paths(old).values()))
        what = "; ".join(
            ([f"this run adds {', '.join(Path(p).name for p in new)}"] if new else [])
            + ([f"it was made with {', '.join(Path(p).name for p in gone)} too"] if gone else [])
        )
        return f"case '{case_dir.name}' was explained from other files ({what or 'roles differ'})"
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


def foreign_folder(case_dir: Path) -> str:
    """The one message for a case folder medcam did not write (with or without ``--overwrite``)."""
    return (
        f"'{case_dir}' exists and was not written by medcam (it holds no medcam summary.json); medcam never replaces "
        "a folder it did not write, with or without --overwrite: move it away or choose another --output"
    )


def _plan_one(
    case_dir: Path,
    inputs: Mapping[str, Mapping[str, Any]],
    signature: str,
    overwrite: bool,
    settings: Mapping[str, Any] | None,
    device: str | None,
) -> tuple[str, str | None]:
    """(plan, reason) of one case folder; plan ``"conflict"`` carries the conflict as its reason."""
    if not case_dir.exists():
        return "todo", None
    state = summary_state(case_dir)
    if state in ("absent", "foreign"):
        return "foreign", foreign_folder(case_dir)
    if state == "damaged":
        return "redo", "its summary.json is damaged (not readable JSON)"
    if overwrite:
        return "redo", None
    previous = read_summary(case_dir) or {}
    why = case_conflict(case_dir, previous, inputs, signature, settings, device)
    if why is not None:
        return "conflict", why
    damage = verify_outputs(case_dir, previous)
    return ("redo", damage) if damage else ("done", None)


def plan_cohort(
    cases: Sequence[Any],
    out_dir: Path,
    inputs: Mapping[str, Mapping[str, Mapping[str, Any]]],
    signature: str,
    overwrite: bool,
    *,
    settings: Mapping[str, Any] | None = None,
    device: str | None = None,
    reasons: dict[str, str] | None = None,
) -> dict[str, str]:
    """Decide every case before anything is written: ``{case_id: "todo" | "done" | "redo" | "foreign"}``.

    The one rule for existing case folders:

    * ``"done"``: the folder holds this case with these inputs and settings, and every output file has the size and
      checksum its ``summary.json`` recorded (skipped);
    * ``"redo"``: a medcam case folder that is damaged (its ``summary.json`` unreadable, an output file missing,
      truncated or modified) is redone without asking, and said so (``reasons``); with ``overwrite`` every medcam
      case folder is redone;
    * ``"foreign"``: a folder medcam did not write is never touched, with or without ``overwrite``; that case fails
      (:func:`foreign_folder` says so) and the others run;
    * other inputs, other settings, another device (a conflict): without ``overwrite`` the whole run is refused.

    Args:
        reasons: filled with ``{case_id: why}`` for the ``"redo"`` of damaged folders and the ``"foreign"`` ones.

    Raises:
        PipelineError: naming the first conflict and how many there are; nothing has been written.
    """
    plan: dict[str, str] = {}
    conflicts: list[str] = []
    for src in cases:
        what, why = _plan_one(out_dir / src.case_id, inputs[src.case_id], signature, overwrite, settings, device)
        if what == "conflict":
            conflicts.append(str(why))
            continue
        plan[src.case_id] = what
        if why is not None and reasons is not None:
            reasons[src.case_id] = why
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
        probe.write_bytes(bytes(64 * 1024))  # some bytes: a full file system fails here, not after the work
        probe.unlink()
    except OSError as e:
        raise PipelineError(
            f"output folder '{out_dir}' is not writable ({e.strerror or type(e).__name__}); choose another --output "
            "or fix its permissions"
        ) from None


def _host() -> str:
    return host_name()


_STAGING = re.compile(r"^\.partial-(\d+)@([A-Za-z0-9_.]+)-[0-9a-f]{8}-(.+)$")
_LEGACY = re.compile(r"^\.(partial|old)-[0-9a-f]{8}-")
_TMP = re.compile(r"^\.tmp-(?:(\d+)@([A-Za-z0-9_.]+)-)?[0-9a-f]{12}-")
_PROBE = re.compile(r"^\.medcam-write-test-(\d+)-")


def staging_dir(final: Path) -> Path:
    """The hidden staging folder for ``final`` (``.partial-<pid>@<host>-<hex>-<name>`` beside it)."""
    return final.parent / f".partial-{os.getpid()}@{_host()}-{uuid.uuid4().hex[:8]}-{final.name}"


def _alive(pid: int) -> bool:
    return pid_alive(pid)


def _case_lock_alive(out_dir: Path, case_id: str) -> bool:
    holder, mtime = read_lock(lock_path(out_dir, case_id))
    return holder is not None and mtime is not None and holder_alive(holder, mtime)


def _old(path: Path) -> bool:
    """Older than the lock stale time (a writer that left it is gone)."""
    try:
        return time.time() - path.lstat().st_mtime > float(os.environ.get("MEDCAM_LOCK_STALE_S", STALE_AFTER_S))
    except OSError:
        return False


def _leftover(d: Path, out_dir: Path, host: str) -> tuple[bool, str]:
    """(stale?, what it is) for one hidden entry medcam may have left in ``out_dir``."""
    name = d.name
    m = _STAGING.match(name)
    if m is not None:
        if m.group(2) == host:
            return not _alive(int(m.group(1))), f"staging folder of process {m.group(1)}"
        # another host: dead when no live run holds the case's lock (staging folders exist only under it)
        return not _case_lock_alive(out_dir, m.group(3)), f"staging folder of process {m.group(1)} on {m.group(2)}"
    if _LEGACY.match(name):
        return True, "staging folder of an older medcam"
    t = _TMP.match(name)
    if t is not None:
        if t.group(1) is not None and t.group(2) == host:
            return not _alive(int(t.group(1))), f"temporary file of process {t.group(1)}"
        return _old(d), "temporary file of a write elsewhere (kept while younger than the lock stale time)"
    p = _PROBE.match(name)
    if p is not None:
        return not _alive(int(p.group(1))) or _old(d), "write probe"
    if name.startswith(".lock-") and ".stale-" in name:
        return _old(d), "lock taken over"
    if name.startswith(".lock-"):
        holder, mtime = read_lock(d)
        return holder is not None and mtime is not None and not holder_alive(holder, mtime), "lock"
    return False, ""


def remove_leftovers(out_dir: Path) -> list[Path]:
    """Remove what killed runs left in ``out_dir`` (issue 30): staging folders (``.partial-*``) of dead processes of
    this host, and of other hosts when no live run holds the case's lock (a run killed on another node); temporary
    files of interrupted atomic writes (``.tmp-*``: of dead processes of this host, or older than the lock stale
    time); write probes; stale lock files. What is kept (a live run's staging folder, a recent temporary file of
    another host) is logged with the reason.

    Returns:
        the removed paths.
    """
    removed: list[Path] = []
    if not out_dir.is_dir():
        return removed
    host = _host()
    for d in sorted(out_dir.iterdir()):
        if not d.name.startswith("."):
            continue
        stale, what = _leftover(d, out_dir, host)
        if not what:
            continue
        if not stale:
            logger.info("kept %s (%s, still in use)", d, what)
            continue
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)
        else:
            d.unlink(missing_ok=True)
        removed.append(d)
        logger.info("removed %s (%s), left by an interrupted run", d, what)
    return removed


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Alias of :func:`remove_leftovers` (its older, narrower name)."""
    return remove_leftovers(out_dir)


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
