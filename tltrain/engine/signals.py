"""Preemption: SIGUSR2 (SLURM's warning signal, also submitit's) or SIGTERM asks the run to stop cleanly.

The handler only sets a flag; the trainer checks it at the next optimizer-step boundary, all ranks OR their
flags (so they stop at the same step), write a checkpoint and exit with PREEMPTED_EXIT_CODE, which a requeue
wrapper recognises as "resume me" rather than "failed".
"""
from __future__ import annotations

import signal
import threading

#: Exit code of a run stopped by preemption after checkpointing (EX_TEMPFAIL from sysexits.h: "try again later").
PREEMPTED_EXIT_CODE = 75
#: Exit code of a run stopped because the loss became NaN/inf.
NONFINITE_EXIT_CODE = 3

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; carries the exit code for the entry point."""

    exit_code = PREEMPTED_EXIT_CODE


class StopRequest:
    """Installs handlers for SIGUSR2/SIGTERM (main thread only) and restores the previous ones on close()."""

    def __init__(self, signals=STOP_SIGNALS):
        self.requested: int | None = None  # the signal number received
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = signum

    @property
    def is_set(self) -> bool:
        return self.requested is not None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
