"""What a run writes about itself besides checkpoints, and reads back: status.json, metrics.json and the record of
the best checkpoint. Only the main rank writes; on other ranks the writers do nothing, so callers need no checks.
"""
from __future__ import annotations

from pathlib import Path

from tltrain.engine.checkpoint import CheckpointManager
from tltrain.engine.config import TrainerConfig
from tltrain.engine.logging import write_metrics
from tltrain.engine.state import TrainState
from tltrain.errors import DataError, os_error
from tltrain.run_folder import RunFolder
from tltrain.safe_io import load_json


class RunRecords:
    def __init__(self, run: RunFolder, cfg: TrainerConfig, checkpoints: CheckpointManager, state: TrainState, *,
                 is_main: bool, total_epochs: int, steps_per_epoch: int, world_size: int):
        self.run, self.cfg, self.checkpoints, self.state, self.is_main = run, cfg, checkpoints, state, is_main
        self.shape = {"total_epochs": total_epochs, "steps_per_epoch": steps_per_epoch, "strategy": cfg.strategy,
                      "world_size": world_size}

    # -- status.json ----------------------------------------------------------------------------------------
    def _progress(self) -> dict:
        last = {k: v for k, v in self.state.last_val.items() if k != "confusion"}
        return {"step": self.state.step, "epoch": self.state.epoch, **self.shape, "metrics": last}

    def status(self, state: str, **extra) -> None:
        if self.is_main:
            self.run.write_status(state, **self._progress(), **extra)

    def failed(self, exc: BaseException) -> None:
        if self.is_main:
            self.run.mark_failed(f"{type(exc).__name__}: {exc}", **self._progress())

    # -- metrics.json ---------------------------------------------------------------------------------------
    def history_val(self, step: int) -> dict:
        """The validation metrics recorded at an optimizer step (an epoch end), or {}."""
        return next((h["val"] for h in reversed(self.state.history) if h["step"] == step and h.get("val")), {})

    def best(self) -> dict:
        """Which checkpoint is the best so far, chosen how, and its validation metrics (main rank only)."""
        index = self.checkpoints.index()  # read once: it names the best checkpoint and holds its value
        best = next((c for c in index["checkpoints"] if c["name"] == index.get("best")), None)
        if best is None:
            return {}
        cfg = self.cfg
        return {"checkpoint": best["name"], "metric": cfg.best_metric, "mode": cfg.best_mode,
                "value": index.get("best_value"), "step": best["step"], "epoch": best["epoch"],
                "chosen_by": f"{'highest' if cfg.best_mode == 'max' else 'lowest'} validation {cfg.best_metric}, "
                             "evaluated at every validated epoch end",
                "val": self.history_val(best["step"])}

    def _skipped_summary(self) -> dict:
        skipped = self.state.skipped
        examples = [m for part in skipped.values() for m in part][:20]
        return {**{split: len(messages) for split, messages in skipped.items()}, "examples": examples}

    def write_metrics(self, test: dict | None = None, perf: dict | None = None) -> None:
        if self.is_main:
            write_metrics(self.run.path, self.state.last_val, self.state.history, test=test, perf=perf,
                          best=self.best(), skipped=self._skipped_summary())

    # -- reading back a completed run -----------------------------------------------------------------------
    def completed_before(self) -> dict:
        """The recorded result of a run that completed and then pruned its checkpoints (main rank only)."""
        metrics, status = _recorded(self.run.metrics), _recorded(self.run.status)
        index = self.checkpoints.index()
        return {"status": "completed", "exit_code": 0, "step": status.get("step"), "epoch": status.get("epoch"),
                "run_dir": str(self.run.path), "final": metrics.get("final", {}), "test": metrics.get("test") or None,
                "perf": metrics.get("perf", {}), "best": {"name": index.get("best"), "value": index.get("best_value")},
                "history": metrics.get("history", []), "completed_before": True}


def _recorded(path: Path) -> dict:
    """A JSON object the completed run left in its folder (bounded: a regular file of limited size)."""
    try:
        value = load_json(path, what=f"the completed run's {path.name}")
    except OSError as exc:
        raise os_error(exc, f"reading the completed run's {path.name}") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
