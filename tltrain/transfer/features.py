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

from tltrain import safe_io
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
        with safe_io.atomic_open(cache, "wb") as handle:  # a new file renamed into place: no planted link followed
            np.savez(handle, features=result[0], labels=result[1], keys=np.array(result[2], dtype=str))
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
HEAD_FORMAT = "tltrain-feature-head/1"


class FeatureClassifier:
    """A fitted feature head held as plain arrays, predicting with numpy; saved as safetensors + JSON.

    scikit-learn fits the head (fit_classifier); its learned numbers are copied out here: the scaler's mean and
    scale, the decision function (linear: coefficients and intercepts; rbf SVM: support vectors, dual
    coefficients, intercepts, gamma), and the Platt calibration (one sigmoid a, b per class). Predictions use
    only these arrays, both right after fitting and after `load_classifier`, so the metrics a run reports are
    exactly those of the saved head, and loading it runs no code (no pickle/joblib).
    Probabilities cover every class index, also classes absent from the training labels (compute_metrics needs
    [N, num_classes]).
    """

    def __init__(self, meta: dict, arrays: dict[str, np.ndarray]):
        self.meta, self.arrays = meta, arrays
        self.classes_ = np.asarray(meta["classes"], dtype=np.int64)

    # -- prediction -------------------------------------------------------------------------------------------
    def decision_function(self, features: np.ndarray) -> np.ndarray:
        """scikit-learn's decision_function of the fitted estimator: [N] for two classes, else [N, classes]."""
        a = self.arrays
        z = (np.asarray(features, dtype=np.float64) - a["scaler_mean"]) / a["scaler_scale"]
        if self.meta["kernel"] != "rbf":
            scores = z @ a["coef"].T + a["intercept"]
            return scores[:, 0] if scores.shape[1] == 1 else scores
        sv = a["support_vectors"]
        sq = (z * z).sum(1)[:, None] + (sv * sv).sum(1)[None, :] - 2.0 * (z @ sv.T)
        kernel = np.exp(-self.meta["gamma"] * np.maximum(sq, 0.0))  # [N, support vectors]
        n_classes = len(self.classes_)
        if n_classes == 2:
            return kernel @ a["dual_coef"][0] + a["intercept"][0]
        return _ovr_from_ovo(_ovo_scores(kernel, a["dual_coef"], a["intercept"], a["n_support"]), n_classes)

    def _proba_seen(self, features: np.ndarray) -> np.ndarray:
        """Probabilities over the training classes, as the scikit-learn estimator computes them."""
        from scipy.special import expit, softmax

        scores = self.decision_function(features)
        n_classes = len(self.classes_)
        if self.meta["kind"] == "logreg":
            if n_classes == 2:
                positive = expit(scores)
                return np.stack([1.0 - positive, positive], axis=1)
            return softmax(scores, axis=1)
        a, b = self.arrays["sigmoid_a"], self.arrays["sigmoid_b"]  # Platt calibration, one-vs-rest
        if n_classes == 2:
            positive = expit(-(a[0] * scores + b[0]))
            proba = np.stack([1.0 - positive, positive], axis=1)
        else:
            proba = expit(-(a[None, :] * scores + b[None, :]))
            total = proba.sum(1, keepdims=True)
            proba = np.divide(proba, total, out=np.full_like(proba, 1.0 / n_classes), where=total != 0)
        proba[(proba > 1.0) & (proba <= 1.0 + 1e-5)] = 1.0
        return proba

    def predict_proba(self, features: np.ndarray, num_classes: int | None = None) -> np.ndarray:
        probs = self._proba_seen(features)
        n = max(num_classes or 0, int(self.classes_.max()) + 1)
        full = np.zeros((len(probs), n), dtype=np.float64)
        full[:, self.classes_] = probs
        return full

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.classes_[self._proba_seen(features).argmax(1)]

    # -- files ------------------------------------------------------------------------------------------------
    def save(self, stem: str | Path) -> tuple[Path, Path]:
        """Write <stem>.safetensors (the arrays) and <stem>.json (kind, kernel, gamma, classes, format)."""
        from safetensors.numpy import save

        from tltrain.engine.checkpoint import atomic_write_bytes, atomic_write_json

        stem = Path(stem)
        tensors, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
        atomic_write_bytes(tensors, save({k: np.ascontiguousarray(v) for k, v in self.arrays.items()}))
        atomic_write_json(meta, {**self.meta, "format": HEAD_FORMAT, "arrays": tensors.name})
        return tensors, meta


def load_classifier(path: str | Path) -> FeatureClassifier:
    """A head saved by FeatureClassifier.save, from its .json, its .safetensors, their stem or the run folder.

    Only JSON and safetensors are read. A legacy pickled head (classifier.joblib) is refused: rerun the
    features run to re-fit it from the cached features (seconds) in this format.
    """
    from safetensors.numpy import load_file

    from tltrain.safe_load import PickleRefused, check_safetensors_header

    path = Path(path)
    stem = path / "classifier" if path.is_dir() else path.with_suffix("")
    meta_path = stem.with_suffix(".json")
    if not meta_path.is_file():
        for legacy in (path, stem.with_suffix(".joblib"), stem.with_suffix(".pkl")):
            if legacy.is_file() and legacy.suffix in (".joblib", ".pkl"):
                raise PickleRefused(f"{legacy}: refused to load: a joblib/pickle head holds pickled Python objects "
                                    "that could run code on this machine; rerun its features_svm/features_logreg "
                                    "run to re-fit the head from the cached features as classifier.safetensors "
                                    "+ classifier.json")
        raise DataError(f"{meta_path}: not found (a features run writes classifier.json + classifier.safetensors)")
    meta = safe_io.load_json(meta_path, 1 << 20, "classifier metadata")  # bounded: a head's JSON is a few hundred bytes
    if not isinstance(meta, dict) or meta.get("format") != HEAD_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{meta_path}: format {safe_io.printable(repr(found), 100)}, expected {HEAD_FORMAT}")
    arrays_name = safe_io.plain_name(meta.get("arrays", stem.name + ".safetensors"), None, str(meta_path), "arrays")
    arrays_path = safe_io.inside(meta_path.parent, arrays_name, "arrays")
    if arrays_path.exists():
        check_safetensors_header(arrays_path)  # before safetensors parses a header of any size
    try:
        arrays = load_file(str(arrays_path))
    except Exception as exc:  # missing, corrupt or foreign file: name it
        raise DataError(f"{arrays_path}: cannot read the classifier arrays ({type(exc).__name__}: {exc})") from None
    needed = {"scaler_mean", "scaler_scale", "intercept"} | (
        {"support_vectors", "dual_coef", "n_support"} if meta.get("kernel") == "rbf" else {"coef"}) | (
        {"sigmoid_a", "sigmoid_b"} if meta.get("kind") == "svm" else set())
    if missing := sorted(needed - set(arrays)):
        raise DataError(f"{arrays_path}: missing arrays {', '.join(missing)}")
    return FeatureClassifier({k: v for k, v in meta.items() if k not in ("format", "arrays")}, arrays)


def _ovo_scores(kernel: np.ndarray, dual_coef: np.ndarray, intercept: np.ndarray, n_support: np.ndarray) -> np.ndarray:
    """libsvm's one-vs-one decision values [N, K(K-1)/2] for pairs (0,1), (0,2), ..., (1,2), ...

    Support vectors are grouped by class; for the pair (i, j) the coefficients of class i's vectors sit in
    dual_coef row j-1 and those of class j's vectors in row i (scikit-learn's SVC layout).
    """
    bounds = np.concatenate([[0], np.cumsum(n_support)])
    n_classes, columns, pair = len(n_support), [], 0
    for i in range(n_classes):
        for j in range(i + 1, n_classes):
            si, sj = slice(bounds[i], bounds[i + 1]), slice(bounds[j], bounds[j + 1])
            columns.append(kernel[:, si] @ dual_coef[j - 1, si] + kernel[:, sj] @ dual_coef[i, sj] + intercept[pair])
            pair += 1
    return np.stack(columns, axis=1)


def _ovr_from_ovo(ovo: np.ndarray, n_classes: int) -> np.ndarray:
    """scikit-learn's one-vs-rest shape of one-vs-one scores: votes plus confidences squashed below 1/3."""
    votes = np.zeros((len(ovo), n_classes))
    confidence = np.zeros((len(ovo), n_classes))
    pair = 0
    for i in range(n_classes):
        for j in range(i + 1, n_classes):
            confidence[:, i] += ovo[:, pair]
            confidence[:, j] -= ovo[:, pair]
            votes[ovo[:, pair] >= 0, i] += 1
            votes[ovo[:, pair] < 0, j] += 1
            pair += 1
    return votes + confidence / (3 * (np.abs(confidence) + 1))


def fit_classifier(features: np.ndarray, labels: np.ndarray, kind: str = "svm", C: float = 1.0, seed: int = 0,
                   kernel: str = "rbf") -> FeatureClassifier:
    """StandardScaler + SVM (rbf SVC or LinearSVC, Platt-calibrated probabilities) or logistic regression.

    Classes are weighted by inverse frequency (DR grades are imbalanced). SVM probabilities come from
    CalibratedClassifierCV (SVC(probability=True) is deprecated in scikit-learn 1.9), which needs >= 2
    training samples per class. The rbf width is scikit-learn's gamma="scale" (1 / (features * variance) of the
    scaled training features), computed once here so it is a saved number.
    """
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, LinearSVC

    if kind not in CLASSIFIERS:
        raise choices_error("classifier kind", kind, CLASSIFIERS)
    if kernel not in SVM_KERNELS:
        raise choices_error("schedule.svm_kernel", kernel, SVM_KERNELS)
    features, labels = np.asarray(features, dtype=np.float64), np.asarray(labels)
    if features.ndim != 2 or len(features) != len(labels):
        raise DataError(f"fit_classifier: features {features.shape} and labels {labels.shape} do not match")
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise DataError(f"fit_classifier: the training features hold only class {classes.tolist()}; need >= 2")
    scaler = StandardScaler().fit(features)
    scaled = scaler.transform(features)
    arrays = {"scaler_mean": scaler.mean_, "scaler_scale": scaler.scale_}
    meta = {"kind": kind, "kernel": None if kind == "logreg" else kernel, "gamma": None, "C": C, "seed": seed,
            "classes": classes.tolist(), "n_features": int(features.shape[1])}
    if kind == "logreg":
        head = LogisticRegression(C=C, max_iter=5000, class_weight="balanced").fit(scaled, labels)
        arrays.update(coef=head.coef_, intercept=head.intercept_)
        return FeatureClassifier(meta, _float_arrays(arrays))
    if counts.min() < 2:
        rare = classes[counts < 2].tolist()
        raise DataError(f"fit_classifier: class(es) {rare} have 1 training sample; SVM probability "
                        "calibration needs >= 2 per class (use features_logreg or more data)")
    if kernel == "rbf":
        variance = scaled.var()
        meta["gamma"] = float(1.0 / (scaled.shape[1] * variance)) if variance != 0 else 1.0
        svm = SVC(C=C, kernel="rbf", gamma=meta["gamma"], class_weight="balanced", random_state=seed)
    else:
        svm = LinearSVC(C=C, class_weight="balanced", random_state=seed, max_iter=5000)
    folds = StratifiedKFold(min(MAX_CALIBRATION_FOLDS, int(counts.min())), shuffle=True, random_state=seed)
    calibrated = CalibratedClassifierCV(svm, method="sigmoid", cv=folds, ensemble=False).fit(scaled, labels)
    fitted = calibrated.calibrated_classifiers_[0]  # ensemble=False: one estimator fitted on all the data
    estimator = fitted.estimator
    if kernel == "rbf":
        arrays.update(support_vectors=estimator.support_vectors_, dual_coef=estimator.dual_coef_,
                      intercept=estimator.intercept_, n_support=estimator.n_support_.astype(np.int64))
    else:
        arrays.update(coef=estimator.coef_, intercept=estimator.intercept_)
    arrays.update(sigmoid_a=np.array([c.a_ for c in fitted.calibrators], dtype=np.float64),
                  sigmoid_b=np.array([c.b_ for c in fitted.calibrators], dtype=np.float64))
    return FeatureClassifier(meta, _float_arrays(arrays))


def _float_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """C-ordered float64 copies (int64 for counts), as they come back from safetensors: same layout, same sums."""
    return {k: np.ascontiguousarray(v, dtype=np.int64 if v.dtype.kind in "iu" else np.float64)
            for k, v in arrays.items()}


def predict_proba(classifier: FeatureClassifier, features: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Probabilities [N, num_classes] for tltrain.metrics.compute_metrics."""
    return classifier.predict_proba(features, num_classes)
