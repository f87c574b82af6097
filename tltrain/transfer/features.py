"""Frozen CNN features + a scikit-learn classifier (Li et al. 2017, method 3).

Each rank extracts the pooled pre-logit features of its share of the data (timm's forward_features +
forward_head(pre_logits=True)), padding dropped; the parts are gathered so every rank holds the whole set. The
result is cached as .npz under a name keyed by a hash of the weights and of the data, so a rerun (or another
classifier on the same features) skips the CNN, and changed weights or data never read a stale file.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from tltrain.errors import DataError, choices_error

CLASSIFIERS = ("svm", "logreg")
from tltrain.transfer.schedule_config import SVM_KERNELS  # noqa: E402 (shared with the config)
MAX_CALIBRATION_FOLDS = 5  # as libsvm's own probability estimates


# -- extraction -------------------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(model: nn.Module, loader, device, cache_dir: str | Path | None = None,
                     data_key: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(features [N, D] float32, labels [N] int64, keys) over the whole loader, from all ranks, padding dropped.

    With cache_dir, the result is read from / written to cache_dir/features-<hash>.npz, the hash covering the
    weights and `data_key` (pass what identifies the images: manifest hash, split, fraction, preprocessing; by
    default the loader's shard list and config).
    """
    model = getattr(model, "module", model)  # DDP / DeepSpeed wrappers: the timm model inside
    cache = feature_cache_path(cache_dir, model, data_key or _describe_loader(loader)) if cache_dir else None
    if cache is not None and _all_ranks(cache.exists()):
        data = np.load(cache, allow_pickle=False)
        return data["features"], data["labels"], data["keys"].tolist()
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    feats, labels, keys = [], [], []
    for batch in loader:
        images = batch.images.to(device=device, dtype=dtype, non_blocking=True)
        pooled = model.forward_head(model.forward_features(images), pre_logits=True)
        keep = batch.valid.cpu().numpy().astype(bool)
        feats.append(pooled.float().cpu().numpy()[keep])
        labels.append(batch.labels.cpu().numpy()[keep])
        keys += [k for k, kept in zip(batch.keys, keep) if kept]
    model.train(was_training)
    if not feats:
        raise DataError(f"extract_features: the {type(loader).__name__} yielded no batches")
    result = (np.concatenate(feats), np.concatenate(labels).astype(np.int64), keys)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, result)
        result = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                  [k for p in parts for k in p[2]])
    if cache is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.stem + ".tmp.npz")  # np.savez keeps a name that already ends in .npz
        np.savez(tmp, features=result[0], labels=result[1], keys=np.array(result[2], dtype=str))
        tmp.replace(cache)
    return result


def feature_cache_path(cache_dir: str | Path, model: nn.Module, data_key: str) -> Path:
    """cache_dir/features-<16 hex digits of sha256(model class, every weight and buffer, data_key)>.npz."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    digest.update(data_key.encode())
    return Path(cache_dir) / f"features-{digest.hexdigest()[:16]}.npz"


def _describe_loader(loader) -> str:
    """A default data key: loader type, batches, shard files and counts, and its config (size, preprocessing)."""
    shards = [(s.get("url"), s.get("count")) for s in getattr(loader, "shards", []) if isinstance(s, dict)]
    batches = len(loader) if hasattr(loader, "__len__") else None
    return repr((type(loader).__name__, batches, shards, getattr(loader, "cfg", None)))


def _all_ranks(flag: bool) -> bool:
    """True only when the flag holds on every rank (all ranks must take the same path or the gather hangs)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    flags: list = [None] * dist.get_world_size()
    dist.all_gather_object(flags, bool(flag))
    return all(flags)


# -- classifiers ------------------------------------------------------------------------------------------------
class FeatureClassifier:
    """A fitted scikit-learn pipeline whose probabilities cover every class index, also classes absent from the
    training labels (compute_metrics needs [N, num_classes])."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.classes_ = pipeline.classes_

    def predict_proba(self, features: np.ndarray, num_classes: int | None = None) -> np.ndarray:
        probs = self.pipeline.predict_proba(np.asarray(features, dtype=np.float32))
        n = max(num_classes or 0, int(self.classes_.max()) + 1)
        full = np.zeros((len(probs), n), dtype=np.float64)
        full[:, self.classes_] = probs
        return full

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.pipeline.predict(np.asarray(features, dtype=np.float32))


def fit_classifier(features: np.ndarray, labels: np.ndarray, kind: str = "svm", C: float = 1.0, seed: int = 0,
                   kernel: str = "rbf") -> FeatureClassifier:
    """StandardScaler + SVM (rbf SVC or LinearSVC, Platt-calibrated probabilities) or logistic regression.

    Classes are weighted by inverse frequency (DR grades are imbalanced). SVM probabilities come from
    CalibratedClassifierCV (SVC(probability=True) is deprecated in scikit-learn 1.9), which needs >= 2
    training samples per class.
    """
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, LinearSVC

    if kind not in CLASSIFIERS:
        raise choices_error("classifier kind", kind, CLASSIFIERS)
    if kernel not in SVM_KERNELS:
        raise choices_error("schedule.svm_kernel", kernel, SVM_KERNELS)
    features, labels = np.asarray(features, dtype=np.float32), np.asarray(labels)
    if features.ndim != 2 or len(features) != len(labels):
        raise DataError(f"fit_classifier: features {features.shape} and labels {labels.shape} do not match")
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise DataError(f"fit_classifier: the training features hold only class {classes.tolist()}; need >= 2")
    if kind == "logreg":
        head = LogisticRegression(C=C, max_iter=5000, class_weight="balanced")
    else:
        if counts.min() < 2:
            rare = classes[counts < 2].tolist()
            raise DataError(f"fit_classifier: class(es) {rare} have 1 training sample; SVM probability "
                            "calibration needs >= 2 per class (use features_logreg or more data)")
        svm = (SVC(C=C, kernel="rbf", class_weight="balanced", random_state=seed) if kernel == "rbf"
               else LinearSVC(C=C, class_weight="balanced", random_state=seed, max_iter=5000))
        folds = StratifiedKFold(min(MAX_CALIBRATION_FOLDS, int(counts.min())), shuffle=True, random_state=seed)
        head = CalibratedClassifierCV(svm, method="sigmoid", cv=folds, ensemble=False)
    return FeatureClassifier(make_pipeline(StandardScaler(), head).fit(features, labels))


def predict_proba(classifier: FeatureClassifier, features: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Probabilities [N, num_classes] for tltrain.metrics.compute_metrics."""
    return classifier.predict_proba(features, num_classes)
