"""The training state that is not weights: where the run is, what it measured, and every rank's RNG.

One object saves and restores itself, so what a checkpoint holds and what resume reads cannot drift apart.
The dictionary it saves keeps the keys checkpoints have always had (older runs still resume):
  epoch, step, batch_in_epoch, phase    where the run is (batch_in_epoch: batches of `epoch` already consumed)
  steps_per_epoch, world_size           what the run looked like when it saved (a change is reported on resume)
  rng, epoch_loss, epoch_skipped        per rank, gathered from every rank: RNG states, the unfinished epoch's
                                        running train loss [sum, count] and the samples it skipped so far
  skipped, history, thresholds,         distinct skipped samples per split, the per-epoch records, the ordinal
  last_val, pending_epoch_end           cut points, the last validation, an epoch whose validation was preempted
  config, run_config                    the trainer config and the whole run's resolved YAML (for export)
Only tensors, numbers, strings, lists and dicts: checkpoints load with torch.load(weights_only=True).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tltrain.engine import distributed as D
from tltrain.engine.reproducibility import rng_state, set_rng_state


def _no_skipped() -> dict[str, list[str]]:
    return {"train": [], "val": [], "test": []}


@dataclass
class TrainState:
    epoch: int = 0  # the epoch being (or next to be) trained
    step: int = 0  # optimizer steps done
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    phase: int = -1  # the schedule phase entered (-1: none yet)
    history: list[dict] = field(default_factory=list)  # one record per finished epoch
    thresholds: np.ndarray | None = None  # ordinal cut points tuned on validation
    last_val: dict = field(default_factory=dict)
    # An epoch whose training finished but whose validation a preemption interrupted: {"epoch", "train"}.
    pending_epoch_end: dict | None = None
    # This rank's part of the unfinished epoch: running train loss [sum, count] and samples skipped.
    epoch_loss: list = field(default_factory=lambda: [0.0, 0])
    epoch_skipped: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=_no_skipped)  # distinct skipped samples (all ranks)

    # -- the unfinished epoch -------------------------------------------------------------------------------
    def add_loss(self, value: float) -> None:
        self.epoch_loss = [self.epoch_loss[0] + value, self.epoch_loss[1] + 1]

    @property
    def mean_loss(self) -> float:
        return self.epoch_loss[0] / max(self.epoch_loss[1], 1)

    def finish_epoch(self, record: dict) -> None:
        """An epoch's record is in: the next epoch starts from zero."""
        self.history.append(record)
        self.epoch_loss, self.epoch_skipped = [0.0, 0], []

    # -- save and restore -----------------------------------------------------------------------------------
    def state_dict(self, world_size: int, steps_per_epoch: int, config: dict, run_config: str | None) -> dict:
        """Every rank calls this (it gathers the per-rank parts); the result is the same on every rank."""
        local = {"rng": rng_state(), "epoch_loss": list(self.epoch_loss), "epoch_skipped": list(self.epoch_skipped)}
        ranks = [local]
        if D.is_distributed():
            ranks = [None] * world_size
            torch.distributed.all_gather_object(ranks, local)
        return {"epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch, "phase": self.phase,
                "steps_per_epoch": steps_per_epoch, "world_size": world_size,
                "rng": [r["rng"] for r in ranks], "epoch_loss": [r["epoch_loss"] for r in ranks],
                "epoch_skipped": [r["epoch_skipped"] for r in ranks], "skipped": self.skipped,
                "history": self.history, "thresholds": self.thresholds, "last_val": self.last_val,
                "pending_epoch_end": self.pending_epoch_end, "config": config, "run_config": run_config}

    def load_state_dict(self, state: dict, rank: int, world_size: int) -> None:
        """Restore what state_dict saved, this rank's RNG included. With another world size each rank takes
        rank 0's RNG and the unfinished epoch's per-rank sums start again (they were another split's)."""
        self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        self.phase = state["phase"]
        self.history, self.thresholds, self.last_val = state["history"], state["thresholds"], state["last_val"]
        self.pending_epoch_end = state.get("pending_epoch_end")
        same_world = len(state["rng"]) == world_size
        mine = rank if same_world else 0
        set_rng_state(state["rng"][mine])
        if same_world and "epoch_loss" in state:
            self.epoch_loss = list(state["epoch_loss"][mine])
            self.epoch_skipped = list(state["epoch_skipped"][mine])
        self.skipped = state.get("skipped", self.skipped)
