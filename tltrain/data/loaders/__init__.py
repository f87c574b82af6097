"""Loader backends behind one call: build_loader(cfg, shard_dir, split, ...) -> iterable of Batch."""
from __future__ import annotations

from tltrain.data.loaders.config import LoaderConfig


def build_loader(cfg: LoaderConfig, shard_dir, split: str, *, train: bool, rank: int = 0, world_size: int = 1,
                 device: str = "cpu", seed: int = 0, fraction: float | None = None, manifest=None):
    """A loader for one rank: `len()` batches per epoch (equal on all ranks), `set_epoch`, `stats()`.
    `manifest`: the shard folder's validated manifest when the caller read it already (read once per run)."""
    cfg.validate()
    if cfg.backend == "dali":
        from tltrain.data.loaders.dali import DaliLoader as Loader
    else:
        from tltrain.data.loaders.torch_wds import TorchWdsLoader as Loader
    return Loader(cfg, shard_dir, split, train=train, rank=rank, world_size=world_size, device=device, seed=seed,
                  fraction=fraction, manifest=manifest)


__all__ = ["Batch", "LoaderConfig", "build_loader"]


def __getattr__(name: str):
    """Batch (a torch type) is imported on first use: the config side stays importable without torch."""
    if name == "Batch":
        from tltrain.data.loaders.batch import Batch

        return Batch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
