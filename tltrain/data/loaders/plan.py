"""The shards and samples of a split, read from manifest.json and the DALI index files, and how training shards
are split among ranks. Both backends use these; the per-rank rules are described in torch_wds.py and dali.py.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tltrain.data.shards import image_ext, read_index
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
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{manifest_path}: not valid JSON ({exc}); re-run `tltrain prepare`") from None
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
    missing = [str(shard_dir / s[part]) for s in shards for part in ("tar", "index") if not (shard_dir / s[part]).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(f"{', '.join(missing[:3])}{more}: missing (listed in {manifest_path}); restore the files or "
                        "re-run `tltrain prepare` (it resumes and rewrites only what is missing), then `tltrain verify`")
    return manifest, shards


def sample_refs(shard_dir: str | Path, shards: list[dict]) -> list[SampleRef]:
    refs = []
    for shard in shards:
        tar = str(Path(shard_dir) / shard["tar"])
        for members in read_index(Path(shard_dir) / shard["index"]):
            key = members[image_ext(members) or "jpg"][2].rsplit(".", 1)[0]
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


def training_block(refs: list[SampleRef], shards: list[dict], world: int, rank: int, epoch: int,
                   seed: int) -> list[SampleRef]:
    """Training: this rank's samples of an epoch, split per sample rather than per shard.

    The shards are put in an epoch-seeded random order and their samples cut into `world` equal contiguous
    blocks of N // world samples, one per rank. Every rank gets the same count whatever the shard sizes, at most
    world - 1 samples sit out an epoch (a different few each epoch), and a rank streams only the shards its block
    touches (its share plus at most two shards it shares with a neighbour).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x5A4D]))
    by_tar: dict[str, list[SampleRef]] = {}
    for ref in refs:
        by_tar.setdefault(ref.tar, []).append(ref)
    tars = list(by_tar)
    ordered = [ref for i in rng.permutation(len(tars)) for ref in by_tar[tars[i]]]
    per_rank = len(ordered) // world
    return ordered[rank * per_rank:(rank + 1) * per_rank]
