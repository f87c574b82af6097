"""What a run folder holds, by name, and the one way to record a run's state in it.

Every module that reads or writes a run folder (the trainer, the features+SVM runner, `report`, `jobs`, `export`,
the SLURM wrapper, the demo) takes the file names from here, and a run is marked failed only through
`RunFolder.mark_failed`, which keeps the progress the run recorded before and never replaces the first error
with a wrapper's restatement of it.

Layout:
  config.yaml             the resolved run config (written once, at the start)
  status.json             {"state": running|completed|failed|preempted, "step", "epoch", "error", "pid", "host", ...}
  metrics.json            final/best/test metrics and the per-epoch history (engine/logging.write_metrics)
  predictions_test.csv    per-image predictions of the tested checkpoint
  checkpoints/            index.json + checkpoints (engine/checkpoint.py)
  tb/                     TensorBoard event files
  features/               the frozen-feature cache of features+SVM runs
  weights_report.json     which initial weights matched, were new or mismatched (model.weights=...)
  .tltrain.lock           the lock the live run holds (engine/rundir.py)
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from tltrain.safe_io import MiB, atomic_write_json, load_json_or_empty

#: The states status.json may record.
STATES = ("running", "completed", "failed", "preempted")
#: status.json is a few hundred bytes (its "metrics" copy is the last validation's scalars); never read beyond this
#: (a link to /dev/zero or a huge file there is not read).
STATUS_LIMIT = 4 * MiB
#: metrics.json holds the per-epoch history: a long run has a few hundred KiB of it.
METRICS_LIMIT = 16 * MiB
#: What a failure record keeps of the status before it: how far the run got, and which process it was.
PROGRESS_FIELDS = ("step", "epoch", "total_epochs", "steps_per_epoch", "strategy", "world_size", "pid", "host")


def _entry(name: str) -> property:
    """A read-only attribute: the path of `name` inside the run folder."""
    return property(lambda folder: folder.path / name, doc=f"<run folder>/{name}")


class RunFolder:
    """One run's folder: the paths of its files, and its status record."""

    CONFIG = "config.yaml"
    STATUS = "status.json"
    METRICS = "metrics.json"
    PREDICTIONS_TEST = "predictions_test.csv"
    CHECKPOINTS = "checkpoints"
    TENSORBOARD = "tb"
    FEATURES = "features"
    WEIGHTS_REPORT = "weights_report.json"
    LOCK = ".tltrain.lock"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # -- the files: <folder>/<name> for each name above ---------------------------------------------------------
    config = _entry(CONFIG)
    status = _entry(STATUS)
    metrics = _entry(METRICS)
    predictions_test = _entry(PREDICTIONS_TEST)
    checkpoints = _entry(CHECKPOINTS)
    tensorboard = _entry(TENSORBOARD)
    features = _entry(FEATURES)
    weights_report = _entry(WEIGHTS_REPORT)
    lock = _entry(LOCK)

    # -- the status record ----------------------------------------------------------------------------------
    def read_status(self) -> dict:
        """status.json as an object ({} when absent or not a small regular file holding a JSON object)."""
        return load_json_or_empty(self.status, STATUS_LIMIT, "status file")

    def write_status(self, state: str, **fields) -> None:
        """status.json = state + fields, with the writer's pid and host and the time (a new file renamed in)."""
        if state not in STATES:
            raise ValueError(f"status state {state!r} not in {STATES}")
        atomic_write_json(self.status, {"state": state, "updated": time.time(), "pid": os.getpid(),
                                        "host": socket.gethostname(), **fields})

    def mark_failed(self, error: str, *, keep_first: bool = False, **fields) -> bool:
        """status.json = failed with `error`, keeping how far the run got (PROGRESS_FIELDS of the status before,
        overridden by `fields`). With keep_first, a status that already says failed (the trainer's own, more
        precise error) is left as it is. Best effort: the error being reported matters more than its record, so
        an OSError here (a full disk) is swallowed. Returns whether the record was written."""
        try:
            previous = self.read_status()
            if keep_first and previous.get("state") == "failed":
                return False
            kept = {key: previous[key] for key in PROGRESS_FIELDS if key in previous}
            self.path.mkdir(parents=True, exist_ok=True)
            self.write_status("failed", **{**kept, **fields, "error": error})
            return True
        except OSError:
            return False
