"""Frozen features + SVM / logistic regression: pre-logit features, padding, predictions, the cache, 2 ranks."""
import os

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import accuracy_score

from conftest import free_port
from tltrain.data.loaders.batch import Batch
from tltrain.errors import ConfigError, DataError
from tltrain.metrics import compute_metrics
from tltrain.transfer.features import extract_features, fit_classifier, predict_proba


class ColourBlobs:
    """A separable image problem: class c images are brighter in colour channel c. Rank r of `world` gets samples
    r, r+world, ...; its last batch is padded with repeats marked valid=False, as the loaders do."""

    def __init__(self, n, seed, classes=3, batch_size=8, rank=0, world=1, pad=2):
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % classes
        images = torch.randn(n, 3, 32, 32, generator=g) * 0.5
        images[torch.arange(n), labels] += 2.0
        mine = torch.arange(n)[rank::world]
        self.index = torch.cat([mine, mine[:pad]])
        self.valid = torch.cat([torch.ones(len(mine), dtype=torch.bool), torch.zeros(pad, dtype=torch.bool)])
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.iterations = 0

    def __len__(self):
        return -(-len(self.index) // self.batch_size)

    def __iter__(self):
        self.iterations += 1
        for start in range(0, len(self.index), self.batch_size):
            index = self.index[start:start + self.batch_size]
            yield Batch(self.images[index], self.labels[index], [f"s{i}" for i in index.tolist()],
                        self.valid[start:start + self.batch_size])


def _model(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("resnet10t", pretrained=False, num_classes=3)


def test_features_are_pre_logits_with_padding_dropped():
    model = _model()
    data = ColourBlobs(21, seed=0)
    feats, labels, keys = extract_features(model, data, "cpu")
    assert feats.shape == (21, model.num_features) and feats.dtype == np.float32
    assert keys == [f"s{i}" for i in range(21)] and labels.tolist() == data.labels.tolist()
    model.eval()
    with torch.no_grad():  # the classifier on the extracted features gives the model's own logits
        logits = model(data.images)
        from_features = model.get_classifier()(torch.from_numpy(feats))
    assert torch.allclose(logits, from_features, atol=1e-4)


def test_svm_linear_svm_and_logreg_beat_chance_on_separable_classes():
    model = _model()
    train_x, train_y, _ = extract_features(model, ColourBlobs(90, seed=0), "cpu")
    test_x, test_y, _ = extract_features(model, ColourBlobs(45, seed=1), "cpu")
    for kind, kernel in (("svm", "rbf"), ("svm", "linear"), ("logreg", "rbf")):
        classifier = fit_classifier(train_x, train_y, kind=kind, kernel=kernel, seed=0)
        probs = predict_proba(classifier, test_x, num_classes=3)
        assert probs.shape == (45, 3) and np.allclose(probs.sum(1), 1.0)
        metrics = compute_metrics(probs, test_y, referable_threshold=None)
        assert metrics["accuracy"] == pytest.approx(accuracy_score(test_y, probs.argmax(1)))
        assert metrics["accuracy"] > 0.85, (kind, kernel, metrics["accuracy"])  # chance is 1/3


def test_cache_is_reused_and_keyed_by_weights_and_data(tmp_path):
    model = _model()
    model.train()
    data = ColourBlobs(16, seed=0)
    first = extract_features(model, data, "cpu", cache_dir=tmp_path, data_key="train-f100")
    assert model.training  # the caller's mode is restored
    cached = list(tmp_path.glob("features-*.npz"))
    assert len(cached) == 1 and data.iterations == 1
    second = extract_features(model, data, "cpu", cache_dir=tmp_path, data_key="train-f100")
    assert data.iterations == 1  # answered from the file, the model never ran
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]

    extract_features(model, data, "cpu", cache_dir=tmp_path, data_key="train-f050")
    assert data.iterations == 2 and len(list(tmp_path.glob("features-*.npz"))) == 2  # other data: other file
    with torch.no_grad():
        model.get_classifier().weight.add_(1.0)  # changed weights must not read the old features
    extract_features(model, data, "cpu", cache_dir=tmp_path, data_key="train-f100")
    assert data.iterations == 3 and len(list(tmp_path.glob("features-*.npz"))) == 3


def test_classifier_bad_input_and_absent_classes():
    feats = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    labels = np.array([0, 1, 3] * 4)
    with pytest.raises(ConfigError, match="choose one of: logreg, svm"):
        fit_classifier(feats, labels, kind="forest")
    with pytest.raises(DataError, match="only class"):
        fit_classifier(feats, np.zeros(12, dtype=int))
    with pytest.raises(DataError, match="1 training sample"):
        fit_classifier(feats, np.array([0, 1] * 5 + [2, 1]), kind="svm")
    with pytest.raises(DataError, match="do not match"):
        fit_classifier(feats, labels[:5])
    probs = fit_classifier(feats, labels, kind="logreg").predict_proba(feats, num_classes=5)
    assert probs.shape == (12, 5) and np.all(probs[:, [2, 4]] == 0) and np.allclose(probs.sum(1), 1.0)


def _extract_worker(rank, world, port, weights, cache_dir, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    model.load_state_dict(torch.load(weights, weights_only=True))
    data = ColourBlobs(21, seed=0, rank=rank, world=world, pad=3 if rank else 2)  # 11 + 10 real samples
    first = extract_features(model, data, "cpu", cache_dir=cache_dir, data_key="val")
    dist.barrier()  # rank 0 has written the cache: the rerun must read it on every rank
    second = extract_features(model, data, "cpu", cache_dir=cache_dir, data_key="val")
    queue.put((rank, first, np.array_equal(first[0], second[0]) and first[2] == second[2], data.iterations))
    dist.destroy_process_group()


def test_two_ranks_gather_every_sample_once_and_share_the_cache(tmp_path):
    model = _model()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    single = extract_features(model, ColourBlobs(21, seed=0), "cpu")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_extract_worker, args=(r, 2, port, tmp_path / "weights.pt", tmp_path / "cache", queue))
             for r in range(2)]
    for p in procs:
        p.start()
    results = {rank: rest for rank, *rest in (queue.get(timeout=180) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    order = {key: i for i, key in enumerate(single[2])}
    for rank, (gathered, reused, iterations) in results.items():
        feats, labels, keys = gathered
        assert sorted(keys) == sorted(single[2]) and len(keys) == 21  # every sample once, padding dropped
        rows = [order[k] for k in keys]
        assert np.allclose(feats, single[0][rows], atol=1e-5) and np.array_equal(labels, single[1][rows])
        assert reused and iterations == 1, rank  # the second call on each rank came from the cache file
    assert len(list((tmp_path / "cache").glob("features-*.npz"))) == 1
