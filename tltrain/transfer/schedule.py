"""Transfer schedules: lists of phases saying which layer groups train, at which LR, for how many epochs.

Presets follow the founding papers (docs/transfer.md gives the sources): scratch and finetune_all (one phase,
everything trains), linear_probe (Cheng & Malhi: frozen backbone, new head), head_then_all (Hulman / fastai),
layerwise (Li et al.: groups unfrozen top-down, `groups_per_phase` at a time), gradual_unfreeze (ULMFiT: one more
group per phase, LR divided by `lr_ratio` per group going down), swft (THTL step-wise fine-tuning: fc, then
+last block, +previous block ..., each step from the last weights), layer_decay (one phase, LR = lr * decay^depth
as real optimizer groups, not timm's lr_scale which only timm's schedulers read), and the frozen-feature
classifiers features_svm / features_logreg (no gradient steps; see features.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tltrain.errors import ConfigError, choices_error
from tltrain.transfer.groups import LayerGroup, layer_groups

PRESETS = ("scratch", "finetune_all", "linear_probe", "head_then_all", "layerwise", "gradual_unfreeze", "swft",
           "layer_decay", "features_svm", "features_logreg", "custom")
FEATURE_PRESETS = ("features_svm", "features_logreg")
BN_MODES = ("freeze", "train")


@dataclass
class PhaseConfig:
    """One phase: `train` is all | head | top:N (head + the N highest backbone groups)."""

    epochs: int = 1
    train: str = "all"
    lr: float = 1e-3  # LR of the head (the top group)
    layer_decay: float = 1.0  # LR multiplier per group going down from the head (1 = one LR for all)
    name: str = ""


@dataclass
class ScheduleConfig:
    name: str = "finetune_all"  # a preset (see PRESETS) or custom (then `phases` says everything)
    lr: float = 1e-3  # head / top LR of the preset's phases
    epochs_per_phase: int = 2  # epochs of each phase (finetune_all/scratch/linear_probe: the whole run)
    head_epochs: int = 1  # head_then_all: epochs of the head-only phase
    finetune_lr_factor: float = 0.1  # head_then_all: LR of the whole-network phase relative to lr
    groups_per_phase: int = 1  # layerwise: backbone groups unfrozen per phase
    max_steps: int = 0  # layerwise/gradual_unfreeze/swft: phases after the head-only one (0 = until all train)
    step_epochs: list[int] | None = None  # swft: epochs per step (overrides epochs_per_phase)
    step_lrs: list[float] | None = None  # swft: LR per step (overrides lr)
    lr_ratio: float = 2.6  # gradual_unfreeze: LR ratio between neighbouring groups (ULMFiT)
    layer_decay: float = 0.75  # layer_decay: LR multiplier per group going down
    bn: str = "freeze"  # BatchNorm of frozen groups: freeze (eval mode, statistics fixed) | train
    svm_c: float = 1.0  # features_svm / features_logreg: regularisation C
    phases: list[PhaseConfig] = field(default_factory=list)  # custom: explicit phases

    def validate(self) -> None:
        if self.name not in PRESETS:
            raise choices_error("schedule.name", self.name, PRESETS)
        if self.bn not in BN_MODES:
            raise choices_error("schedule.bn", self.bn, BN_MODES)
        if self.name == "custom" and not self.phases:
            raise ConfigError("schedule.name=custom needs schedule.phases")
        for phase in self.phases:
            _parse_train(phase.train)
            if phase.epochs < 1:
                raise ConfigError(f"schedule.phases: epochs must be >= 1 (phase {phase.name or phase.train})")
        if self.epochs_per_phase < 1 or self.groups_per_phase < 1:
            raise ConfigError("schedule.epochs_per_phase and schedule.groups_per_phase must be >= 1")


def _parse_train(spec: str) -> int | None:
    """'all' -> None (everything), 'head' -> 0, 'top:N' -> N backbone groups plus the head."""
    if spec == "all":
        return None
    if spec == "head":
        return 0
    if spec.startswith("top:") and spec[4:].isdigit():
        return int(spec[4:])
    raise ConfigError(f"schedule phase train={spec!r}: use all, head or top:N")


def build_phases(cfg: ScheduleConfig, n_backbone: int) -> list[PhaseConfig]:
    """The preset's phases for a model with n_backbone groups below the head."""
    e, lr = cfg.epochs_per_phase, cfg.lr
    steps = cfg.max_steps or n_backbone
    if cfg.name == "custom":
        return list(cfg.phases)
    if cfg.name in FEATURE_PRESETS:
        return []
    if cfg.name in ("scratch", "finetune_all"):
        return [PhaseConfig(e, "all", lr, 1.0, "all layers")]
    if cfg.name == "linear_probe":
        return [PhaseConfig(e, "head", lr, 1.0, "head only")]
    if cfg.name == "head_then_all":
        return [PhaseConfig(cfg.head_epochs, "head", lr, 1.0, "head only"),
                PhaseConfig(e, "all", lr * cfg.finetune_lr_factor, 1.0, "all layers")]
    if cfg.name == "layer_decay":
        return [PhaseConfig(e, "all", lr, cfg.layer_decay, f"all layers, layer decay {cfg.layer_decay:g}")]
    if cfg.name == "swft":
        n = min(steps, n_backbone)
        epochs = list(cfg.step_epochs or [e] * (n + 1))
        lrs = list(cfg.step_lrs or [lr] * (n + 1))
        if len(epochs) < n + 1 or len(lrs) < n + 1:
            raise ConfigError(f"schedule.step_epochs/step_lrs need {n + 1} entries (head + {n} steps)")
        return [PhaseConfig(epochs[k], "head" if k == 0 else f"top:{k}", lrs[k], 1.0,
                            "step 0: head" if k == 0 else f"step {k}: head + {k} top group(s)") for k in range(n + 1)]
    per = 1 if cfg.name == "gradual_unfreeze" else cfg.groups_per_phase
    decay = 1.0 / cfg.lr_ratio if cfg.name == "gradual_unfreeze" else 1.0
    phases, k = [PhaseConfig(e, "head", lr, decay, "head only")], 0
    while k < min(steps * per, n_backbone):
        k = min(k + per, n_backbone)
        phases.append(PhaseConfig(e, f"top:{k}", lr, decay, f"head + {k} top group(s)"))
    return phases


class Schedule:
    """Phases bound to one model's layer groups; the engine calls apply() when a phase starts."""

    def __init__(self, cfg: ScheduleConfig, model: nn.Module):
        cfg.validate()
        self.cfg = cfg
        self.groups: list[LayerGroup] = layer_groups(model)
        self.phases = build_phases(cfg, len(self.groups) - 1)
        self.total_epochs = sum(p.epochs for p in self.phases)
        self._group_of = {name: i for i, g in enumerate(self.groups) for name in g.params}

    def phase_index(self, epoch: int) -> int:
        for index, phase in enumerate(self.phases):
            epoch -= phase.epochs
            if epoch < 0:
                return index
        return len(self.phases) - 1

    def trainable_groups(self, phase_index: int) -> list[int]:
        top = _parse_train(self.phases[phase_index].train)
        n = len(self.groups)
        return list(range(n)) if top is None else list(range(max(0, n - 1 - top), n))

    def group_lr(self, phase_index: int, group_index: int) -> float:
        phase = self.phases[phase_index]
        depth = len(self.groups) - 1 - group_index  # 0 for the head
        return phase.lr * phase.layer_decay ** depth

    def apply(self, model: nn.Module, phase_index: int) -> list[dict]:
        """Freeze/unfreeze every parameter; return optimizer groups (trainable only), no decay on 1-D tensors."""
        trainable = set(self.trainable_groups(phase_index))
        params = dict(model.named_parameters())
        for name, p in params.items():
            p.requires_grad_(self._group_of[name] in trainable)
        out = []
        for index in sorted(trainable):
            group, lr = self.groups[index], self.group_lr(phase_index, index)
            tensors = [params[n] for n in group.params]
            decay = [p for p in tensors if p.ndim > 1]
            no_decay = [p for p in tensors if p.ndim <= 1]
            if decay:
                out.append({"params": decay, "lr": lr, "name": group.name})
            if no_decay:
                out.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{group.name}.no_decay"})
        return out

    def set_train_mode(self, model: nn.Module, phase_index: int) -> None:
        """After model.train(): BatchNorm layers whose parameters are frozen keep their running statistics."""
        if self.cfg.bn != "freeze":
            return
        trainable = set(self.trainable_groups(phase_index))
        for module_name, module in model.named_modules():
            if isinstance(module, _BatchNorm):
                names = [f"{module_name}.{n}" for n, _ in module.named_parameters(recurse=False)]
                if names and all(self._group_of.get(n) not in trainable for n in names):
                    module.eval()

    def describe(self, phase_index: int) -> str:
        phase = self.phases[phase_index]
        trainable = self.trainable_groups(phase_index)
        names = [self.groups[i].name for i in trainable]
        lrs = sorted({round(self.group_lr(phase_index, i), 12) for i in trainable})
        lr_text = f"lr {lrs[0]:g}" if len(lrs) == 1 else f"lr {lrs[0]:g}..{lrs[-1]:g}"
        return (f"{self.cfg.name} phase {phase_index + 1}/{len(self.phases)} ({phase.name}, {phase.epochs} epochs): "
                f"training {len(trainable)}/{len(self.groups)} groups [{', '.join(names)}], {lr_text}")


def build_schedule(cfg: ScheduleConfig, model: nn.Module) -> Schedule:
    if cfg.name in FEATURE_PRESETS:
        raise ConfigError(f"schedule.name={cfg.name} trains no phases: the runner fits a classifier on features")
    return Schedule(cfg, model)
