"""DR metrics checked against scikit-learn, including the gather across 2 real gloo ranks with padding."""
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import (accuracy_score, cohen_kappa_score, confusion_matrix, log_loss, roc_auc_score,
                             top_k_accuracy_score)

from conftest import free_port
from tltrain.metrics import PredictionGatherer, compute_metrics, gathered_metrics


def random_predictions(n=300, c=5, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c))
    labels = rng.integers(0, c, size=n)
    logits[np.arange(n), labels] += 1.0  # better than chance, so every metric is non-trivial
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, labels


def test_metrics_match_sklearn():
    probs, labels = random_predictions()
    got = compute_metrics(probs, labels)
    predicted = probs.argmax(1)
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert got["top2_accuracy"] == pytest.approx(top_k_accuracy_score(labels, probs, k=2, labels=range(5)))
    assert got["kappa"] == pytest.approx(cohen_kappa_score(labels, predicted, weights="quadratic"))
    assert got["confusion"] == confusion_matrix(labels, predicted).tolist()
    assert got["auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    assert got["cross_entropy"] == pytest.approx(log_loss(labels, probs))
    truth, guess = labels >= 2, predicted >= 2
    assert got["sensitivity"] == pytest.approx((truth & guess).sum() / truth.sum())
    assert got["specificity"] == pytest.approx((~truth & ~guess).sum() / (~truth).sum())
    assert got["count"] == 300


def test_auc_ignores_absent_class_and_binary_has_no_referable_metrics():
    probs, labels = random_predictions(c=5, seed=1)
    labels = np.where(labels == 4, 3, labels)  # grade 4 absent
    got = compute_metrics(probs, labels)
    expected = np.mean([roc_auc_score(labels == c, probs[:, c]) for c in range(4)])
    assert got["auc"] == pytest.approx(expected)
    binary = compute_metrics(*random_predictions(c=2, seed=2))
    assert "sensitivity" not in binary and 0.0 <= binary["auc"] <= 1.0
    assert "top2_accuracy" not in binary and "top2_accuracy" in got  # two classes: the top two are all of them
    one_class = compute_metrics(np.tile([[0.9, 0.1]], (4, 1)), np.zeros(4, int))
    assert math.isnan(one_class["auc"]) and one_class["kappa"] == 0.0


def test_gatherer_drops_padding_in_one_process():
    probs, labels = random_predictions(n=10)
    gatherer = PredictionGatherer()
    valid = torch.tensor([True] * 8 + [False] * 2)
    gatherer.add(torch.from_numpy(probs), torch.from_numpy(labels), [f"k{i}" for i in range(10)], valid)
    got_probs, got_labels, keys = gatherer.gather()
    assert len(keys) == 8 and np.array_equal(got_labels, labels[:8]) and np.allclose(got_probs, probs[:8])


def _gather_worker(rank, world, port, probs, labels, out_queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # the sharding of the loader contract: rank r takes every world-th sample, last batch padded with repeats
    mine = np.arange(len(labels))[rank::world]
    padded = np.concatenate([mine, mine[:4]])  # 4 padding samples that repeat real ones
    valid = torch.tensor([True] * len(mine) + [False] * 4)
    gatherer = PredictionGatherer()
    for chunk in np.array_split(np.arange(len(padded)), 3):  # several batches
        index = padded[chunk]
        gatherer.add(torch.from_numpy(probs[index]), torch.from_numpy(labels[index]), [f"s{i}" for i in index],
                     valid[chunk])
    metrics = gathered_metrics(gatherer)
    out_queue.put((rank, metrics))
    dist.destroy_process_group()


def test_gather_across_two_ranks_matches_sklearn_on_full_set():
    probs, labels = random_predictions(n=101, seed=3)  # odd count: the ranks hold 51 and 50 real samples
    expected = compute_metrics(probs, labels)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, port, probs, labels, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank in (0, 1):
        got = results[rank]
        assert got["count"] == 101
        assert got["confusion"] == expected["confusion"]
        for key in ("accuracy", "top2_accuracy", "kappa", "auc", "cross_entropy", "sensitivity", "specificity"):
            assert got[key] == pytest.approx(expected[key]), key
    assert expected["kappa"] == pytest.approx(cohen_kappa_score(labels, probs.argmax(1), weights="quadratic"))


def test_bootstrap_resample_metrics_equal_scikit_learn_on_the_resampled_set():
    """The numpy resample metrics (weights = how often each image was drawn) are scikit-learn's metrics of the
    resampled set, ties in the scores included."""
    from tltrain.metrics import _WeightedMetrics

    rng = np.random.default_rng(7)
    for n in (15, 80, 400):
        labels = rng.integers(0, 5, n)
        probs = np.round(rng.dirichlet(np.ones(5), n), 1) + 1e-3  # rounded: many tied scores
        probs /= probs.sum(axis=1, keepdims=True)
        weighted = _WeightedMetrics(probs, labels, 2)
        for _ in range(3):
            index = rng.integers(0, n, n)
            fast = weighted(np.bincount(index, minlength=n).astype(float))
            reference = compute_metrics(probs[index], labels[index], 2)
            for name, value in fast.items():
                assert value == pytest.approx(reference[name], abs=1e-12), (n, name)


def test_bootstrap_ci_is_seeded_stratified_and_brackets_the_estimate():
    from tltrain.metrics import bootstrap_ci

    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(5), [60, 20, 20, 10, 10])
    logits = rng.normal(size=(120, 5)) + 2.0 * np.eye(5)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    first = bootstrap_ci(probs, labels, resamples=300, seed=1)
    again = bootstrap_ci(probs, labels, resamples=300, seed=1)
    assert first == again and first != bootstrap_ci(probs, labels, resamples=300, seed=2)
    point = compute_metrics(probs, labels)
    for name in ("kappa", "auc", "sensitivity", "specificity", "referable_auc"):
        assert first[name]["value"] == point[name]
        assert first[name]["low"] < point[name] < first[name]["high"], name
    two_class = bootstrap_ci(probs[:, :2] / probs[:, :2].sum(1, keepdims=True), (labels > 0).astype(int), None,
                             resamples=50)
    assert "sensitivity" not in two_class and two_class["auc"]["low"] <= two_class["auc"]["value"]
