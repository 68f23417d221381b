"""Lock files for cohort folders that several runs share (a double-started job array task, parts on other nodes).

A lock is a file created with ``O_CREAT | O_EXCL`` (atomic on local file systems and on NFS v3 and later) that holds
who took it: host, pid, start time and a random token. While it is held a background thread refreshes the file's
modification time every :data:`HEARTBEAT_S` seconds (the heartbeat). Another run finds the lock

* **alive**: the case is being done elsewhere; the run skips it (its record says where it runs);
* **stale**: its holder is a dead process of this host, or its heartbeat is older than :data:`STALE_AFTER_S`
  seconds (a run killed on another node): the lock is taken over (renamed away atomically, then created anew).

``MEDCAM_LOCK_STALE_S`` / ``MEDCAM_LOCK_HEARTBEAT_S`` override the two times (e.g. for clocks that drift apart by
minutes between the nodes of a cluster: raise the stale time above the drift).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

logger = logging.getLogger(__package__)

__all__ = [
    "FileLock",
    "STALE_AFTER_S",
    "HEARTBEAT_S",
    "lock_path",
    "holder_alive",
    "read_lock",
    "remove_dead_lock",
    "describe_holder",
    "host_name",
    "pid_alive",
]

#: a lock whose heartbeat is older than this (seconds) belongs to a dead run
STALE_AFTER_S = 600.0
#: how often a held lock's modification time is refreshed (seconds)
HEARTBEAT_S = 30.0


def _stale_after() -> float:
    return float(os.environ.get("MEDCAM_LOCK_STALE_S", STALE_AFTER_S))


def _heartbeat() -> float:
    return float(os.environ.get("MEDCAM_LOCK_HEARTBEAT_S", HEARTBEAT_S))


def host_name() -> str:
    """This host's name as used in lock files and staging folder names (``[A-Za-z0-9_.]``)."""
    return re.sub(r"[^A-Za-z0-9_.]+", "_", socket.gethostname()) or "host"


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` of this host exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_path(folder: Path, name: str) -> Path:
    """The lock file of ``name`` (a case id, or a summary file's name) in ``folder``: ``folder/.lock-<name>``."""
    return Path(folder) / f".lock-{name}"


def read_lock(path: Path) -> tuple[dict[str, Any] | None, float | None]:
    """(the holder recorded in a lock file, its modification time), (None, None) if it is gone."""
    try:
        mtime = path.stat().st_mtime
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError):  # being written right now, or damaged: judged by its heartbeat alone
        try:
            return {}, path.stat().st_mtime
        except OSError:
            return None, None
    return (data if isinstance(data, dict) else {}), mtime


def holder_alive(holder: dict[str, Any], mtime: float) -> bool:
    """Whether the run that holds a lock (``holder`` as written in the file, heartbeat ``mtime``) still runs."""
    if holder.get("host") == host_name() and isinstance(holder.get("pid"), int):
        return pid_alive(int(holder["pid"]))
    return time.time() - mtime <= _stale_after()


class FileLock:
    """One lock file (module docstring). :meth:`acquire` does not wait unless asked; :meth:`release` removes it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.token = uuid.uuid4().hex
        self.holder: dict[str, Any] | None = None  #: who held it when :meth:`acquire` failed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        info = {"host": host_name(), "pid": os.getpid(), "since": time.time(), "token": self.token}
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(info, fh)
        return True

    def _take_over(self, holder: dict[str, Any]) -> None:
        """Move a stale lock away (atomic rename: of two runs judging it stale, one wins) and remove it."""
        aside = self.path.with_name(f"{self.path.name}.stale-{self.token[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved, _ = read_lock(aside)
        if moved is not None and holder.get("token") and moved.get("token") != holder.get("token"):
            try:  # another run took it over in between: give its fresh lock back
                os.link(aside, self.path)
            except OSError:
                pass
        else:
            logger.warning("took over the stale lock %s of %s", self.path, describe_holder(holder))
        aside.unlink(missing_ok=True)

    def acquire(self, wait_s: float = 0.0) -> bool:
        """Take the lock; a stale one is taken over. Waits up to ``wait_s`` seconds for a live holder.

        Returns False (and :attr:`holder` says who holds it) if a live run holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait_s
        while True:
            if self._create():
                self._start_heartbeat()
                return True
            holder, mtime = read_lock(self.path)
            if holder is None:
                continue  # released in between
            if mtime is not None and not holder_alive(holder, mtime):
                self._take_over(holder)
                continue
            self.holder = holder
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _start_heartbeat(self) -> None:
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(_heartbeat()):
                try:
                    os.utime(self.path)
                except OSError:
                    return

        self._thread = threading.Thread(target=beat, name=f"medcam-lock-{self.path.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file (only if it is still this lock's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        holder, _ = read_lock(self.path)
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def remove_dead_lock(path: Path) -> bool:
    """Remove the lock file ``path`` if the run that holds it is dead (module docstring); True if removed."""
    holder, mtime = read_lock(path)
    if holder is None or mtime is None or holder_alive(holder, mtime):
        return False
    path.unlink(missing_ok=True)
    return True


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another run"
    return f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
