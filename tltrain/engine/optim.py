"""Optimizers, the per-step LR curve and the weight EMA.

The LR is a pure function of (optimizer step within the phase, steps in the phase): no scheduler object carries
hidden state, so a resumed run lands on exactly the same LR curve and a new transfer phase (with its rebuilt
optimizer) starts its own warm-up + decay, as fastai's fit_one_cycle does per unfreezing stage.
Each param group keeps its own base LR in group["base_lr"] (discriminative LRs from the transfer schedule).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from tltrain.engine.config import TrainerConfig

ONECYCLE_START_DIV = 25.0  # onecycle starts at base_lr / 25 (the value torch.optim.lr_scheduler.OneCycleLR uses)


def default_param_groups(model: nn.Module, cfg: TrainerConfig) -> list[dict]:
    """All parameters trainable, no weight decay on biases and norm weights (1-D tensors), as timm does."""
    for p in model.parameters():
        p.requires_grad_(True)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "all"},
            {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0, "name": "all_no_decay"}]


def build_optimizer(param_groups: list[dict], cfg: TrainerConfig) -> torch.optim.Optimizer:
    """AdamW or SGD(momentum, nesterov) over the given groups; each group remembers its base LR."""
    groups = [dict(g, base_lr=g.get("lr", cfg.lr)) for g in param_groups if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters: the schedule froze everything")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainerConfig, step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based) of a phase with `total_steps` steps."""
    total_steps = max(total_steps, 1)
    step = min(max(step, 0), total_steps - 1)
    floor = cfg.min_lr_ratio
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "onecycle":
        rise = max(min(warmup_steps, total_steps - 1), 1)
        if step < rise:
            start = 1.0 / ONECYCLE_START_DIV
            return start + (1.0 - start) * _cosine_ramp(step / rise)
        return floor + (1.0 - floor) * (1.0 - _cosine_ramp((step - rise) / max(total_steps - 1 - rise, 1)))
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(total_steps - 1 - warmup_steps, 1)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _cosine_ramp(x: float) -> float:
    """0 -> 1 along half a cosine."""
    return 0.5 * (1.0 - math.cos(math.pi * min(max(x, 0.0), 1.0)))


def set_lr(param_groups: list[dict], factor: float) -> list[float]:
    """Set every group's LR to base_lr * factor; returns the LRs set (for logging)."""
    lrs = []
    for group in param_groups:
        group["lr"] = group.get("base_lr", group["lr"]) * factor
        lrs.append(group["lr"])
    return lrs


def carry_optimizer_state(old: torch.optim.Optimizer | None, new: torch.optim.Optimizer) -> int:
    """Copy per-parameter state (Adam moments, momentum) for params trainable in both; returns how many."""
    if old is None:
        return 0
    carried = 0
    for group in new.param_groups:
        for p in group["params"]:
            if p in old.state:
                new.state[p] = old.state[p]
                carried += 1
    return carried


def build_ema(model: nn.Module, decay: float):
    """timm's ModelEmaV3 (with warm-up so early averages are not dominated by the random init), or None."""
    if decay <= 0:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True)
