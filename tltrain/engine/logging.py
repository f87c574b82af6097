"""What a run shows while it trains: TensorBoard (rank 0), a progress bar, and the run-dir JSON files.

Files other tools read (report, jobs, export; names from tltrain.run_folder, status written by RunFolder):
  <run_dir>/status.json   {"state": running|completed|failed|preempted, "step", "epoch", "metrics", "error",
                           "pid", "host", ...}; a "running" whose pid/lock is gone is stale (rundir.is_stale)
  <run_dir>/metrics.json  {"final": {...}, "best": {"checkpoint", "metric", "step", "epoch", "val"}, "test": {...},
                           "history": [{"epoch", "step", "train_loss", "skipped_samples", "val": {...}}, ...],
                           "skipped_samples": {"train", "val", "test", "examples"}, "perf": {...}}
  <run_dir>/predictions_test.csv  key, label, predicted, p_0..p_{C-1} of the tested checkpoint
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

from tltrain.run_folder import RunFolder
from tltrain.safe_io import atomic_write_json


def write_metrics(run_dir: str | Path, final: dict, history: list[dict], test: dict | None = None,
                  perf: dict | None = None, best: dict | None = None, skipped: dict | None = None) -> None:
    """metrics.json: last validation metrics ("final"), per-epoch history (0-based "epoch"), the best checkpoint
    ("best": name, metric, mode, value, step, "epoch" = epochs completed, its validation metrics), test metrics
    ("test", with the checkpoint they were computed on), speed, and the samples the loaders skipped (undecodable:
    loader.on_decode_error=skip)."""
    atomic_write_json(RunFolder(run_dir).metrics,
                      {"final": final, "best": best or {}, "history": history, "test": test or {},
                       "perf": perf or {},
                       "skipped_samples": skipped or {"train": 0, "val": 0, "test": 0, "examples": []}})


def own_folder(path: str | Path, what: str) -> Path:
    """A folder a run writes new files into (tb/, features/): refused when it is a symbolic link, which in a
    shared run folder could lead anywhere. Checked when the run starts, not at its first write."""
    path = Path(path)
    if path.is_symlink():
        from tltrain.errors import DataError
        from tltrain.safe_io import printable

        raise DataError(f"{path}: the run's {what} is a symbolic link (to {printable(os.readlink(path), 200)}); "
                        "refused: a run writes only inside its own folder")
    return path


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The plottable numbers of a metrics dict (drops the confusion matrix, counts stay)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardLogger:
    """SummaryWriter on rank 0; a no-op elsewhere so call sites need no rank checks.

    The event file is created on the first write, so a run that has nothing to log (a relaunch of a completed,
    pruned run) adds no empty event file to its tb/ folder."""

    def __init__(self, log_dir: str | Path, enabled: bool = True):
        if enabled:
            own_folder(log_dir, "TensorBoard folder")
        self.log_dir, self.enabled, self._writer = str(log_dir), enabled, None

    @property
    def writer(self):
        """The SummaryWriter (opened on first use), or None on ranks that do not log."""
        if self._writer is None and self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        return self._writer

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(f"{prefix}{name}", value, step)

    def learning_rates(self, param_groups: list[dict], step: int) -> None:
        if self.writer is None:
            return
        for i, group in enumerate(param_groups):
            self.writer.add_scalar(f"lr/{group.get('name', f'group{i}')}", group["lr"], step)

    def gpu_memory(self, device: torch.device, step: int) -> None:
        if self.writer is None or device.type != "cuda":
            return
        self.writer.add_scalar("system/gpu_mem_allocated_gib", torch.cuda.memory_allocated(device) / 2**30, step)
        self.writer.add_scalar("system/gpu_mem_peak_gib", torch.cuda.max_memory_allocated(device) / 2**30, step)

    def confusion(self, confusion: list[list[int]], step: int, tag: str = "val/confusion") -> None:
        if self.writer is None:
            return
        self.writer.add_figure(tag, confusion_figure(np.asarray(confusion)), step)

    def image_grid(self, images: torch.Tensor, step: int, count: int, tag: str = "inputs") -> None:
        """The preprocessed inputs as the model sees them, min-max scaled per image for display."""
        if self.writer is None or count <= 0:
            return
        from torchvision.utils import make_grid

        shown = images[:count].detach().float().cpu()
        low = shown.amin(dim=(1, 2, 3), keepdim=True)
        high = shown.amax(dim=(1, 2, 3), keepdim=True)
        shown = (shown - low) / (high - low).clamp_min(1e-6)
        self.writer.add_image(tag, make_grid(shown, nrow=int(math.ceil(math.sqrt(len(shown))))), step)

    def hparams(self, hparams: dict, metrics: dict[str, dict]) -> None:
        """HParams plugin entry; metrics by group, e.g. {"best_val": {...}, "test": {...}} -> hparam/test/kappa."""
        if self.writer is None:
            return
        plain = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        final = {f"hparam/{group}/{k}": v for group, values in metrics.items()
                 for k, v in scalar_metrics(values or {}).items() if not math.isnan(v)}
        self.writer.add_hparams(plain, final, run_name=".")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def confusion_figure(confusion: np.ndarray):
    """A labelled heat map (true grade rows, predicted grade columns) with counts in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = confusion.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n, 1.0 + 0.6 * n))
    ax.imshow(confusion, cmap="Blues")
    ax.set(xlabel="predicted", ylabel="true", xticks=range(n), yticks=range(n))
    threshold = confusion.max() / 2 if confusion.size else 0
    for (i, j), count in np.ndenumerate(confusion):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    fig.tight_layout()
    return fig


class Progress:
    """Rank-0 tqdm bar per epoch with ETA and images/s; a summary line per epoch through tqdm.write.

    `bar=False` (batch jobs, CI logs) keeps the summary lines and drops only the bar."""

    def __init__(self, enabled: bool, bar: bool = True):
        self.enabled = enabled
        self.show_bar = bar
        self.bar = None

    def start(self, total: int, description: str, initial: int = 0) -> None:
        if not (self.enabled and self.show_bar):
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=description, unit="batch", dynamic_ncols=True, leave=False)

    def update(self, loss: float, images_per_s: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}", lr=f"{lr:.2e}", refresh=False)
            self.bar.update(1)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def line(self, text: str) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            tqdm.write(text)
            sys.stdout.flush()
