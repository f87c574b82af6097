"""Losses: cross-entropy for classification, SmoothL1 regression for ordinal grades with kappa-tuned thresholds.

Regression on the grade (one output) was used by top Kaggle DR solutions: the model predicts a real number and
the cut points between grades are then tuned on validation data to maximise quadratic kappa (Nelder-Mead from
0.5/1.5/2.5/3.5), since kappa rewards near-misses and a plain rounding is not the best cut.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize
from sklearn.metrics import cohen_kappa_score
import torch.nn.functional as F
from torch import nn

from tltrain.engine.config import TrainerConfig
from tltrain.errors import ConfigError

#: Width of the pseudo-probabilities made from a regression output (in grades): p_c ~ exp(-(y - c)^2 / 2w^2).
ORDINAL_SOFTNESS = 0.5


def model_outputs(cfg: TrainerConfig, num_classes: int) -> int:
    """Number of model outputs the loss needs: one per class, or a single regression value."""
    return 1 if cfg.loss == "ordinal" else num_classes


class MaskedLoss(nn.Module):
    """Mean loss over valid samples only: padding samples (valid=False) add nothing to loss or gradient.

    Per-sample losses are weighted by the mask instead of boolean-indexed, which would force a device sync.
    With class weights the mean divides by the summed weights, as nn.CrossEntropyLoss(reduction="mean") does.
    """

    def __init__(self, kind: str, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.kind = kind
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.ones(0))
        self.label_smoothing = label_smoothing

    def forward(self, outputs: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        outputs = outputs.float()
        mask = torch.ones_like(labels, dtype=torch.float32) if valid is None else valid.to(torch.float32)
        if self.kind == "ordinal":  # SmoothL1 between the single output and the grade
            per_sample = F.smooth_l1_loss(outputs.reshape(-1), labels.float(), reduction="none")
            return (per_sample * mask).sum() / mask.sum().clamp_min(1.0)
        weight = self.class_weights if self.class_weights.numel() else None
        per_sample = F.cross_entropy(outputs, labels, weight=weight, reduction="none",
                                     label_smoothing=self.label_smoothing)
        norm = mask * (weight[labels] if weight is not None else 1.0)
        return (per_sample * mask).sum() / norm.sum().clamp_min(1e-12)


def build_loss(cfg: TrainerConfig, num_classes: int) -> MaskedLoss:
    """loss(outputs, labels, valid=None) for trainer.loss (cross_entropy | ordinal)."""
    if cfg.loss == "ordinal":
        return MaskedLoss("ordinal")
    weight = None
    if cfg.class_weights is not None:
        if len(cfg.class_weights) != num_classes:
            raise ConfigError(f"trainer.class_weights has {len(cfg.class_weights)} values but the data has "
                              f"{num_classes} classes")
        weight = torch.tensor(cfg.class_weights, dtype=torch.float32)
    return MaskedLoss("cross_entropy", weight, cfg.label_smoothing)


def default_thresholds(num_classes: int) -> np.ndarray:
    """Cut points halfway between grades: 0.5, 1.5, ..., num_classes - 1.5."""
    return np.arange(num_classes - 1, dtype=np.float64) + 0.5


def apply_thresholds(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Grade = number of cut points below the value."""
    return np.searchsorted(np.sort(thresholds), np.asarray(values, dtype=np.float64).reshape(-1), side="right")


def tune_thresholds(values: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Cut points that maximise quadratic kappa on (values, labels), by Nelder-Mead from the default cuts."""
    class_ids = list(range(num_classes))
    labels = np.asarray(labels)

    def negative_kappa(cuts: np.ndarray) -> float:
        predicted = apply_thresholds(values, cuts)
        if len(np.unique(np.concatenate([predicted, labels]))) < 2:
            return 0.0
        kappa = cohen_kappa_score(labels, predicted, weights="quadratic", labels=class_ids)
        return 0.0 if np.isnan(kappa) else -kappa

    start = default_thresholds(num_classes)
    result = minimize(negative_kappa, start, method="Nelder-Mead", options={"maxiter": 400, "xatol": 1e-3})
    best = np.sort(result.x) if result.fun <= negative_kappa(start) else start
    return best


def outputs_to_probs(outputs: torch.Tensor, loss: str, num_classes: int,
                     thresholds: np.ndarray | None = None) -> torch.Tensor:
    """Class probabilities for metrics: softmax for cross-entropy; for ordinal, a Gaussian around the value.

    For ordinal outputs the argmax must agree with the thresholded grade, so the value is first mapped to
    'grade coordinates' piecewise-linearly through the cut points before the Gaussian is applied.
    """
    if loss != "ordinal":
        return outputs.float().softmax(dim=1)
    values = outputs.float().reshape(-1)
    if thresholds is not None:
        values = torch.as_tensor(_to_grade_scale(values.cpu().numpy(), thresholds), dtype=torch.float32,
                                 device=outputs.device)
    grades = torch.arange(num_classes, device=outputs.device, dtype=torch.float32)
    logits = -((values[:, None] - grades[None, :]) ** 2) / (2 * ORDINAL_SOFTNESS**2)
    return logits.softmax(dim=1)


def _to_grade_scale(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Map so that tuned cut point k lands on k + 0.5 (monotone, piecewise linear, linear outside)."""
    cuts = np.sort(np.asarray(thresholds, dtype=np.float64))
    targets = np.arange(len(cuts)) + 0.5
    if len(cuts) == 1:
        return values - cuts[0] + 0.5
    inside = np.interp(values, cuts, targets)
    low_slope = (targets[1] - targets[0]) / max(cuts[1] - cuts[0], 1e-6)
    high_slope = (targets[-1] - targets[-2]) / max(cuts[-1] - cuts[-2], 1e-6)
    inside = np.where(values < cuts[0], targets[0] + (values - cuts[0]) * low_slope, inside)
    return np.where(values > cuts[-1], targets[-1] + (values - cuts[-1]) * high_slope, inside)
