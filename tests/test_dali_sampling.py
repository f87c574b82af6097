"""Class-balanced and class-weighted sampling on both backends (issue 27): DALI draws an epoch through an external
source with the torch backend's expected frequencies; deterministic by seed, epoch and rank, the same epoch again
after a rebuild (what a resume does), the rank split intact, and both backends' class frequencies over many epochs
equal to the target within a few percent."""
from collections import Counter

import numpy as np
import pytest

from tltrain.data.loaders import LoaderConfig, build_loader
from tltrain.data.loaders.plan import draw_rates, sample_index, select_shards, weighted_epoch_positions
from tltrain.data.manifest import load_manifest
from tltrain.errors import ConfigError


def _loader(shards, backend, rank=0, world=1, **kw):
    cfg = LoaderConfig(backend=backend, batch_size=4, size=32, workers=0 if backend == "torch" else 1, **kw)
    return build_loader(cfg, shards, "train", train=True, rank=rank, world_size=world, seed=7)


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    keys, labels = [], []
    for batch in loader:
        mask = batch.valid.tolist()
        keys += [k for k, v in zip(batch.keys, mask) if v]
        labels += [int(label) for label, v in zip(batch.labels.tolist(), mask) if v]
    return keys, labels


@pytest.mark.parametrize("weights", [None, [4.0, 1.0, 1.0, 1.0, 1.0]])
def test_both_backends_draw_the_target_class_frequencies_over_many_epochs(fundus_shards, weights):
    manifest = load_manifest(fundus_shards)
    _, shards = select_shards(fundus_shards, "train", manifest=manifest)
    index = sample_index(fundus_shards, shards)
    rates = draw_rates(index, shards, manifest, 5, weights is None, weights)
    target = np.ones(5) / 5 if weights is None else np.asarray(weights) / sum(weights)
    natural = np.bincount(index.labels, minlength=5) / len(index)
    assert np.abs(natural - target).max() > 0.05  # the set itself is not already at the target
    # DALI: the epochs' drawn positions; torch: each streamed sample repeated Poisson(rate) times (its _oversample)
    dali, torch_counts = np.zeros(5), np.zeros(5)
    rng = np.random.default_rng(0)
    for epoch in range(40):
        drawn = weighted_epoch_positions(index, shards, rates, epoch, seed=7)
        dali += np.bincount(index.labels[drawn], minlength=5)
        repeats = rng.poisson(rates[0, index.labels])
        torch_counts += np.bincount(index.labels, weights=repeats, minlength=5)
    for counts in (dali, torch_counts):
        assert np.abs(counts / counts.sum() - target).max() < 0.03, (counts / counts.sum(), target)


def test_dali_balanced_epochs_are_deterministic_resumable_and_split_by_rank(fundus_shards):
    first = _loader(fundus_shards, "dali", balanced=True)
    keys0, labels0 = _epoch(first, 0)
    keys1, _ = _epoch(first, 1)
    assert keys0 != keys1 and len(keys0) == len(first) * 4
    again = _loader(fundus_shards, "dali", balanced=True)
    assert _epoch(again, 1)[0] == keys1  # a run resumed into epoch 1 reads the same samples
    assert _epoch(again, 0)[0] == keys0
    counts = Counter(labels0)
    assert max(counts.values()) - min(counts.values()) <= len(labels0) // 2  # drawn toward balance, not natural
    # two ranks: each its contiguous part of the same draw, the same batch count
    ranks = [_loader(fundus_shards, "dali", rank=r, world=2, balanced=True) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])
    parts = [_epoch(loader, 0)[0] for loader in ranks]
    manifest = load_manifest(fundus_shards)
    _, shards = select_shards(fundus_shards, "train", manifest=manifest)
    index = sample_index(fundus_shards, shards)
    drawn = weighted_epoch_positions(index, shards, draw_rates(index, shards, manifest, 5, True), 0, seed=7)
    half = len(drawn) // 2
    assert parts[0] == index.keys[drawn[:len(parts[0])]].tolist()
    assert parts[1] == index.keys[drawn[half:half + len(parts[1])]].tolist()


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_class_weights_choose_the_classes_drawn(fundus_shards, backend):
    _, labels = _epoch(_loader(fundus_shards, backend, class_weights=[1, 0, 0, 0, 0]), 0)
    assert labels and set(labels) == {0}
    with pytest.raises(ConfigError, match=r"loader.class_weights has 2 weights for 5 classes"):
        _loader(fundus_shards, backend, class_weights=[1, 1])
    with pytest.raises(ConfigError, match="give one"):
        _loader(fundus_shards, backend, class_weights=[1, 1, 1, 1, 1], balanced=True)
