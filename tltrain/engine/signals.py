"""Preemption: SIGUSR2 (SLURM's warning signal, also submitit's) or SIGTERM asks the run to stop cleanly.

The handler only sets a flag; the trainer checks it at the next optimizer-step boundary, all ranks OR their
flags (so they stop at the same step), write a checkpoint and exit with PREEMPTED_EXIT_CODE, which a requeue
wrapper recognises as "resume me" rather than "failed". While a rank waits for its next batch (a slow file
system, workers starting up), the handler instead raises StopWhileWaiting out of the wait (`interrupting()`),
so a long data wait does not outlast SLURM's grace period either.

Start-up: importing torch and building loaders takes seconds, and a signal then would kill the process with the
default action (exit 143/140, no status). `tltrain train` therefore calls install_early() first thing; a signal
received before the trainer listens is remembered, the trainer adopts it, writes status "preempted" and exits
with PREEMPTED_EXIT_CODE before training.
"""
from __future__ import annotations

import contextlib
import signal
import threading

from tltrain.errors import NONFINITE_EXIT_CODE, PREEMPTED_EXIT_CODE  # noqa: F401 (the table lives in errors)

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class StopWhileWaiting(Exception):
    """Raised by the handler out of a blocking wait marked with StopRequest.interrupting()."""


#: A stop signal received by install_early()'s handler while no StopRequest was listening.
_pending: int | None = None


def _remember(signum, frame) -> None:
    global _pending
    _pending = signum


def install_early(signals=STOP_SIGNALS) -> None:
    """Command-line entry points: from now on a stop signal is remembered instead of killing the process."""
    if threading.current_thread() is threading.main_thread():
        for sig in signals:
            signal.signal(sig, _remember)


class StopRequest:
    """Installs handlers for SIGUSR2/SIGTERM (main thread only) and restores the previous ones on close().
    A signal remembered since install_early() counts as received (and is consumed)."""

    def __init__(self, signals=STOP_SIGNALS):
        global _pending
        self.requested: int | None = _pending  # the signal number received
        _pending = None
        self._interrupt = False  # True inside interrupting(): the handler raises StopWhileWaiting
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = signum
        if self._interrupt:
            self._interrupt = False  # raise once: the code that catches it may run on
            raise StopWhileWaiting(signum)

    @property
    def is_set(self) -> bool:
        return self.requested is not None

    @contextlib.contextmanager
    def interrupting(self):
        """Inside this block a stop signal raises StopWhileWaiting (at once if one came already). For waits whose
        abandonment loses nothing: the loader's next batch, read again after a resume."""
        if self.is_set:
            raise StopWhileWaiting(self.requested)
        self._interrupt = True
        try:
            yield
        finally:
            self._interrupt = False

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
