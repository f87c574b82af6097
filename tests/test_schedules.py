"""Each schedule freezes and unfreezes exactly what it says, checked parameter by parameter."""
import pytest
import timm
import torch

from tltrain.engine.config import TrainerConfig
from tltrain.engine.optim import build_optimizer
from tltrain.transfer.groups import layer_groups
from tltrain.transfer.schedule import PhaseConfig, ScheduleConfig, build_schedule

ARCHS = ["resnet18", "vgg11", "densenet121", "efficientnet_b0", "vit_tiny_patch16_224"]


def _model(arch="resnet18", classes=3):
    return timm.create_model(arch, pretrained=False, num_classes=classes)


@pytest.mark.parametrize("arch", ARCHS)
def test_groups_cover_every_parameter_once_and_head_is_classifier(arch):
    model = _model(arch)
    groups = layer_groups(model)
    names = [n for g in groups for n in g.params]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters()) and len(names) == len(set(names))
    head = groups[-1]
    classifier = model.get_classifier()
    assert {id(p) for p in classifier.parameters()} == {id(dict(model.named_parameters())[n]) for n in head.params}


def _check_phase(model, schedule, phase, inputs):
    groups = schedule.apply(model, phase)
    trainable = set(schedule.trainable_groups(phase))
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    model.train()
    schedule.set_train_mode(model, phase)
    model.zero_grad(set_to_none=True)
    model(inputs).sum().backward()
    for index, group in enumerate(schedule.groups):
        for name in group.params:
            p = dict(model.named_parameters())[name]
            if index in trainable:
                assert p.requires_grad and id(p) in in_optimizer, name
            else:
                assert not p.requires_grad and p.grad is None and id(p) not in in_optimizer, name
    return groups


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0", "vit_tiny_patch16_224"])
def test_swft_unfreezes_back_to_front(arch):
    model = _model(arch)
    schedule = build_schedule(ScheduleConfig(name="swft", epochs_per_phase=1), model)
    n = len(schedule.groups)
    assert len(schedule.phases) == n  # head, then one more group per step down to the stem
    size = 224 if arch.startswith("vit") else 32
    x = torch.randn(2, 3, size, size)
    previous = set()
    for phase in range(len(schedule.phases)):
        _check_phase(model, schedule, phase, x)
        now = set(schedule.trainable_groups(phase))
        assert previous < now or phase == 0
        assert max(now) == n - 1 and min(now) == n - 1 - phase  # a contiguous block from the head downwards
        previous = now


def test_frozen_batchnorm_statistics_do_not_change():
    model = _model("resnet18")
    schedule = build_schedule(ScheduleConfig(name="linear_probe"), model)
    x = torch.randn(4, 3, 32, 32)
    _check_phase(model, schedule, 0, x)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    model.train()
    schedule.set_train_mode(model, 0)
    with torch.no_grad():
        model(x * 3 + 1)
    after = {k: v for k, v in model.state_dict().items() if "running_" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    finetune = build_schedule(ScheduleConfig(name="finetune_all"), model)
    finetune.apply(model, 0)
    model.train()
    finetune.set_train_mode(model, 0)
    with torch.no_grad():
        model(x * 3 + 1)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)


def test_layer_decay_lrs_are_real_optimizer_groups():
    model = _model("resnet18")
    schedule = build_schedule(ScheduleConfig(name="layer_decay", lr=1e-2, layer_decay=0.5), model)
    groups = schedule.apply(model, 0)
    optimizer = build_optimizer(groups, TrainerConfig())
    lrs = {g["name"].split(".")[0]: g["lr"] for g in optimizer.param_groups}
    n = len(schedule.groups)
    for depth, group in enumerate(reversed(schedule.groups)):
        assert lrs[group.name] == pytest.approx(1e-2 * 0.5 ** depth)
    assert len(lrs) == n
    no_decay = [g for g in optimizer.param_groups if g["name"].endswith("no_decay")]
    assert no_decay and all(g["weight_decay"] == 0.0 and all(p.ndim <= 1 for p in g["params"]) for g in no_decay)


def test_gradual_unfreeze_ulmfit_ratios_and_layerwise_steps():
    model = _model("resnet18")
    ulmfit = build_schedule(ScheduleConfig(name="gradual_unfreeze", lr=1e-3, lr_ratio=2.6), model)
    last = len(ulmfit.phases) - 1
    lrs = [ulmfit.group_lr(last, i) for i in ulmfit.trainable_groups(last)]
    assert all(hi / lo == pytest.approx(2.6) for lo, hi in zip(lrs, lrs[1:]))
    layerwise = build_schedule(ScheduleConfig(name="layerwise", groups_per_phase=2), model)
    counts = [len(layerwise.trainable_groups(p)) for p in range(len(layerwise.phases))]
    assert counts[0] == 1 and all(b - a <= 2 for a, b in zip(counts, counts[1:])) and counts[-1] == len(layerwise.groups)


def test_head_then_all_and_phase_index():
    model = _model("resnet18")
    schedule = build_schedule(ScheduleConfig(name="head_then_all", head_epochs=2, epochs_per_phase=3, lr=1e-2,
                                             finetune_lr_factor=0.1), model)
    assert schedule.total_epochs == 5
    assert [schedule.phase_index(e) for e in range(5)] == [0, 0, 1, 1, 1]
    assert schedule.trainable_groups(0) == [len(schedule.groups) - 1]
    assert schedule.group_lr(1, 0) == pytest.approx(1e-3)
    assert "head" in schedule.describe(0)


def test_custom_phases_and_bad_spec():
    from tltrain.errors import ConfigError

    model = _model("resnet18")
    cfg = ScheduleConfig(name="custom", phases=[PhaseConfig(1, "head", 0.1), PhaseConfig(2, "top:2", 0.01)])
    schedule = build_schedule(cfg, model)
    assert schedule.total_epochs == 3 and len(schedule.trainable_groups(1)) == 3
    with pytest.raises(ConfigError, match="top:N"):
        build_schedule(ScheduleConfig(name="custom", phases=[PhaseConfig(1, "bottom")]), model)
    with pytest.raises(ConfigError, match="valid; choose one of"):
        build_schedule(ScheduleConfig(name="nope"), model)
