"""Frozen CNN features + a scikit-learn classifier (Li et al. 2017, method 3).

Each rank extracts the pooled pre-logit features of its share of the data (timm's forward_features +
forward_head(pre_logits=True)), padding dropped; the parts are gathered so every rank holds the whole set, and
the result is cached as .npz so a rerun (or another classifier on the same features) skips the CNN.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@torch.no_grad()
def extract_features(model: nn.Module, loader, device, cache_dir: str | Path | None = None):
    """(features [N, D] float32, labels [N], keys) over the whole loader, from all ranks."""
    cache = Path(cache_dir) / "features.npz" if cache_dir else None
    if cache is not None and cache.exists():
        data = np.load(cache, allow_pickle=False)
        return data["features"], data["labels"], data["keys"].tolist()
    model.eval()
    feats, labels, keys = [], [], []
    for batch in loader:
        images = batch.images.to(device).float()
        pooled = model.forward_head(model.forward_features(images), pre_logits=True)
        mask = batch.valid.cpu().numpy().astype(bool)
        feats.append(pooled.float().cpu().numpy()[mask])
        labels.append(batch.labels.cpu().numpy()[mask])
        keys += [k for k, keep in zip(batch.keys, mask) if keep]
    local = (np.concatenate(feats), np.concatenate(labels), keys)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
        local = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                 [k for p in parts for k in p[2]])
    if cache is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, features=local[0], labels=local[1], keys=np.array(local[2]))
        tmp.replace(cache)
    return local


def fit_classifier(features: np.ndarray, labels: np.ndarray, kind: str = "svm", C: float = 1.0, seed: int = 0):
    """Standardised features -> RBF SVM with calibrated probabilities, or multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if kind == "svm":
        head = SVC(C=C, kernel="rbf", probability=True, class_weight="balanced", random_state=seed)
    elif kind == "logreg":
        head = LogisticRegression(C=C, max_iter=5000, class_weight="balanced")
    else:
        raise ValueError(f"classifier kind {kind!r}: use svm or logreg")
    return _FullProba(make_pipeline(StandardScaler(), head).fit(features, labels))


class _FullProba:
    """predict_proba over every class index, also those absent from the training labels (metrics need [N, C])."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def predict_proba(self, features: np.ndarray, num_classes: int | None = None) -> np.ndarray:
        probs = self.pipeline.predict_proba(features)
        classes = self.pipeline.classes_
        n = max(num_classes or 0, int(classes.max()) + 1)
        full = np.zeros((len(features), n), dtype=np.float64)
        full[:, classes] = probs
        return full

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.pipeline.predict(features)
