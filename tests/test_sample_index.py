"""The loaders' compact sample index (numpy arrays instead of one object per sample) must hold the same samples,
keys and labels as the per-sample member table, and training_block must give the same epoch order as the
per-object algorithm it replaced, so runs keep their data order."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from tltrain.data.loaders import LoaderConfig, build_loader
from tltrain.data.loaders.plan import sample_index, sample_refs, select_shards, training_block, worker_part
from tltrain.errors import DataError


def _label(ref) -> int:
    offset, size, _ = ref.members["lbl"]
    with open(ref.tar, "rb") as f:
        f.seek(offset)
        return int.from_bytes(f.read(size), "little", signed=True)


def _reference_block(refs, world, rank, epoch, seed):
    """The previous per-SampleRef algorithm: shards (in first-seen order) permuted with the epoch's seed, their
    samples concatenated and cut into `world` equal blocks."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x5A4D]))
    by_tar: dict[str, list] = {}
    for ref in refs:
        by_tar.setdefault(ref.tar, []).append(ref)
    tars = list(by_tar)
    ordered = [ref for i in rng.permutation(len(tars)) for ref in by_tar[tars[i]]]
    per_rank = len(ordered) // world
    return ordered[rank * per_rank:(rank + 1) * per_rank]


@pytest.mark.parametrize("split", ["train", "val"])
def test_index_matches_member_table(fundus_shards, split):
    _, shards = select_shards(fundus_shards, split)
    refs, index = sample_refs(fundus_shards, shards), sample_index(fundus_shards, shards)
    assert len(index) == len(refs) > 0 and index.keys.dtype.kind == "U"  # fixed-width strings, no objects
    assert index.keys.tolist() == [r.key for r in refs]
    assert [index.tars[s] for s in index.shard] == [r.tar for r in refs]
    assert index.labels.tolist() == [_label(r) for r in refs]
    assert index.image.tolist() == [list(r.members["jpg"][:2]) for r in refs]  # where the loaders read them
    assert index.disc.tolist() == [list(r.members["disc"][:2]) for r in refs]


def test_training_block_keeps_the_epoch_order(fundus_shards):
    _, shards = select_shards(fundus_shards, "train")
    refs, index = sample_refs(fundus_shards, shards), sample_index(fundus_shards, shards)
    assert len(index.tars) >= 3
    for world in (1, 2, 3):
        for rank in range(world):
            for epoch, seed in ((0, 0), (1, 0), (4, 7)):
                block = training_block(index, world, rank, epoch, seed)
                expected = _reference_block(refs, world, rank, epoch, seed)
                assert index.keys[block].tolist() == [r.key for r in expected]
                assert index.tars_of(block) == list(dict.fromkeys(r.tar for r in expected))


def test_torch_loader_reads_its_block_in_equal_worker_parts(fundus_shards):
    """A rank reads exactly its block (positions in the index, no per-sample key set) and its DataLoader workers
    split it into equal contiguous parts, whatever the shard sizes."""
    cfg = LoaderConfig(backend="torch", batch_size=4, size=32, workers=0)
    one = build_loader(cfg, fundus_shards, "train", train=True)
    assert sorted(one.block.tolist()) == list(range(len(one.index))) and len(one.urls) == len(one.index.tars)
    two = [build_loader(cfg, fundus_shards, "train", train=True, rank=r, world_size=2) for r in (0, 1)]
    assert [len(loader.block) for loader in two] == [len(one.index) // 2] * 2
    assert not set(two[0].block.tolist()) & set(two[1].block.tolist())
    evaluation = build_loader(cfg, fundus_shards, "val", train=False, rank=0, world_size=2)
    assert evaluation.block.tolist() == list(range(len(evaluation.block)))  # shard order, the first half
    assert evaluation.urls == sorted(evaluation.urls, key=evaluation.index.tars.index)
    for workers in (1, 2, 3, 7):
        for batch in (1, 4, 5):
            parts = [worker_part(one.block, w, workers, batch) for w in range(workers)]
            assert np.concatenate(parts).tolist() == one.block.tolist()
            batches = [len(part) // batch for part in parts]
            assert batches == sorted(batches, reverse=True) and batches[0] - batches[-1] <= 1
            assert all(len(part) % batch == 0 for part in parts[:-1])


@pytest.mark.parametrize("member", ["lbl", "jpg"])
def test_index_without_a_label_or_image_member_is_refused_naming_its_line(fundus_shards, tmp_path, member):
    copy = tmp_path / "copy"
    shutil.copytree(fundus_shards, copy)
    _, shards = select_shards(copy, "val")
    index_file = copy / shards[0]["index"]
    lines = index_file.read_text().splitlines()
    fields = lines[2].split(" ")
    at = fields[::4].index(member) * 4
    lines[2] = " ".join(fields[:at] + fields[at + 4:])  # the second sample loses that member
    index_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"{index_file.name}:3: a sample without its image .* or .lbl member"):
        build_loader(LoaderConfig(batch_size=4, size=16, workers=0), copy, "val", train=False)
