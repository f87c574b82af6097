"""Frozen features + SVM / logistic regression: predictions, metrics, and the feature cache."""
import numpy as np
import timm
import torch

from tltrain.data.loaders.batch import Batch
from tltrain.metrics import compute_metrics
from tltrain.transfer.features import extract_features, fit_classifier


class _TwoBlobs:
    """A separable two-class image problem: class 1 images are brighter in the red channel."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 2
        self.images = torch.randn(n, 3, 32, 32, generator=g) * 0.5
        self.images[:, 0] += self.labels.view(-1, 1, 1).float() * 2.0

    def __iter__(self):
        for i in range(0, len(self.labels), 8):
            labels = self.labels[i:i + 8]
            valid = torch.ones(len(labels), dtype=torch.bool)
            valid[-1] = i + 8 < len(self.labels)  # the last sample of the set is padding
            yield Batch(self.images[i:i + 8], labels, [f"s{j}" for j in range(i, i + len(labels))], valid)


def test_svm_and_logreg_on_frozen_features(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=2)
    train_x, train_y, keys = extract_features(model, _TwoBlobs(64, 0), "cpu", cache_dir=tmp_path / "train")
    assert train_x.shape[0] == 63 and len(keys) == 63  # padding dropped
    test_x, test_y, _ = extract_features(model, _TwoBlobs(40, 1), "cpu")
    for kind in ("svm", "logreg"):
        classifier = fit_classifier(train_x, train_y, kind=kind)
        probs = classifier.predict_proba(test_x, num_classes=2)
        metrics = compute_metrics(probs, test_y, referable_threshold=None)
        assert metrics["accuracy"] > 0.85, (kind, metrics["accuracy"])


def test_feature_cache_is_reused(tmp_path):
    model = timm.create_model("resnet10t", pretrained=False, num_classes=2)
    first = extract_features(model, _TwoBlobs(16, 0), "cpu", cache_dir=tmp_path)
    assert (tmp_path / "features.npz").exists()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # a changed model would give other features: the cache must answer instead
    second = extract_features(model, _TwoBlobs(16, 0), "cpu", cache_dir=tmp_path)
    assert np.array_equal(first[0], second[0]) and first[2] == second[2]
