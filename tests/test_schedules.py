"""Each schedule freezes and unfreezes exactly what it says, checked parameter by parameter on several timm archs."""
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tltrain.engine.config import TrainerConfig
from tltrain.engine.optim import build_optimizer, carry_optimizer_state
from tltrain.errors import ConfigError
from tltrain.transfer.groups import layer_groups
from tltrain.transfer.schedule import FEATURE_PRESETS, PRESETS, Phase, ScheduleConfig, build_schedule

SCHEDULE_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "schedule"
ARCHS = ["resnet18", "vgg11", "densenet121", "efficientnet_b0", "vit_tiny_patch16_224"]
SMALL = {"vgg11": {"mlp_ratio": 0.0625}, "vit_tiny_patch16_224": {"img_size": 32}}  # same groups, fast at 32 px
GRADIENT_PRESETS = [p for p in PRESETS if p not in FEATURE_PRESETS and p != "custom"]
_MODELS: dict = {}


def _model(arch="resnet18") -> nn.Module:
    """One model per arch for the whole file (vgg/densenet creation is slow); every apply() resets requires_grad."""
    if arch not in _MODELS:
        torch.manual_seed(0)
        _MODELS[arch] = timm.create_model(arch, pretrained=False, num_classes=3, **SMALL.get(arch, {}))
    return _MODELS[arch]


def _inputs():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _expected_trainable_counts(preset: str, n: int) -> list[int]:
    """How many groups (from the head down) each phase of a preset trains, written out independently."""
    return {"scratch": [n], "finetune_all": [n], "layer_decay": [n], "linear_probe": [1], "head_then_all": [1, n],
            "layerwise": [1] + [min(1 + k, n) for k in range(2, n + 1, 2)],
            "gradual_unfreeze": list(range(1, n + 1)), "swft": list(range(1, n + 1))}[preset]


def _norm_stats(model, schedule):
    """{module name: (group index, running_mean clone)} for BatchNorm layers (group from their weight)."""
    stats = {}
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.weight is not None:
            stats[name] = (schedule._group_of[f"{name}.weight"], module.running_mean.clone())
    return stats


def _check_phase(model, schedule, phase, inputs) -> list[dict]:
    """apply + train-mode forward/backward; assert freezing at parameter level and frozen BN statistics."""
    optimizer_groups = schedule.apply(model, phase)
    trainable = set(schedule.trainable_groups(phase))
    in_optimizer = {id(p) for g in optimizer_groups for p in g["params"]}
    model.train()
    schedule.set_train_mode(model, phase)
    before = _norm_stats(model, schedule)
    model.zero_grad(set_to_none=True)
    model(inputs).sum().backward()
    params = dict(model.named_parameters())
    for index, group in enumerate(schedule.groups):
        for name in group.params:
            p = params[name]
            if index in trainable:
                assert p.requires_grad and id(p) in in_optimizer, name
            else:
                assert not p.requires_grad and p.grad is None and id(p) not in in_optimizer, name
    assert len(in_optimizer) == sum(len(schedule.groups[i].params) for i in trainable)
    modules = dict(model.named_modules())
    for name, (group, stats) in before.items():
        moved = not torch.equal(stats, modules[name].running_mean)
        assert moved == (group in trainable), f"BatchNorm {name} (group {group}) moved={moved}"
    return optimizer_groups


@pytest.mark.parametrize("arch", ARCHS)
def test_groups_cover_every_parameter_once_stem_first_head_last(arch):
    model = _model(arch)
    groups = layer_groups(model)
    names = [n for g in groups for n in g.params]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters()) and len(names) == len(set(names))
    assert groups[0].name == "stem" and next(iter(model.named_parameters()))[0] in groups[0].params
    params = dict(model.named_parameters())
    assert groups[-1].name == "head"
    assert {id(params[n]) for n in groups[-1].params} == {id(p) for p in model.get_classifier().parameters()}
    assert len(groups) >= 5 and len({g.name for g in groups}) == len(groups)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset", GRADIENT_PRESETS)
def test_every_preset_freezes_exactly_what_it_says(arch, preset):
    model = _model(arch)
    schedule = build_schedule(ScheduleConfig(name=preset, groups_per_phase=2, epochs_per_phase=1), model)
    n = len(schedule.groups)
    counts = [len(schedule.trainable_groups(p)) for p in range(len(schedule.phases))]
    assert counts == _expected_trainable_counts(preset, n)
    inputs = _inputs()
    for phase in range(len(schedule.phases)):
        _check_phase(model, schedule, phase, inputs)
        assert schedule.trainable_groups(phase)[-1] == n - 1  # the head always trains; blocks grow downwards


def test_unfreezing_runs_back_to_front_one_block_at_a_time():
    model = _model("efficientnet_b0")
    for preset in ("swft", "gradual_unfreeze", "layerwise"):
        schedule = build_schedule(ScheduleConfig(name=preset, groups_per_phase=3), model)
        per_phase = 3 if preset == "layerwise" else 1
        previous = set()
        for phase in range(len(schedule.phases)):
            now = set(schedule.trainable_groups(phase))
            added = now - previous
            assert previous < now and added == set(range(min(added), max(added) + 1))  # a contiguous new block
            assert previous == set() or max(added) == min(previous) - 1  # right below what already trained
            assert len(added) == 1 or (phase > 0 and len(added) <= per_phase)
            assert schedule.trainable_param_names(phase) >= {n for i in previous for n in schedule.groups[i].params}
            previous = now
        assert previous == set(range(len(schedule.groups)))  # ends with the stem unfrozen


def test_swft_step_epochs_lrs_and_max_steps():
    model = _model("resnet18")
    cfg = ScheduleConfig(name="swft", max_steps=2, step_epochs=[3, 2, 1], step_lrs=[1e-2, 1e-3, 1e-4])
    schedule = build_schedule(cfg, model)
    assert [p.epochs for p in schedule.phases] == [3, 2, 1] and schedule.total_epochs == 6
    assert [schedule.phase_index(e) for e in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    assert [[schedule.groups[i].name for i in schedule.trainable_groups(p)] for p in range(3)] == [
        ["head"], ["layer4", "head"], ["layer3", "layer4", "head"]]
    lrs = [{g["name"]: g["lr"] for g in schedule.apply(model, p)} for p in range(3)]
    assert lrs[1] == {"layer4": 1e-3, "layer4.no_decay": 1e-3, "head": 1e-3, "head.no_decay": 1e-3}
    assert set(lrs[2].values()) == {1e-4}
    with pytest.raises(ConfigError, match="step_lrs has 2 entries; this model needs 3"):
        build_schedule(ScheduleConfig(name="swft", max_steps=2, step_lrs=[1e-2, 1e-3]), model)


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny_patch16_224"])
def test_layer_decay_lrs_are_exact_real_optimizer_groups(arch):
    model = _model(arch)
    schedule = build_schedule(ScheduleConfig(name="layer_decay", lr=1e-2, layer_decay=0.5), model)
    optimizer = build_optimizer(schedule.apply(model, 0), TrainerConfig())
    n = len(schedule.groups)
    lr_of_param = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for index, group in enumerate(schedule.groups):
        depth = n - 1 - index  # 0 for the head
        for name in group.params:
            assert lr_of_param[id(dict(model.named_parameters())[name])] == 1e-2 * 0.5 ** depth, name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    no_decay = [g for g in optimizer.param_groups if g["name"].endswith("no_decay")]
    assert no_decay and all(g["weight_decay"] == 0.0 and all(p.ndim <= 1 for p in g["params"]) for g in no_decay)
    decay = [g for g in optimizer.param_groups if not g["name"].endswith("no_decay")]
    assert len(decay) == n and all(g["weight_decay"] == TrainerConfig().weight_decay for g in decay)


def test_gradual_unfreeze_uses_ulmfit_discriminative_lrs():
    model = _model("resnet18")
    schedule = build_schedule(ScheduleConfig(name="gradual_unfreeze", lr=1e-3, lr_ratio=2.6), model)
    n = len(schedule.groups)
    for phase in range(len(schedule.phases)):
        lrs = {g["name"]: g["lr"] for g in schedule.apply(model, phase) if not g["name"].endswith("no_decay")}
        expected = {schedule.groups[i].name: 1e-3 / 2.6 ** (n - 1 - i) for i in schedule.trainable_groups(phase)}
        assert lrs == pytest.approx(expected, rel=1e-12)
        assert lrs["head"] == 1e-3
    assert "layer4 0.000385" in schedule.describe(1) and "frozen: stem, layer1, layer2, layer3" in schedule.describe(1)


def test_head_then_all_lrs_epochs_and_phase_index():
    model = _model("resnet18")
    schedule = build_schedule(ScheduleConfig(name="head_then_all", head_epochs=2, epochs_per_phase=3, lr=1e-2,
                                             finetune_lr_factor=0.1), model)
    assert schedule.total_epochs == 5 and [schedule.phase_index(e) for e in range(5)] == [0, 0, 1, 1, 1]
    assert {g["lr"] for g in schedule.apply(model, 0)} == {1e-2}
    assert [g["lr"] for g in schedule.apply(model, 1)] == pytest.approx([1e-3] * 12)  # 6 groups x (decay, no decay)
    assert "training 1/6 groups, lr head 0.01; frozen: stem" in schedule.describe(0)


def test_bn_train_mode_lets_frozen_groups_update_statistics_only():
    model = _model("resnet18")
    schedule = build_schedule(ScheduleConfig(name="linear_probe", bn="train"), model)
    schedule.apply(model, 0)
    model.train()
    schedule.set_train_mode(model, 0)
    before = model.bn1.running_mean.clone()
    model(_inputs()).sum().backward()
    assert not torch.equal(before, model.bn1.running_mean)  # statistics adapt to the new domain ...
    assert model.bn1.weight.grad is None and not model.bn1.weight.requires_grad  # ... affine params stay frozen


def test_phase_change_carries_optimizer_state_and_frozen_weights_never_move():
    model = _model("resnet18")
    schedule = build_schedule(ScheduleConfig(name="swft", lr=1e-2), model)
    cfg = TrainerConfig()
    first = build_optimizer(schedule.apply(model, 0), cfg)
    model.train()
    schedule.set_train_mode(model, 0)
    model(_inputs()).sum().backward()
    first.step()
    stem_before, layer4_before = model.conv1.weight.clone(), model.layer4[1].conv2.weight.clone()
    second = build_optimizer(schedule.apply(model, 1), cfg)
    carried = carry_optimizer_state(first, second)
    assert carried == len(schedule.trainable_param_names(0)) == 2  # the head's weight and bias keep Adam moments
    assert schedule.trainable_param_names(1) > schedule.trainable_param_names(0)
    model.zero_grad(set_to_none=True)
    model(_inputs()).sum().backward()
    second.step()
    assert torch.equal(stem_before, model.conv1.weight) and not torch.equal(layer4_before, model.layer4[1].conv2.weight)


def test_schedule_yaml_files_are_the_presets():
    files = {p.stem: p for p in SCHEDULE_CONFIGS.glob("*.yaml")}
    assert set(files) == set(PRESETS) - {"custom"}
    model = _model("resnet18")
    for name, path in files.items():
        node = OmegaConf.merge(OmegaConf.structured(ScheduleConfig), OmegaConf.load(path))  # typos would raise
        cfg = OmegaConf.to_object(node)
        assert cfg.name == name
        cfg.validate()
        if name in FEATURE_PRESETS:
            with pytest.raises(ConfigError, match="trains no phases"):
                build_schedule(cfg, model)
        else:
            assert build_schedule(cfg, model).total_epochs >= 1


def test_custom_phases():
    model = _model("resnet18")
    cfg = ScheduleConfig(name="custom", phases=[Phase(1, "head", 0.1), Phase(2, "top:2", 0.01, 0.5)])
    schedule = build_schedule(cfg, model)
    assert schedule.total_epochs == 3 and schedule.trainable_groups(1) == [3, 4, 5]
    assert [schedule.group_lr(1, i) for i in (3, 4, 5)] == [0.0025, 0.005, 0.01]


@pytest.mark.parametrize("cfg, message", [
    (ScheduleConfig(name="nope"), "schedule.name='nope' is not valid; choose one of"),
    (ScheduleConfig(bn="sometimes"), "schedule.bn='sometimes' is not valid; choose one of: freeze, train"),
    (ScheduleConfig(svm_kernel="poly"), "schedule.svm_kernel='poly' is not valid"),
    (ScheduleConfig(lr=0.0), "schedule.lr=0.0 must be > 0"),
    (ScheduleConfig(groups_per_phase=0), "schedule.groups_per_phase=0 must be >= 1"),
    (ScheduleConfig(max_steps=-1), "schedule.max_steps=-1"),
    (ScheduleConfig(name="custom"), "needs schedule.phases"),
    (ScheduleConfig(name="custom", phases=[Phase(1, "bottom")]), r"schedule.phases\[0\].train='bottom'.*top:N"),
    (ScheduleConfig(name="swft", step_epochs=[1, 0]), "step_epochs entries must be >= 1"),
])
def test_bad_config_names_the_key(cfg, message):
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_models_without_timm_groups_or_head_are_refused():
    with pytest.raises(ConfigError, match="not a timm model"):
        layer_groups(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ConfigError, match="no classifier parameters"):
        layer_groups(timm.create_model("resnet10t", pretrained=False, num_classes=0))
