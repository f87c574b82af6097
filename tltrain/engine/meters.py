"""What the training loop measures on the side: images per second and data wait, and the samples loaders skipped.

Each is a small object the loop feeds one number at a time, so the loop itself only says when.
"""
from __future__ import annotations

import time

import torch

from tltrain.contracts import decode_errors
from tltrain.engine import distributed as D


class ThroughputMeter:
    """Images per second and the fraction of time spent waiting for data, over a logging window and an epoch.

    Images are counted over all ranks (a rank's batch times the world size): every rank runs the same batches."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.epoch_start = self.window_start = time.perf_counter()
        self.epoch_wait = self.window_wait = 0.0
        self.epoch_images = self.window_images = 0

    def add(self, batch_size: int, waited: float) -> None:
        """One micro-batch of this rank's `batch_size` images, after `waited` seconds for it."""
        images = batch_size * self.world_size
        self.window_wait, self.window_images = self.window_wait + waited, self.window_images + images
        self.epoch_wait, self.epoch_images = self.epoch_wait + waited, self.epoch_images + images

    def window_rate(self) -> float:
        return self.window_images / max(time.perf_counter() - self.window_start, 1e-9)

    def window_scalars(self) -> dict[str, float]:
        """The window's figures for TensorBoard; the next window starts now."""
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        scalars = {"perf/images_per_s": self.window_images / elapsed, "perf/wait_fraction": self.window_wait / elapsed}
        self.window_start, self.window_wait, self.window_images = time.perf_counter(), 0.0, 0
        return scalars

    def epoch_figures(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.epoch_start, 1e-9)
        return {"images_per_s": self.epoch_images / elapsed, "wait_fraction": self.epoch_wait / elapsed}


def sample_ids(messages: list[str]) -> set[str]:
    """'shard.tar:key: cannot decode (...)' -> 'shard.tar:key' (the same sample met twice counts once)."""
    return {message.split(": ", 1)[0] for message in messages}


def gather_union(items: list[str], world_size: int) -> list[str]:
    """The sorted union of every rank's items (collective: every rank calls it)."""
    if not D.is_distributed():
        return sorted(set(items))
    lists = [None] * world_size
    torch.distributed.all_gather_object(lists, list(items))
    return sorted({item for part in lists for item in part})


class SkippedSamples:
    """Watches one loader's decode_errors (loader.on_decode_error=skip) from a starting point on."""

    def __init__(self, loader, world_size: int):
        self.loader, self.world_size = loader, world_size
        self.start = self.seen = len(decode_errors(loader))

    def new(self) -> set[str]:
        """Samples skipped since the last call (a resume re-reads batches: callers keep them in a set)."""
        errors = decode_errors(self.loader)
        fresh, self.seen = errors[self.seen:], len(errors)
        return sample_ids(fresh)

    def gathered(self) -> list[str]:
        """Every rank's samples skipped since this watch began (collective)."""
        return gather_union(sorted(sample_ids(decode_errors(self.loader)[self.start:])), self.world_size)
