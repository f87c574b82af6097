"""The shards and samples of a split, read from manifest.json and the DALI index files, and how training shards
are split among ranks. Both backends use these; the per-rank rules are described in torch_wds.py and dali.py.

A loader keeps its split as a SampleIndex: per sample a shard number, a key and a label in numpy arrays (about
4 bytes per key character plus 12), not one Python object per sample, so a loader's memory does not grow by a
kilobyte per sample at 88,702 images and beyond. sample_refs gives the full per-sample member table (offsets,
sizes, names) for tools and tests that read single members.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tltrain import safe_io
from tltrain.data.manifest import Manifest, load_manifest, manifest_path as manifest_path_of
from tltrain.data.shards import image_ext, read_index
from tltrain.errors import ConfigError, DataError
from tltrain.safe_io import printable


NO_MEMBER = -1  # SampleIndex.disc's offset for a sample without a .disc member (the torch backend locates it)


@dataclass
class SampleRef:
    tar: str
    key: str
    members: dict  # extension -> (offset, size, member name)


def select_shards(shard_dir: str | Path, split: str, fraction: float | None = None,
                  manifest: Manifest | None = None) -> tuple[Manifest, list[dict]]:
    """The manifest and the shard entries of a split (training: of the chosen nested fraction). `manifest`: the
    shard folder's, when the caller has read it already (a run reads it once)."""
    shard_dir = Path(shard_dir)
    manifest = manifest if manifest is not None else load_manifest(shard_dir)
    manifest_path = manifest_path_of(shard_dir)
    if split == "train" and fraction is not None:
        key = f"{fraction:g}"
        if key not in manifest.get("fractions", {}):
            raise ConfigError(f"data.fraction={fraction!r} was not prepared; choose one of: "
                              f"{', '.join(manifest.get('fractions', {}))}")
        names = set(manifest["fractions"][key]["shards"])
        shards = [s for s in manifest["shards"] if s["name"] in names]
    else:
        shards = [s for s in manifest["shards"] if s["split"] == split]
    if not shards:
        raise DataError(f"{shard_dir}: no shards for split {split!r} (splits: {', '.join(manifest['splits'])})")
    missing = [str(shard_dir / s[part]) for s in shards for part in ("tar", "index")
               if not (shard_dir / s[part]).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(f"{', '.join(missing[:3])}{more}: missing (listed in {manifest_path}); restore the files or "
                        "re-run `tltrain prepare` (it resumes and rewrites only what is missing), "
                        "then `tltrain verify`")
    return manifest, shards


@dataclass
class SampleIndex:
    """The samples of a list of shards in shard order: `tars[shard[i]]` holds sample i, named `keys[i]`, of class
    `labels[i]` (read from its 4-byte .lbl member, the label source of both backends), its image and disc
    members at the byte spans `image[i]` and `disc[i]` of the index file."""

    tars: list[str]  # one path per shard, in the order given
    shard: np.ndarray  # (N,) int32: which tar
    keys: np.ndarray  # (N,) numpy unicode strings (fixed width: the longest key)
    labels: np.ndarray  # (N,) int64
    image: np.ndarray  # (N, 2) int64: the image member's (offset, size) in its tar (tltrain.data.loaders.members)
    disc: np.ndarray  # (N, 2) int64: the .disc member's, (NO_MEMBER, 0) where a sample has none

    def __len__(self) -> int:
        return len(self.keys)

    def tars_of(self, positions) -> list[str]:
        """The tars holding these samples, each once, in the order the samples first meet them."""
        return [self.tars[i] for i in dict.fromkeys(self.shard[positions].tolist())]


def sample_index(shard_dir: str | Path, shards: list[dict]) -> SampleIndex:
    """Read the DALI index file and every .lbl member of each shard, one shard at a time (so the per-member
    table of one shard is the most held at once)."""
    tars, shard_ids, keys, labels, images, discs = [], [], [], [], [], []
    for number, shard in enumerate(shards):
        tar = str(Path(shard_dir) / shard["tar"])
        tars.append(tar)
        index_path = Path(shard_dir) / shard["index"]
        members = read_index(index_path)
        _check_spans(index_path, tar, members)
        image = []  # each sample's image member: (offset, size, name)
        for line, sample in enumerate(members, start=2):
            ext = image_ext(sample)
            if ext is None or "lbl" not in sample:
                raise DataError(f"{index_path}:{line}: a sample without its image (.jpg/.png) or .lbl member (not "
                                "a tltrain shard?)")
            image.append(sample[ext])
        keys.append(np.array([name.rsplit(".", 1)[0] for _, _, name in image], dtype=str))  # as _key_of
        shard_ids.append(np.full(len(members), number, np.int32))
        labels.append(_read_labels(tar, [m["lbl"][:2] for m in members]))
        images.append(np.array([member[:2] for member in image], np.int64).reshape(-1, 2))
        discs.append(np.array([m["disc"][:2] if "disc" in m else (NO_MEMBER, 0) for m in members],
                              np.int64).reshape(-1, 2))
    if not tars:
        spans = np.zeros((0, 2), np.int64)
        return SampleIndex([], np.zeros(0, np.int32), np.zeros(0, str), np.zeros(0, np.int64), spans, spans)
    return SampleIndex(tars, np.concatenate(shard_ids), np.concatenate(keys), np.concatenate(labels),
                       np.concatenate(images), np.concatenate(discs))


def _key_of(members: dict) -> str:
    """A sample's key: its image member's name without the extension."""
    return members[image_ext(members) or "jpg"][2].rsplit(".", 1)[0]


def _check_spans(idx_path: Path, tar: str, members: list[dict]) -> None:
    """Every member the index lists lies inside its tar: DALI reads (and allocates) what the index says, so an
    index naming bytes past the end of a small tar is refused here, naming both files."""
    size = os.stat(tar).st_size
    for number, sample in enumerate(members, start=2):
        for offset, length, name in sample.values():
            if offset + length > size:
                raise DataError(f"{idx_path}:{number}: member {printable(name, 200)} ends at byte {offset + length:,}"
                                f" but {tar} has {size:,} bytes (damaged shard: run `tltrain verify`)")


def _read_labels(tar: str, spans: list[tuple[int, int]]) -> np.ndarray:
    """The labels of one tar's samples from their 4-byte .lbl (offset, size) spans: one seek each."""
    labels = np.empty(len(spans), np.int64)
    with safe_io.open_regular(tar, "shard") as f:
        for i, (offset, size) in enumerate(spans):
            if size != 4:
                raise DataError(f"{tar}: a .lbl member of {size:,} bytes, expected 4 (damaged shard: run "
                                "`tltrain verify`)")
            f.seek(offset)
            labels[i] = int.from_bytes(f.read(size), "little", signed=True)
    return labels


def sample_refs(shard_dir: str | Path, shards: list[dict]) -> list[SampleRef]:
    """One SampleRef per sample, with every member's (offset, size, name): for tools and tests reading single
    members; the loaders hold the compact sample_index instead."""
    refs = []
    for shard in shards:
        tar = str(Path(shard_dir) / shard["tar"])
        for members in read_index(Path(shard_dir) / shard["index"]):
            refs.append(SampleRef(tar, _key_of(members), members))
    return refs


def worker_part(positions: np.ndarray, worker: int, workers: int, batch: int = 1) -> np.ndarray:
    """The contiguous part of a rank's samples that DataLoader worker `worker` of `workers` reads: whole batches,
    as equal in number as they can be (the first workers take one more), and the samples past the last whole
    batch at the end of the last worker's part. The DataLoader takes the workers' batches in turn, so a training
    epoch of len(positions) // batch batches reads every one of those batches once before any worker's looped
    stream comes round again (equal parts that are not whole batches would let a worker loop early)."""
    whole = len(positions) // batch
    base, extra = divmod(whole, workers)
    start = batch * (worker * base + min(worker, extra))
    end = start + batch * (base + (worker < extra))
    return positions[start:len(positions) if worker == workers - 1 else end]


def training_block(index: SampleIndex, world: int, rank: int, epoch: int, seed: int) -> np.ndarray:
    """Training: the positions (in `index`) of this rank's samples of an epoch, split per sample rather than per
    shard.

    The shards are put in an epoch-seeded random order and their samples cut into `world` equal contiguous
    blocks of N // world samples, one per rank. Every rank gets the same count whatever the shard sizes, at most
    world - 1 samples sit out an epoch (a different few each epoch), and a rank streams only the shards its block
    touches (its share plus at most two shards it shares with a neighbour).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x5A4D]))
    counts = np.bincount(index.shard, minlength=len(index.tars))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else counts
    filled = np.flatnonzero(counts)  # shards without samples take no part in the order (nor in the draw)
    pieces = [np.arange(starts[s], starts[s] + counts[s]) for s in filled[rng.permutation(len(filled))]]
    ordered = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    per_rank = len(ordered) // world
    return ordered[rank * per_rank:(rank + 1) * per_rank]


def folder_weights(manifest: dict) -> list[float] | None:
    """data.weights of a combined manifest (tltrain.data.shard_set), None when the folders are not weighted."""
    folders = manifest.get("folders") or []
    weights = [folder.get("weight") for folder in folders]
    return None if not folders or any(w is None for w in weights) else [float(w) for w in weights]


def sample_folders(index: SampleIndex, shards: list[dict]) -> np.ndarray:
    """The folder number of each sample (0 for a plain, single-folder manifest)."""
    of_shard = np.array([shard.get("folder", 0) for shard in shards] or [0], np.int64)
    return of_shard[index.shard] if len(index) else np.zeros(0, np.int64)


def draw_rates(index: SampleIndex, shards: list[dict], manifest: dict, num_classes: int, balanced: bool,
               class_weights: list[float] | None = None) -> np.ndarray | None:
    """Training: the expected draws per sample of an epoch, by (folder, class), or None (every sample once).

    Class shares: balanced gives every class present the same share of the epoch (Sallam et al.), class_weights
    the share weight_c / sum(weights of the classes present); a sample of class c is then drawn
    share_c * N / count[c] times on average. Weighted folders: folder f draws share_f = weight_f / sum(weights) of
    the epoch's N samples (share_f * N / count_f per sample; with class shares, within the folder:
    share_f * share_c * N / count[f, c])."""
    weights = folder_weights(manifest)
    if balanced and class_weights is None:
        class_weights = [1.0] * num_classes
    if weights is None and class_weights is None:
        return None
    folders = sample_folders(index, shards)
    n_folders = max(len(weights or []), int(folders.max()) + 1 if len(folders) else 1)
    counts = np.zeros((n_folders, num_classes), np.int64)
    np.add.at(counts, (folders, index.labels), 1)
    total = len(index)

    def class_rates(count: np.ndarray, share: float) -> np.ndarray:
        if class_weights is None:
            return np.full(num_classes, share * total / max(count.sum(), 1)) * (count > 0)
        wanted = np.where(count > 0, np.asarray(class_weights, float), 0.0)
        if wanted.sum() <= 0:
            return np.zeros(num_classes)
        return np.where(count > 0, share * total * (wanted / wanted.sum()) / np.maximum(count, 1), 0.0)

    if weights is None:  # class shares over the pooled classes, whatever folder a sample is in
        return np.tile(class_rates(counts.sum(0), 1.0), (n_folders, 1))
    weights = np.where(counts.sum(1) > 0, np.asarray(weights, float), 0.0)  # no samples of this split: no share
    shares = weights / weights.sum()
    return np.stack([class_rates(counts[f], shares[f]) for f in range(n_folders)])


def weighted_epoch_positions(index: SampleIndex, shards: list[dict], rates: np.ndarray, epoch: int,
                             seed: int) -> np.ndarray:
    """DALI (its reader cannot weight samples, so an external source feeds it): an epoch's N sample positions,
    drawn with replacement with probability proportional to each sample's rate (draw_rates), seeded by
    (seed, epoch): the same list on every rank, which then takes its contiguous part. The torch backend draws the
    same expected frequencies as Poisson repeats of a streamed sample."""
    per_sample = rates[sample_folders(index, shards), index.labels]
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0xBA1A]))
    return rng.choice(len(index), size=len(index), replace=True, p=per_sample / per_sample.sum())


def source_of_keys(manifest: dict, shard_dir, shards: list[dict], index: SampleIndex) -> dict[str, str] | None:
    """key -> source name of an evaluation split's samples (tltrain.data.shard_set.sample_sources), None when
    they all come from one source."""
    from tltrain.data.shard_set import sample_sources

    sources = sample_sources(manifest, shard_dir, shards, index)
    return None if sources is None else dict(zip(index.keys.tolist(), sources))
