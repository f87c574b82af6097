"""One epoch's batches, handed to the training loop one optimizer step at a time.

The feed owns the three things about fetching data that are not training:
- resume: the batches a checkpoint already consumed are read again (set_epoch gives the same order) and dropped;
- stopping: at a check step (checks_before() true: the trainer's every trainer.check_every_steps steps, the same
  on every rank) the wait for the step's first micro-batch can be cut short by a stop signal (a slow file system
  must not outlast SLURM's grace period); then every rank stops before that step's forward (StopBeforeStep), so
  no rank is left waiting in a collective. The state after the previous step is complete, and a resumed run reads
  the abandoned batch again. Between check steps the fetch neither listens for the signal nor asks the other
  ranks anything (no per-step round trip); the trainer's own check after every N-th step sees the signal. The
  micro-batches of one step (grad_accum) are never split by a stop;
- measuring: how long each fetch waited, and a hook after each fetch (the trainer notes skipped samples there).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from tltrain.contracts import Batch, Loader
from tltrain.engine import distributed as D
from tltrain.engine.signals import StopRequest, StopWhileWaiting

#: A micro-batch and the seconds the loop waited for it.
Fetched = tuple[Batch, float]


class StopBeforeStep(Exception):
    """A stop signal came while a rank waited for a step's first micro-batch; every rank raises it together."""


class StepFeed:
    def __init__(self, loader: Loader, batches: int, grad_accum: int, stop: StopRequest,
                 after_fetch: Callable[[], None] = lambda: None, checks_before: Callable[[], bool] = lambda: True):
        """`batches`: how many of the loader's batches the epoch uses (whole optimizer steps only); checks_before():
        whether the next step starts with a stop check (the same answer on every rank)."""
        self.loader, self.batches, self.grad_accum, self.stop = loader, batches, grad_accum, stop
        self.after_fetch, self.checks_before = after_fetch, checks_before

    def steps(self, consumed: int) -> Iterator[Iterator[Fetched]]:
        """The epoch's remaining steps after `consumed` batches, each an iterator over its micro-batches, fetched
        as the loop asks for them (data loading interleaves with compute as in a plain loop)."""
        if consumed >= self.batches:  # a checkpoint on the epoch's last batch: do not even start the loader
            return
        batches = iter(self.loader)
        for _ in range(consumed):
            self._fetch(batches)
        for _ in range(consumed, self.batches, self.grad_accum):
            first = self._fetch(batches, interruptible=self.checks_before())
            yield self._micro_batches(batches, first)

    def _micro_batches(self, batches: Iterator[Batch], first: Fetched) -> Iterator[Fetched]:
        yield first
        for _ in range(self.grad_accum - 1):
            yield self._fetch(batches)

    def _fetch(self, batches: Iterator[Batch], interruptible: bool = False) -> Fetched:
        start = time.perf_counter()
        batch = None  # stays None when a stop signal ended the wait
        try:
            with self.stop.interrupting() if interruptible else contextlib.nullcontext():
                batch = next(batches)
        except StopWhileWaiting:
            pass
        if interruptible and D.any_rank_on_cpu([batch is None])[0]:  # every rank stops before this step
            raise StopBeforeStep()
        waited = time.perf_counter() - start
        self.after_fetch()
        return batch, waited
