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

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from tltrain.errors import ConfigError
from tltrain.transfer.groups import LayerGroup, layer_groups

# The config side (dataclasses, preset names, validation) is torch-free so that `tltrain submit` can check a run
# without importing torch and timm; it is re-exported here.
from tltrain.transfer.schedule_config import (BN_MODES, FEATURE_PRESETS, PHASE_PRESETS, Phase,  # noqa: F401
                                              ScheduleConfig, _parse_train)


# -- presets: cfg + number of backbone groups -> phases ---------------------------------------------------------
def _all_layers(cfg: ScheduleConfig, n_backbone: int) -> list[Phase]:
    return [Phase(cfg.epochs_per_phase, "all", cfg.lr, 1.0, "all layers")]


def _linear_probe(cfg: ScheduleConfig, n_backbone: int) -> list[Phase]:
    return [Phase(cfg.epochs_per_phase, "head", cfg.lr, 1.0, "head only")]


def _head_then_all(cfg: ScheduleConfig, n_backbone: int) -> list[Phase]:
    return [Phase(cfg.head_epochs, "head", cfg.lr, 1.0, "head only"),
            Phase(cfg.epochs_per_phase, "all", cfg.lr * cfg.finetune_lr_factor, 1.0, "all layers")]


def _layer_decay(cfg: ScheduleConfig, n_backbone: int) -> list[Phase]:
    return [Phase(cfg.epochs_per_phase, "all", cfg.lr, cfg.layer_decay, f"all layers, layer decay {cfg.layer_decay:g}")]


def _unfreeze_top_down(cfg: ScheduleConfig, n_backbone: int, per_phase: int, decay: float) -> list[Phase]:
    """Head only, then `per_phase` more groups per phase from the top, for max_steps phases or until all train."""
    steps = cfg.max_steps or n_backbone
    phases, unfrozen = [Phase(cfg.epochs_per_phase, "head", cfg.lr, decay, "head only")], 0
    while unfrozen < n_backbone and len(phases) <= steps:
        unfrozen = min(unfrozen + per_phase, n_backbone)
        phases.append(Phase(cfg.epochs_per_phase, f"top:{unfrozen}", cfg.lr, decay, f"head + {unfrozen} top group(s)"))
    return phases


def _layerwise(cfg: ScheduleConfig, n_backbone: int) -> list[Phase]:
    return _unfreeze_top_down(cfg, n_backbone, cfg.groups_per_phase, 1.0)


def _gradual_unfreeze(cfg: ScheduleConfig, n_backbone: int) -> list[Phase]:
    return _unfreeze_top_down(cfg, n_backbone, 1, 1.0 / cfg.lr_ratio)


def _swft(cfg: ScheduleConfig, n_backbone: int) -> list[Phase]:
    """Step 0 trains the head; step k the head + k top groups; per-step epochs/LRs from step_epochs/step_lrs."""
    n_steps = min(cfg.max_steps or n_backbone, n_backbone) + 1
    epochs = list(cfg.step_epochs or [cfg.epochs_per_phase] * n_steps)
    lrs = list(cfg.step_lrs or [cfg.lr] * n_steps)
    for key, values in (("step_epochs", epochs), ("step_lrs", lrs)):
        if len(values) < n_steps:
            raise ConfigError(f"schedule.{key} has {len(values)} entries; this model needs {n_steps} "
                              f"(the head step + {n_steps - 1} unfreezing steps)")
    return [Phase(epochs[k], "head" if k == 0 else f"top:{k}", lrs[k], 1.0,
                  "step 0: head" if k == 0 else f"step {k}: head + {k} top group(s)") for k in range(n_steps)]


PHASE_BUILDERS = {
    "scratch": _all_layers, "finetune_all": _all_layers, "linear_probe": _linear_probe,
    "head_then_all": _head_then_all, "layerwise": _layerwise, "gradual_unfreeze": _gradual_unfreeze,
    "swft": _swft, "layer_decay": _layer_decay, "custom": lambda cfg, n: list(cfg.phases),
}
PRESETS = (*PHASE_BUILDERS, *FEATURE_PRESETS)


class Schedule:
    """Phases bound to one model's layer groups; the engine calls apply() when a phase starts."""

    def __init__(self, cfg: ScheduleConfig, model: nn.Module):
        cfg.validate()
        self.cfg = cfg
        self.groups: list[LayerGroup] = layer_groups(model)
        self.phases: list[Phase] = PHASE_BUILDERS[cfg.name](cfg, len(self.groups) - 1)
        self.total_epochs = sum(p.epochs for p in self.phases)
        self._group_of = {name: i for i, g in enumerate(self.groups) for name in g.params}

    def phase_index(self, epoch: int) -> int:
        """The phase that trains 0-based `epoch` (epochs past the end stay in the last phase)."""
        for index, phase in enumerate(self.phases):
            epoch -= phase.epochs
            if epoch < 0:
                return index
        return len(self.phases) - 1

    def trainable_groups(self, phase_index: int) -> list[int]:
        """Indices (0 = stem, last = head) of the groups that train in this phase: always a block ending at the head."""
        top = _parse_train(self.phases[phase_index].train)
        n = len(self.groups)
        return list(range(n)) if top is None else list(range(max(0, n - 1 - top), n))

    def trainable_param_names(self, phase_index: int) -> set[str]:
        """Parameter names that train in this phase; the ones shared with the previous phase keep optimizer state."""
        return {name for i in self.trainable_groups(phase_index) for name in self.groups[i].params}

    def group_lr(self, phase_index: int, group_index: int) -> float:
        """lr * layer_decay^depth, depth counted from the head (0) down to the stem."""
        phase = self.phases[phase_index]
        depth = len(self.groups) - 1 - group_index
        return phase.lr * phase.layer_decay ** depth

    def apply(self, model: nn.Module, phase_index: int) -> list[dict]:
        """Set requires_grad on every parameter; return optimizer groups of the trainable ones (one per layer group,
        1-D tensors split off with weight_decay 0 as timm does; the others take the optimizer's weight decay)."""
        model = getattr(model, "_orig_mod", model)  # torch.compile wraps names in _orig_mod.
        trainable = set(self.trainable_groups(phase_index))
        params = dict(model.named_parameters())
        if set(params) != set(self._group_of):
            raise ConfigError(f"{type(model).__name__}: parameters differ from the model this schedule was built for")
        for name, p in params.items():
            p.requires_grad_(self._group_of[name] in trainable)
            if not p.requires_grad:
                p.grad = None  # a stale gradient would still count in clip_grad_norm over model.parameters()
        optimizer_groups = []
        for index in sorted(trainable):
            group, lr = self.groups[index], self.group_lr(phase_index, index)
            tensors = [params[n] for n in group.params]
            decay = [p for p in tensors if p.ndim > 1]
            no_decay = [p for p in tensors if p.ndim <= 1]
            if decay:
                optimizer_groups.append({"params": decay, "lr": lr, "name": group.name})
            if no_decay:
                optimizer_groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0,
                                         "name": f"{group.name}.no_decay"})
        return optimizer_groups

    def set_train_mode(self, model: nn.Module, phase_index: int) -> None:
        """Call after model.train(): with bn=freeze, normalisation layers of frozen groups go to eval mode so their
        running statistics stay those of the pretrained weights (their affine parameters are frozen by apply)."""
        if self.cfg.bn != "freeze":
            return
        model = getattr(model, "_orig_mod", model)
        trainable = set(self.trainable_groups(phase_index))
        for module_name, module in model.named_modules():
            if isinstance(module, _NormBase) and module.track_running_stats:
                prefix = f"{module_name}." if module_name else ""
                names = [prefix + n for n, _ in module.named_parameters(recurse=False)]
                if names and all(self._group_of.get(n) not in trainable for n in names):
                    module.eval()

    def describe(self, phase_index: int) -> str:
        """One log line: which groups train at which LR, which stay frozen."""
        phase = self.phases[phase_index]
        trainable = self.trainable_groups(phase_index)
        lrs = ", ".join(f"{self.groups[i].name} {self.group_lr(phase_index, i):.3g}" for i in reversed(trainable))
        frozen = [g.name for i, g in enumerate(self.groups) if i not in trainable]
        frozen_text = f"; frozen: {', '.join(frozen)}" if frozen else ""
        return (f"{self.cfg.name} phase {phase_index + 1}/{len(self.phases)} ({phase.name or phase.train}, "
                f"{phase.epochs} epochs): training {len(trainable)}/{len(self.groups)} groups, lr {lrs}{frozen_text}")


def build_schedule(cfg: ScheduleConfig, model: nn.Module) -> Schedule:
    """The schedule of a gradient-trained preset bound to `model` (feature presets fit a classifier instead)."""
    if cfg.name in FEATURE_PRESETS:
        raise ConfigError(f"schedule.name={cfg.name} trains no phases: use tltrain.transfer.features "
                          "(extract_features + fit_classifier)")
    return Schedule(cfg, model)
