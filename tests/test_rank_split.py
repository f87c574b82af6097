"""Training data is split per sample across ranks, not per shard: on uneven shards (1-7 samples each) every rank
gets the same number of samples, no sample is read by two ranks in an epoch, and only the last partial global
batch is left out. Both backends, world sizes 2, 3 and 4, each rank built as it is in a real run (rank given)."""
from __future__ import annotations

import json

import pytest

from tltrain.data.loaders import LoaderConfig, build_loader

BATCH = 4


@pytest.fixture(scope="module")
def uneven_shards(fundus_raw, tmp_path_factory):
    from tltrain.data.prepare import PrepareConfig, run_prepare
    from tltrain.data.sources import SourceConfig

    out = tmp_path_factory.mktemp("uneven_shards")
    run_prepare(PrepareConfig(source=SourceConfig(kind="eyepacs", root=str(fundus_raw)), out=str(out),
                              shard_samples=7, workers=2, progress=False))
    return out


def _epoch_keys(loader) -> list[str]:
    return [k for batch in loader for k, v in zip(batch.keys, batch.valid.tolist()) if v]


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_training_split_is_per_sample_on_uneven_shards(backend, uneven_shards):
    manifest = json.loads((uneven_shards / "manifest.json").read_text())
    counts = [s["count"] for s in manifest["shards"] if s["split"] == "train"]
    total = sum(counts)
    assert min(counts) < max(counts) <= 7 and len(counts) >= 6  # uneven shards: the case that used to fail
    cfg = LoaderConfig(backend=backend, batch_size=BATCH, size=32, workers=1)
    for world in (2, 3, 4):
        loaders = [build_loader(cfg, uneven_shards, "train", train=True, rank=r, world_size=world, seed=3)
                   for r in range(world)]
        n_batches = len(loaders[0])
        assert all(len(loader) == n_batches for loader in loaders)
        used = n_batches * BATCH * world
        assert total - used < BATCH * world, f"world {world}: {total - used} of {total} samples unused"
        for epoch in (0, 1):
            per_rank = []
            for loader in loaders:
                loader.set_epoch(epoch)
                per_rank.append(_epoch_keys(loader))
            assert [len(keys) for keys in per_rank] == [n_batches * BATCH] * world
            everything = [k for keys in per_rank for k in keys]
            assert len(set(everything)) == len(everything), f"world {world}, epoch {epoch}: a sample read twice"


def test_dali_cpu_evaluation_on_the_host_matches_the_reader_iterator(uneven_shards):
    """DALI on the CPU evaluates by decoding in DALI and cropping, resizing and filtering on the host, iterating the
    pipeline itself (DaliLoader._host_batches) rather than through DALIGenericIterator: over three passes (the
    reader moves to the next shard after each) every rank gets the same samples, in the same order, as with DALI's
    own graph and iterator (filter_kernel=dali), and each pass covers the split once."""
    split_total = json.loads((uneven_shards / "manifest.json").read_text())["splits"]["train"]["count"]
    assert split_total > 3 * BATCH  # several batches per rank, a partial last one somewhere (evaluated, not trained)
    for world in (1, 3, 4):
        got, want = [], []
        for kernel, out in (("auto", got), ("dali", want)):
            cfg = LoaderConfig(backend="dali", batch_size=BATCH, size=32, workers=1, filter_kernel=kernel)
            loaders = [build_loader(cfg, uneven_shards, "train", train=False, rank=r, world_size=world)
                       for r in range(world)]
            assert loaders[0].host_crop == (kernel == "auto")
            out += [[_epoch_keys(loader) for loader in loaders] for _ in range(3)]
        assert got == want, f"world {world}"
        for ranks in got:
            keys = [k for rank_keys in ranks for k in rank_keys]
            assert len(keys) == len(set(keys)) == split_total
