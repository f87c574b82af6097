"""The schedule's config: its dataclasses, preset names and validation, without torch or timm, so a run's config
can be checked (e.g. by `tltrain submit`) in a fraction of a second. The phases themselves: schedule.py."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from tltrain.checks import check_number, validate_once
from tltrain.errors import ConfigError, choices_error
from tltrain.safe_io import printable

#: Presets built from phases (schedule.PHASE_BUILDERS has one builder per name, in this order).
PHASE_PRESETS = ("scratch", "finetune_all", "linear_probe", "head_then_all", "layerwise", "gradual_unfreeze",
                 "swft", "layer_decay", "custom")
SVM_KERNELS = ("rbf", "linear")
FEATURE_PRESETS = ("features_svm", "features_logreg")
PRESETS = (*PHASE_PRESETS, *FEATURE_PRESETS)
BN_MODES = ("freeze", "train")
#: Epochs of one phase or step: a typo guard (a run of 10^5 epochs is not a schedule anyone means).
MAX_EPOCHS = 100_000
#: LR multiplier per layer group going down (layer_decay, 1 / lr_ratio): lr * decay^depth stays finite for any
#: timm model's depth (under 10^300 needs depth < 300) and no recipe raises lower layers' LR tenfold per group.
MAX_LAYER_DECAY = 10.0
_TOP_SPEC = re.compile(r"top:([0-9]{1,6})")


@dataclass
class Phase:
    """One phase. `train`: all | head | top:N (the head plus the N backbone groups right below it)."""

    epochs: int = 1
    train: str = "all"
    lr: float = 1e-3  # LR of the head (the top group)
    layer_decay: float = 1.0  # LR multiplier per group going down from the head (1 = one LR for all)
    name: str = ""


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
        """ConfigError for a bad value; free when these values were already validated (validate_once)."""
        validate_once(self, self._validate)

    def _validate(self) -> None:
        if self.name not in PRESETS:
            raise choices_error("schedule.name", self.name, PRESETS)
        if self.bn not in BN_MODES:
            raise choices_error("schedule.bn", self.bn, BN_MODES)
        if self.svm_kernel not in SVM_KERNELS:
            raise choices_error("schedule.svm_kernel", self.svm_kernel, SVM_KERNELS)
        if self.name == "custom" and not self.phases:
            raise ConfigError("schedule.name=custom needs schedule.phases, e.g. [{epochs: 2, train: head, lr: 0.01}]")
        self._check_numbers()
        for index, phase in enumerate(self.phases):
            _check_phase(phase, f"schedule.phases[{index}]")

    def _check_numbers(self) -> None:
        """Every count a whole number and every LR or multiplier finite and positive, before the run starts: an
        `inf` or `nan` LR passed `> 0` and only showed up as a diverged (or silently NaN) run. The range checks
        come first so their messages stay the ones users know; check_number then adds kind, finiteness, bounds."""
        for key in ("epochs_per_phase", "head_epochs", "groups_per_phase"):
            if getattr(self, key) < 1:
                raise ConfigError(f"schedule.{key}={getattr(self, key)} must be >= 1")
            check_number(f"schedule.{key}", getattr(self, key), 1, None if key == "groups_per_phase" else MAX_EPOCHS,
                         integer=True)
        for key in ("lr", "finetune_lr_factor", "lr_ratio", "layer_decay", "svm_c"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"schedule.{key}={getattr(self, key)} must be > 0")
        for key in ("lr", "finetune_lr_factor", "svm_c"):
            check_number(f"schedule.{key}", getattr(self, key), 0, above=True)
        check_number("schedule.layer_decay", self.layer_decay, 0, MAX_LAYER_DECAY, above=True)
        check_number("schedule.lr_ratio", self.lr_ratio, 1 / MAX_LAYER_DECAY)  # the per-group decay is 1 / lr_ratio
        if self.max_steps < 0:
            raise ConfigError(f"schedule.max_steps={self.max_steps} must be >= 0 (0 = until every group trains)")
        check_number("schedule.max_steps", self.max_steps, 0, integer=True)
        if any(e < 1 for e in self.step_epochs or []) or any(not lr > 0 for lr in self.step_lrs or []):
            raise ConfigError("schedule.step_epochs entries must be >= 1 and schedule.step_lrs entries > 0")
        for index, epochs in enumerate(self.step_epochs or []):
            check_number(f"schedule.step_epochs[{index}]", epochs, 1, MAX_EPOCHS, integer=True)
        for index, lr in enumerate(self.step_lrs or []):
            check_number(f"schedule.step_lrs[{index}]", lr, 0, above=True)


def _check_phase(phase: Phase, key: str) -> None:
    """One explicit phase (schedule.name=custom): what it trains, for how long, at which finite LRs."""
    _parse_train(phase.train, f"{key}.train")
    check_number(f"{key}.epochs", phase.epochs, 1, MAX_EPOCHS, integer=True)
    check_number(f"{key}.lr", phase.lr, 0, above=True)
    check_number(f"{key}.layer_decay", phase.layer_decay, 0, MAX_LAYER_DECAY, above=True)


def _parse_train(spec: str, key: str = "train") -> int | None:
    """'all' -> None (everything), 'head' -> 0, 'top:N' -> N backbone groups below the head."""
    if spec == "all":
        return None
    if spec == "head":
        return 0
    top = _TOP_SPEC.fullmatch(spec) if isinstance(spec, str) else None
    if top:  # ASCII digits only: str.isdigit() also takes "²" and 5000-digit strings, which int() refuses
        return int(top.group(1))
    raise ConfigError(f"{key}={printable(repr(spec), 100)} is not valid: use all, head or top:N (N backbone groups "
                      "below the head)")
