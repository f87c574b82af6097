"""Which samples a rank reads in an epoch: the part every backend must agree on.

Evaluation: every sample exactly once over all ranks; each rank gets ceil(N / world) slots, the last ones padded
(valid=False), so all ranks run the same number of batches and metrics never count a sample twice.
Training: an epoch-seeded permutation (or an inverse-class-frequency draw) cut into equal per-rank blocks of
whole batches; the few samples left over change from epoch to epoch.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tltrain.data.shards import read_index
from tltrain.errors import ConfigError, DataError


@dataclass
class SampleRef:
    tar: str
    key: str
    members: dict  # extension -> (offset, size, member name)


def select_shards(shard_dir: str | Path, split: str, fraction: float | None = None) -> tuple[dict, list[dict]]:
    """The manifest and the shard entries of a split (training: of the chosen nested fraction)."""
    shard_dir = Path(shard_dir)
    manifest_path = shard_dir / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path}: not found (run `tltrain prepare` first)")
    manifest = json.loads(manifest_path.read_text())
    if split == "train" and fraction is not None:
        key = f"{fraction:g}"
        if key not in manifest["fractions"]:
            raise ConfigError(f"data.fraction={fraction!r} was not prepared; choose one of: "
                              f"{', '.join(manifest['fractions'])}")
        names = set(manifest["fractions"][key]["shards"])
        shards = [s for s in manifest["shards"] if s["name"] in names]
    else:
        shards = [s for s in manifest["shards"] if s["split"] == split]
    if not shards:
        raise DataError(f"{shard_dir}: no shards for split {split!r} (splits: {', '.join(manifest['splits'])})")
    return manifest, shards


def sample_refs(shard_dir: str | Path, shards: list[dict]) -> list[SampleRef]:
    refs = []
    for shard in shards:
        tar = str(Path(shard_dir) / shard["tar"])
        for members in read_index(Path(shard_dir) / shard["index"]):
            key = members["jpg"][2].rsplit(".", 1)[0]
            refs.append(SampleRef(tar, key, members))
    return refs


def read_labels(refs: list[SampleRef]) -> np.ndarray:
    """Every sample's label from its 4-byte .lbl member (one seek each; needed for balanced sampling)."""
    labels = np.empty(len(refs), np.int64)
    handles: dict[str, object] = {}
    try:
        for i, ref in enumerate(refs):
            f = handles.get(ref.tar) or handles.setdefault(ref.tar, open(ref.tar, "rb"))
            offset, size, _ = ref.members["lbl"]
            f.seek(offset)
            labels[i] = int.from_bytes(f.read(size), "little", signed=True)
    finally:
        for f in handles.values():
            f.close()
    return labels


def eval_slots(n_total: int, world: int, rank: int, batch: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(sample indices, valid mask, batches) of this rank for an evaluation epoch."""
    per_rank = math.ceil(n_total / world)
    n_batches = max(1, math.ceil(per_rank / batch))
    start, stop = min(n_total, rank * per_rank), min(n_total, (rank + 1) * per_rank)
    real = np.arange(start, stop)
    slots = n_batches * batch
    pad = slots - len(real)
    filler = np.full(pad, real[-1] if len(real) else 0)
    return np.concatenate([real, filler]), np.concatenate([np.ones(len(real), bool), np.zeros(pad, bool)]), n_batches


def train_slots(n_total: int, world: int, rank: int, batch: int, epoch: int, seed: int,
                labels: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """(sample indices, batches) of this rank for a training epoch; labels given = class-balanced draw."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x7EA1]))
    if labels is not None:
        counts = np.bincount(labels)
        weights = 1.0 / counts[labels]
        order = rng.choice(n_total, size=n_total, replace=True, p=weights / weights.sum())
    else:
        order = rng.permutation(n_total)
    n_batches = (n_total // world) // batch
    if n_batches < 1:
        raise ConfigError(f"{n_total} training samples cannot fill one batch of {batch} on each of {world} ranks; "
                          "lower loader.batch_size")
    block = n_batches * batch
    return order[rank * block:(rank + 1) * block], n_batches
