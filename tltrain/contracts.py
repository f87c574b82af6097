"""The contracts between the floors: what the trainer needs of a loader, a batch and a transfer schedule.

Both loader backends (data/loaders/dali.py, data/loaders/torch_wds.py), the in-memory loader of the engine's own
tests (engine/synthetic.py) and any loader a user writes meet `Loader`; `transfer.schedule.Schedule` and
the trainer's one-phase default meet `Schedule`. They are typing.Protocols: nothing inherits from them, a type
checker (and a reader) sees what each side must offer, and `isinstance` works for the runtime-checkable ones.
`Batch` is the one concrete type here: the structure every loader yields (data/loaders/batch.py re-exports it).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:  # the ground floor imports no torch at run time
    import torch
    from torch import nn


class Batch(NamedTuple):
    """The one batch structure every loader yields and the engine consumes."""

    images: torch.Tensor  # (B, 3, H, W) model input, on the loader's device, dtype/layout per config
    labels: torch.Tensor  # (B,) int64 class indices
    keys: list[str]  # sample keys (e.g. 10_left): labels travel with their sample, never by position
    valid: torch.Tensor  # (B,) bool; False marks padding that keeps ranks' batch counts equal


@runtime_checkable
class Loader(Protocol):
    """A split of the data for this rank: the same number of batches on every rank, reshuffled by set_epoch."""

    num_classes: int
    batch_size: int

    def __len__(self) -> int:
        """Batches per epoch on this rank (equal on every rank)."""

    def __iter__(self) -> Iterator[Batch]:
        """The epoch's batches, in the order set_epoch fixed."""

    def set_epoch(self, epoch: int) -> None:
        """Fix the order of the next iteration: the same epoch gives the same batches (resume relies on it)."""


class ReportsSkipped(Protocol):
    """A loader that skips undecodable samples (loader.on_decode_error=skip) lists them, one message each:
    'shard.tar:key: cannot decode (...)'. Loaders that never skip need not have the attribute."""

    decode_errors: list[str]


class KnowsSources(Protocol):
    """An evaluation loader over samples of several sources (several datasets prepared as one, or several shard
    folders) maps each key to its source, so metrics are given per source beside the pooled ones. None, or no
    attribute: one source."""

    source_of: dict[str, str] | None


def sample_sources(loader) -> dict[str, str] | None:
    """key -> source of a loader's samples (KnowsSources), None for a loader of one source."""
    return getattr(loader, "source_of", None) or None


def decode_errors(loader) -> list[str]:
    """The samples a loader skipped so far ([] for a loader that never skips: see ReportsSkipped)."""
    return getattr(loader, "decode_errors", None) or []


@runtime_checkable
class Schedule(Protocol):
    """A transfer schedule: phases of epochs, each with its trainable parameter groups and learning rates."""

    total_epochs: int

    def phase_index(self, epoch: int) -> int:
        """The phase an epoch belongs to (phases are consecutive runs of epochs)."""

    def apply(self, model: nn.Module, phase_index: int) -> list[dict]:
        """Set requires_grad for the phase and return its optimizer parameter groups (params, lr, ...)."""

    def set_train_mode(self, model: nn.Module, phase_index: int) -> None:
        """After model.train(): put frozen parts back in eval mode where the phase says so (BatchNorm)."""

    def describe(self, phase_index: int) -> str:
        """One line for the log: what the phase trains and at which learning rate."""
