"""`python tests/signal_run.py SIGNAL N OVERRIDES...`: one `train_from_overrides` run that sends itself SIGNAL
(KILL, USR2, TERM, or none) while its training loader hands out its N-th batch, counted over the whole run;
`USR2-after` sends USR2 just after the N-th batch was handed out (when the trainer first reads it).

The resume tests use it to stop a real run at a chosen step: SIGKILL kills the process there (the run resumes
from its last checkpoint); SIGUSR2 is SLURM's preemption warning: during the fetch it interrupts the data wait
(the run checkpoints step N-1 and exits 75), after it the step completes (checkpoint of step N).
Nothing in tltrain knows about this: the real loader is wrapped from outside, the signal is a real one.
"""
from __future__ import annotations

import os
import signal
import sys


class _SignalOnFirstRead:
    """A batch that sends the signal when the trainer first reads one of its fields (after the fetch)."""

    def __init__(self, batch, sig: int):
        self._batch, self._sig = batch, sig

    def __getattr__(self, name):
        if self._sig is not None:
            sig, self._sig = self._sig, None
            os.kill(os.getpid(), sig)
        return getattr(self._batch, name)


class SignallingLoader:
    """The real training loader; fetching batch number `at` (1-based, over all epochs) sends the signal."""

    def __init__(self, loader, sig: int, at: int, after: bool = False):
        self.loader, self.sig, self.at, self.count, self.after = loader, sig, at, 0, after

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.count += 1
            if self.count == self.at and self.after:
                batch = _SignalOnFirstRead(batch, self.sig)
            elif self.count == self.at:
                os.kill(os.getpid(), self.sig)
            yield batch


def main(argv: list[str]) -> int:
    name, at, overrides = argv[0], int(argv[1]), argv[2:]
    import tltrain.data.loaders as loaders
    from tltrain.train_app import train_from_overrides

    if name != "none":
        real = loaders.build_loader
        after = name.endswith("-after")
        sig = getattr(signal, f"SIG{name.removesuffix('-after')}")

        def build_loader(cfg, shard_dir, split, *, train, **kwargs):
            loader = real(cfg, shard_dir, split, train=train, **kwargs)
            return SignallingLoader(loader, sig, at, after) if train else loader

        loaders.build_loader = build_loader  # runner.run_transfer imports it from the module when it runs
    return int(train_from_overrides(overrides)["exit_code"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
