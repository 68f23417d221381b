"""Stopping a cohort cleanly: SIGTERM (what cluster schedulers send before killing a job) handled like Ctrl-C.

Inside :func:`stop_on_signals` a SIGTERM raises :class:`Interrupted` (a ``KeyboardInterrupt``) in the main thread,
as SIGINT does. The case being computed is abandoned: its staging folder is removed on the way out (the ``finally``
of :func:`medcam.pipeline.explain_case`), finished cases stay, and the next run resumes. The command line turns it
into one line and the shell's exit status for a signal, ``128 + signum`` (130 for SIGINT, 143 for SIGTERM).

The previous handlers are restored on exit: only the ``medcam`` command installs this, for its own process (a library
call changes no process-global state).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["Interrupted", "stop_on_signals", "exit_status"]


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def exit_status(exc: BaseException) -> int:
    """``128 + signum`` for an interruption (SIGINT when unknown): 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`Interrupted` while the block runs (main thread only; else a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
