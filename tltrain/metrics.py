"""Diabetic-retinopathy metrics, computed once on predictions gathered from every rank.

Metrics are computed from the full set of predictions (not averaged per rank or per batch), because kappa, AUC
and sensitivity are not means of per-batch values. Padding samples (valid=False, added so every rank runs the
same number of batches) are dropped before computing, so no image is counted twice.
scikit-learn does the arithmetic; this module only decides what to compute and guards the degenerate cases.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import cohen_kappa_score, confusion_matrix, log_loss, roc_auc_score

#: Grade at and above which DR is "referable" (moderate NPDR or worse) in the 5-grade EyePACS scale.
REFERABLE_GRADE = 2


def referable_threshold_for(num_classes: int, referable_threshold: int | None = REFERABLE_GRADE) -> int | None:
    """The grade from which an image counts as referable, or None when the referable metrics do not apply: they
    are computed for the 5-grade DR scale (threshold 2) or when another threshold is given explicitly."""
    return referable_threshold if (num_classes == 5 or referable_threshold != REFERABLE_GRADE) else None


#: The metrics every run reports, and those only some runs have (see run_metrics).
COMMON_METRICS = ("accuracy", "kappa", "auc", "cross_entropy")
TOP2_METRICS = ("top2_accuracy",)
REFERABLE_METRICS = ("sensitivity", "specificity", "referable_auc")


def run_metrics(num_classes: int, referable_threshold: int | None = REFERABLE_GRADE) -> tuple[str, ...]:
    """The scalar metrics a run with `num_classes` grades reports: the one rule behind compute_metrics, the
    trainer's choice of best_metric and the model card's table. Top-2 accuracy needs more than two classes (with
    two, the top two are every class); the referable ones need a referable threshold (referable_threshold_for)."""
    names = COMMON_METRICS + (TOP2_METRICS if num_classes > 2 else ())
    if referable_threshold_for(num_classes, referable_threshold) is not None:
        names += REFERABLE_METRICS
    return names


def compute_metrics(probs: np.ndarray, labels: np.ndarray, referable_threshold: int | None = REFERABLE_GRADE) -> dict:
    """Accuracy, top-2 accuracy (more than 2 classes), quadratic kappa, confusion, referable sensitivity/specificity,
    AUC, cross-entropy.

    probs: [N, C] class probabilities (rows sum to 1); labels: [N] integer grades in [0, C).
    Referable sensitivity/specificity are reported for 5-class problems (threshold 2) or when a threshold is
    given explicitly for another class count; pass referable_threshold=None to leave them out.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probs must be [N, C] matching labels [N]; got {probs.shape} and {labels.shape}")
    num_classes = probs.shape[1]
    class_ids = list(range(num_classes))
    if len(labels) == 0:
        return {"count": 0}
    predicted = probs.argmax(axis=1)
    out = {
        "count": int(len(labels)),
        "accuracy": float((predicted == labels).mean()),
        "kappa": _quadratic_kappa(labels, predicted, class_ids),
        "confusion": confusion_matrix(labels, predicted, labels=class_ids).tolist(),
        "cross_entropy": float(log_loss(labels, _normalised(probs), labels=class_ids)),
        "auc": _macro_auc(probs, labels, class_ids),
    }
    reported = run_metrics(num_classes, referable_threshold)
    if "top2_accuracy" in reported:
        top2 = np.argsort(-probs, axis=1)[:, :2]
        out["top2_accuracy"] = float((top2 == labels[:, None]).any(axis=1).mean())
    if "referable_auc" in reported:
        threshold = referable_threshold_for(num_classes, referable_threshold)
        out.update(_referable(labels, predicted, threshold))
        out["referable_auc"] = _referable_auc(probs, labels, threshold)
    return out


def per_source_metrics(probs: np.ndarray, labels: np.ndarray, keys: list[str], source_of: dict[str, str],
                       referable_threshold: int | None = REFERABLE_GRADE) -> dict[str, dict]:
    """compute_metrics per source (source_of: key -> source name), in name order: a model pooled over EyePACS,
    APTOS and Messidor-2 may be good on one and poor on another, which the pooled figure hides."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    names = np.array([source_of.get(key, "unknown") for key in keys])
    return {name: compute_metrics(probs[names == name], labels[names == name], referable_threshold)
            for name in sorted(set(names.tolist()))}


def _normalised(probs: np.ndarray) -> np.ndarray:
    """Rows clipped away from 0 and re-summed to 1 (float32 softmax rows are off by ~1e-7; sklearn warns)."""
    probs = np.clip(probs, 1e-15, 1.0)
    return probs / probs.sum(axis=1, keepdims=True)


def _quadratic_kappa(labels: np.ndarray, predicted: np.ndarray, class_ids: list[int]) -> float:
    # sklearn returns NaN (with a warning) when both raters use a single identical class; kappa is then 0 agreement
    # beyond chance by convention, but we keep NaN out of logs/JSON and report 0.0.
    if len(np.unique(np.concatenate([labels, predicted]))) < 2:
        return 0.0
    value = cohen_kappa_score(labels, predicted, weights="quadratic", labels=class_ids)
    return 0.0 if math.isnan(value) else float(value)


def _macro_auc(probs: np.ndarray, labels: np.ndarray, class_ids: list[int]) -> float:
    """Macro one-vs-rest AUC over the classes present with at least one negative; NaN if none qualifies."""
    scores = []
    for c in class_ids:
        positives = labels == c
        if positives.all() or not positives.any():
            continue  # AUC undefined for this class in this set
        scores.append(roc_auc_score(positives, probs[:, c]))
    return float(np.mean(scores)) if scores else float("nan")


def _referable(labels: np.ndarray, predicted: np.ndarray, threshold: int) -> dict:
    truth, guess = labels >= threshold, predicted >= threshold
    positives, negatives = truth.sum(), (~truth).sum()
    return {
        "sensitivity": float((truth & guess).sum() / positives) if positives else float("nan"),
        "specificity": float((~truth & ~guess).sum() / negatives) if negatives else float("nan"),
    }


def _referable_auc(probs: np.ndarray, labels: np.ndarray, threshold: int) -> float:
    """AUC of P(grade >= threshold) (summed class probabilities) against the truth; NaN if one side is empty."""
    truth = labels >= threshold
    if truth.all() or not truth.any():
        return float("nan")
    return float(roc_auc_score(truth, probs[:, threshold:].sum(axis=1)))


class PredictionGatherer:
    """Collects per-batch predictions on each rank; `gather()` returns all ranks' valid samples on every rank.

    Ranks may hold different numbers of samples (the last batch is padded, padding is dropped here), so arrays are
    exchanged with all_gather_object rather than fixed-size tensor collectives.
    """

    def __init__(self):
        self._probs: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._keys: list[str] = []

    def add(self, probs: torch.Tensor, labels: torch.Tensor, keys: list[str],
            valid: torch.Tensor | None = None) -> None:
        probs_np = probs.detach().float().cpu().numpy()
        labels_np = labels.detach().cpu().numpy()
        mask = np.ones(len(labels_np), bool) if valid is None else valid.detach().cpu().numpy().astype(bool)
        self._probs.append(probs_np[mask])
        self._labels.append(labels_np[mask])
        self._keys.extend(k for k, keep in zip(keys, mask) if keep)

    def local(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        if not self._probs:
            return np.zeros((0, 0)), np.zeros(0, np.int64), []
        return np.concatenate(self._probs), np.concatenate(self._labels), list(self._keys)

    def gather(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """All ranks' (probs, labels, keys), concatenated in rank order; duplicates by key are dropped."""
        probs, labels, keys = self.local()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return probs, labels, keys
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (probs, labels, keys))
        parts = [p for p in parts if len(p[2])]
        if not parts:
            return probs, labels, keys
        all_probs = np.concatenate([p[0] for p in parts])
        all_labels = np.concatenate([p[1] for p in parts])
        all_keys = [k for p in parts for k in p[2]]
        # A sharded reader can hand the same sample to two ranks when the set does not divide evenly; count it once.
        _, first = np.unique(np.asarray(all_keys, dtype=object).astype(str), return_index=True)
        first.sort()
        return all_probs[first], all_labels[first], [all_keys[i] for i in first]


def gathered_metrics(gatherer: PredictionGatherer, referable_threshold: int | None = REFERABLE_GRADE) -> dict:
    """compute_metrics over the predictions of every rank (valid samples only)."""
    probs, labels, _ = gatherer.gather()
    if len(labels) == 0:
        return {"count": 0}
    return compute_metrics(probs, labels, referable_threshold)


# -- per-image predictions ---------------------------------------------------------------------------------------
def write_predictions_csv(path, keys: list[str], labels: np.ndarray, probs: np.ndarray) -> None:
    """One row per image: key, label, predicted class, p_0..p_{C-1} (the probabilities the metrics were computed on).

    Written atomically, so a reader never sees half a file."""
    import csv
    import io

    from tltrain.safe_io import atomic_write_bytes

    probs = np.asarray(probs, dtype=np.float64)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["key", "label", "predicted", *[f"p_{c}" for c in range(probs.shape[1] if probs.ndim == 2 else 0)]])
    for key, label, row in zip(keys, np.asarray(labels).astype(np.int64), probs):
        writer.writerow([key, int(label), int(row.argmax()), *[repr(float(p)) for p in row]])
    atomic_write_bytes(path, buffer.getvalue().encode())


def read_predictions_csv(path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(keys, labels [N], probabilities [N, C]) from a file written by write_predictions_csv."""
    import pandas as pd

    frame = pd.read_csv(path, dtype={"key": str})
    columns = sorted((c for c in frame.columns if c.startswith("p_")), key=lambda c: int(c[2:]))
    return frame["key"].tolist(), frame["label"].to_numpy(np.int64), frame[columns].to_numpy(np.float64)


# -- confidence intervals ----------------------------------------------------------------------------------------
BOOTSTRAP_METHOD = ("stratified percentile bootstrap: each resample draws, within every true grade, as many "
                    "images as that grade has (with replacement), so class counts stay fixed")


class _WeightedMetrics:
    """Kappa, AUCs, sensitivity and specificity of one prediction set under per-image weights (how often a
    bootstrap resample drew each image).

    Written with numpy because a thousand resamples through scikit-learn's validated entry points take minutes;
    the point estimates come from compute_metrics (scikit-learn) and tests check these against it."""

    def __init__(self, probs: np.ndarray, labels: np.ndarray, referable_threshold: int | None):
        self.labels, self.num_classes = labels, probs.shape[1]
        self.predicted = probs.argmax(axis=1)
        self.cells = labels * self.num_classes + self.predicted
        grid = np.arange(self.num_classes)
        self.kappa_weights = ((grid[:, None] - grid[None, :]) ** 2).astype(np.float64)
        self.threshold = referable_threshold
        self.rankings = {c: self._ranking(probs[:, c], labels == c) for c in range(self.num_classes)}
        if referable_threshold is not None:
            self.rankings["referable"] = self._ranking(probs[:, referable_threshold:].sum(axis=1),
                                                       labels >= referable_threshold)

    @staticmethod
    def _ranking(scores: np.ndarray, truth: np.ndarray):
        """Tie groups of the scores in ascending order: AUC counts a tie as half a correct pair (as roc_auc_score)."""
        _, group = np.unique(scores, return_inverse=True)
        return group.reshape(-1), truth

    @staticmethod
    def _auc(ranking, weights: np.ndarray) -> float:
        group, truth = ranking
        groups = group.max() + 1
        positives = np.bincount(group, weights * truth, minlength=groups)
        negatives = np.bincount(group, weights * ~truth, minlength=groups)
        pairs = positives.sum() * negatives.sum()
        if pairs == 0:
            return float("nan")
        below = np.cumsum(negatives) - negatives
        return float((positives * (below + 0.5 * negatives)).sum() / pairs)

    def __call__(self, weights: np.ndarray) -> dict[str, float]:
        c = self.num_classes
        confusion = np.bincount(self.cells, weights, minlength=c * c).reshape(c, c)
        expected = np.outer(confusion.sum(axis=1), confusion.sum(axis=0)) / confusion.sum()
        disagreement = (self.kappa_weights * expected).sum()
        out = {"kappa": float(1 - (self.kappa_weights * confusion).sum() / disagreement) if disagreement else 0.0}
        aucs = [self._auc(self.rankings[k], weights) for k in range(c) if 0 < weights[self.labels == k].sum() <
                weights.sum()]
        out["auc"] = float(np.mean(aucs)) if aucs else float("nan")
        if self.threshold is not None:
            truth, guess = self.labels >= self.threshold, self.predicted >= self.threshold
            positives, negatives = weights[truth].sum(), weights[~truth].sum()
            out["sensitivity"] = float(weights[truth & guess].sum() / positives) if positives else float("nan")
            out["specificity"] = float(weights[~truth & ~guess].sum() / negatives) if negatives else float("nan")
            out["referable_auc"] = self._auc(self.rankings["referable"], weights)
        return out


def bootstrap_ci(probs: np.ndarray, labels: np.ndarray, referable_threshold: int | None = REFERABLE_GRADE,
                 resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Point estimate (compute_metrics) and percentile confidence interval of quadratic kappa, macro AUC and,
    with a referable threshold, referable sensitivity, specificity and AUC (P(grade >= threshold) against the
    truth), by a seeded stratified bootstrap (BOOTSTRAP_METHOD).

    Returns {metric: {"value", "low", "high"}, "method", "resamples", "confidence", "seed", "referable_threshold"}.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if len(labels) == 0:
        return {}
    if referable_threshold is not None and not 0 < referable_threshold < probs.shape[1]:
        referable_threshold = None
    point = compute_metrics(probs, labels, referable_threshold)
    weighted = _WeightedMetrics(probs, labels, referable_threshold)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    draws = []
    for _ in range(resamples):
        index = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        draws.append(weighted(np.bincount(index, minlength=len(labels)).astype(np.float64)))
    tail = (1 - confidence) / 2 * 100
    out: dict = {"method": BOOTSTRAP_METHOD, "resamples": resamples, "confidence": confidence, "seed": seed,
                 "referable_threshold": referable_threshold}
    for name in draws[0] if draws else []:
        values = np.asarray([d[name] for d in draws], dtype=np.float64)
        values = values[~np.isnan(values)]
        low, high = np.percentile(values, [tail, 100 - tail]) if len(values) else (np.nan, np.nan)
        out[name] = {"value": float(point.get(name, np.nan)), "low": float(low), "high": float(high)}
    return out
