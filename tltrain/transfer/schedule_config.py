"""The schedule's config: its dataclasses, preset names and validation, without torch or timm, so a run's config
can be checked (e.g. by `tltrain submit`) in a fraction of a second. The phases themselves: schedule.py."""
from __future__ import annotations

from dataclasses import dataclass, field

from tltrain.errors import ConfigError, choices_error

#: Presets built from phases (schedule.PHASE_BUILDERS has one builder per name, in this order).
PHASE_PRESETS = ("scratch", "finetune_all", "linear_probe", "head_then_all", "layerwise", "gradual_unfreeze",
                 "swft", "layer_decay", "custom")
SVM_KERNELS = ("rbf", "linear")
FEATURE_PRESETS = ("features_svm", "features_logreg")
PRESETS = (*PHASE_PRESETS, *FEATURE_PRESETS)
BN_MODES = ("freeze", "train")


@dataclass
class Phase:
    """One phase. `train`: all | head | top:N (the head plus the N backbone groups right below it)."""

    epochs: int = 1
    train: str = "all"
    lr: float = 1e-3  # LR of the head (the top group)
    layer_decay: float = 1.0  # LR multiplier per group going down from the head (1 = one LR for all)
    name: str = ""


PhaseConfig = Phase  # the name used for explicit phases in configs (schedule.name=custom)


@dataclass
class ScheduleConfig:
    name: str = "finetune_all"  # a preset (see PRESETS) or custom (then `phases` says everything)
    lr: float = 1e-3  # head / top LR of the preset's phases
    epochs_per_phase: int = 2  # epochs of each phase (finetune_all/scratch/linear_probe/layer_decay: the whole run)
    head_epochs: int = 1  # head_then_all: epochs of the head-only phase
    finetune_lr_factor: float = 0.1  # head_then_all: LR of the whole-network phase relative to lr
    groups_per_phase: int = 1  # layerwise: backbone groups unfrozen per phase
    max_steps: int = 0  # layerwise/gradual_unfreeze/swft: phases after the head-only one (0 = until all train)
    step_epochs: list[int] | None = None  # swft: epochs per step, head step first (overrides epochs_per_phase)
    step_lrs: list[float] | None = None  # swft: LR per step, head step first (overrides lr)
    lr_ratio: float = 2.6  # gradual_unfreeze: LR ratio between neighbouring groups (ULMFiT)
    layer_decay: float = 0.75  # layer_decay: LR multiplier per group going down
    bn: str = "freeze"  # normalisation layers of frozen groups: freeze (eval mode, statistics fixed) | train
    svm_c: float = 1.0  # features_svm / features_logreg: regularisation C
    svm_kernel: str = "rbf"  # features_svm: rbf (SVC) | linear (LinearSVC, scales to large N)
    phases: list[Phase] = field(default_factory=list)  # custom: explicit phases

    def validate(self) -> None:
        if self.name not in PRESETS:
            raise choices_error("schedule.name", self.name, PRESETS)
        if self.bn not in BN_MODES:
            raise choices_error("schedule.bn", self.bn, BN_MODES)
        if self.svm_kernel not in SVM_KERNELS:
            raise choices_error("schedule.svm_kernel", self.svm_kernel, SVM_KERNELS)
        if self.name == "custom" and not self.phases:
            raise ConfigError("schedule.name=custom needs schedule.phases, e.g. [{epochs: 2, train: head, lr: 0.01}]")
        for key in ("epochs_per_phase", "head_epochs", "groups_per_phase"):
            if getattr(self, key) < 1:
                raise ConfigError(f"schedule.{key}={getattr(self, key)} must be >= 1")
        for key in ("lr", "finetune_lr_factor", "lr_ratio", "layer_decay", "svm_c"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"schedule.{key}={getattr(self, key)} must be > 0")
        if self.max_steps < 0:
            raise ConfigError(f"schedule.max_steps={self.max_steps} must be >= 0 (0 = until every group trains)")
        if any(e < 1 for e in self.step_epochs or []) or any(not lr > 0 for lr in self.step_lrs or []):
            raise ConfigError("schedule.step_epochs entries must be >= 1 and schedule.step_lrs entries > 0")
        for index, phase in enumerate(self.phases):
            _parse_train(phase.train, f"schedule.phases[{index}].train")
            if phase.epochs < 1 or not phase.lr > 0 or not phase.layer_decay > 0:
                raise ConfigError(f"schedule.phases[{index}]: epochs must be >= 1, lr and layer_decay > 0")


def _parse_train(spec: str, key: str = "train") -> int | None:
    """'all' -> None (everything), 'head' -> 0, 'top:N' -> N backbone groups below the head."""
    if spec == "all":
        return None
    if spec == "head":
        return 0
    if spec.startswith("top:") and spec[4:].isdigit():
        return int(spec[4:])
    raise ConfigError(f"{key}={spec!r} is not valid: use all, head or top:N (N backbone groups below the head)")
