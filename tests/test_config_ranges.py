"""Every value of the run config is checked (finite, of the right kind, in range) before training starts: a bad
one is one line naming the key, exit 2, and nothing is trained. Before, `inf` and `nan` passed the `> 0` checks of
the schedule, the preprocessing and the augmentation, a 3-value crop_scale was a traceback, and loader sizes had
no upper bound."""
from __future__ import annotations

import math
import time

import pytest
from omegaconf import OmegaConf

from tltrain.cli import main
from tltrain.config import compose, to_typed
from tltrain.data.loaders.config import MAX_SIZE, MIN_SIZE, LoaderConfig
from tltrain.engine.config import TrainerConfig
from tltrain.errors import ConfigError
from tltrain.preprocess_config import MAX_RADIUS, AugmentConfig, PreprocessConfig
from tltrain.transfer.schedule_config import Phase, ScheduleConfig

from conftest import ROOT, one_line, tiny_run_overrides

CONFIGS = ROOT / "configs"

# (override, what the one error line must contain)
BAD_VALUES = [
    # schedule
    ("schedule.lr=inf", "schedule.lr=inf must be a finite number > 0"),
    ("schedule.lr=nan", "schedule.lr=nan must be > 0"),
    ("schedule.finetune_lr_factor=inf", "schedule.finetune_lr_factor=inf"),
    ("schedule.lr_ratio=inf", "schedule.lr_ratio=inf"),
    ("schedule.lr_ratio=0.01", "schedule.lr_ratio=0.01 must be a finite number >= 0.1"),
    ("schedule.layer_decay=inf", "schedule.layer_decay=inf"),
    ("schedule.layer_decay=1e300", "schedule.layer_decay=1e+300 must be a finite number > 0 and <= 10"),
    ("schedule.svm_c=nan", "schedule.svm_c=nan"),
    ("schedule.epochs_per_phase=0", "schedule.epochs_per_phase=0 must be >= 1"),
    ("schedule.epochs_per_phase=1000000000", "schedule.epochs_per_phase=1000000000 must be a whole number"),
    ("schedule.head_epochs=-3", "schedule.head_epochs=-3"),
    ("schedule.max_steps=-1", "schedule.max_steps=-1"),
    ("schedule.step_lrs=[0.1,inf]", "schedule.step_lrs[1]=inf"),
    ("schedule.step_lrs=[0.1,nan]", "schedule.step_lrs entries > 0"),
    ("schedule.step_epochs=[1,0]", "schedule.step_epochs entries must be >= 1"),
    ("schedule.step_epochs=[1,1000000000]", "schedule.step_epochs[1]=1000000000"),
    # explicit phases
    ("schedule.phases=[{epochs:1,train:head,lr:inf}]", "schedule.phases[0].lr=inf"),
    ("schedule.phases=[{epochs:1,train:head,lr:0.1,layer_decay:nan}]", "schedule.phases[0].layer_decay=nan"),
    ("schedule.phases=[{epochs:0,train:head,lr:0.1}]", "schedule.phases[0].epochs=0"),
    ("schedule.phases=[{epochs:1,train:'top:²',lr:0.1}]", "schedule.phases[0].train='top:²' is not valid"),
    # preprocessing
    ("loader.preprocess.gain=inf", "loader.preprocess.gain=inf"),
    ("loader.preprocess.offset=nan", "loader.preprocess.offset=nan"),
    ("loader.preprocess.mean=[0.5,nan,0.5]", "loader.preprocess.mean[1]=nan"),
    ("loader.preprocess.std=[0.2,0.2,inf]", "loader.preprocess.std[2]=inf"),
    ("loader.preprocess.std=[0.2,0,0.2]", "loader.preprocess.mean/std need 3 values each, std > 0"),
    ("loader.preprocess.radius=100000", "loader.preprocess.radius=100000 must be a whole number >= 0 and <= 3535"),
    ("loader.preprocess.sigma_ratio=nan", "loader.preprocess.sigma_ratio=nan"),
    ("loader.preprocess.sigma_ratio=1e-9", "loader.preprocess.sigma_ratio=1e-09"),
    # augmentation
    ("loader.augment.hflip=1.5", "loader.augment.hflip=1.5 must be a finite number >= 0 and <= 1"),
    ("loader.augment.vflip=nan", "loader.augment.vflip=nan"),
    ("loader.augment.rotate_deg=inf", "loader.augment.rotate_deg=inf"),
    ("loader.augment.rotate_deg=-10", "loader.augment.rotate_deg=-10.0"),
    ("loader.augment.brightness=1", "loader.augment.brightness=1.0 must be a finite number >= 0 and < 1"),
    ("loader.augment.contrast=nan", "loader.augment.contrast=nan"),
    ("loader.augment.saturation=-0.1", "loader.augment.saturation=-0.1"),
    ("loader.augment.crop_scale=[0.5,0.8,1.0]", "loader.augment.crop_scale=[0.5, 0.8, 1.0] must be 2 values"),
    ("loader.augment.crop_scale=[0.5]", "loader.augment.crop_scale=[0.5] must be 2 values"),
    ("loader.augment.crop_scale=[nan,1.0]", "loader.augment.crop_scale[0]=nan"),
    ("loader.augment.crop_scale=[0.9,0.5]", "must satisfy 0 < lo <= hi <= 1"),
    # loader
    ("loader.size=100000", "loader.size=100000 must be a whole number >= 8 and <= 4096"),
    ("loader.batch_size=1000000000", "loader.batch_size=1000000000"),
    ("loader.workers=100000", "loader.workers=100000"),
    ("loader.shuffle_buffer=1000000000", "loader.shuffle_buffer=1000000000"),
    ("loader.prefetch_factor=0", "loader.prefetch_factor=0 must be a whole number >= 1"),
    ("loader.hw_decoder_load=1.5", "loader.hw_decoder_load=1.5 must be a finite number >= 0 and <= 1"),
    ("loader.hw_decoder_load=nan", "loader.hw_decoder_load=nan"),
]


@pytest.fixture(scope="module")
def warm_cli(fundus_shards, tmp_path_factory):
    """One call first, so the per-value timings below measure validation, not timm's first import."""
    main(["train", *tiny_run_overrides(fundus_shards, tmp_path_factory.mktemp("warm") / "run"), "loader.size=0"])


@pytest.mark.parametrize("override,message", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_exit_2_before_training(override, message, fundus_shards, warm_cli, tmp_path,
                                                        capsys):
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(fundus_shards, run_dir, override)
    if override.startswith("schedule.phases="):
        overrides.append("schedule.name=custom")
    capsys.readouterr()
    start = time.perf_counter()
    code = main(["train", *overrides])
    elapsed = time.perf_counter() - start
    line = one_line(capsys.readouterr().err)
    assert code == 2 and line.startswith("error: ") and message in line, line
    assert elapsed < 5, f"{elapsed:.1f} s: the check must come before anything is built"
    assert not list(run_dir.glob("checkpoints/step-*")) and not (run_dir / "metrics.json").exists()


# -- the validate methods themselves (what the engine API and `tltrain submit` call) ------------------------------
@pytest.mark.parametrize("bad", [
    {"lr": math.inf}, {"lr": math.nan}, {"finetune_lr_factor": math.inf}, {"lr_ratio": math.nan},
    {"layer_decay": 11.0}, {"svm_c": math.inf}, {"epochs_per_phase": 10**9}, {"head_epochs": True},
    {"groups_per_phase": 1.5}, {"max_steps": 2.5}, {"step_lrs": [0.1, math.inf]}, {"step_epochs": [1, 2.5]},
    {"name": "custom", "phases": [Phase(1, "head", math.inf)]},
    {"name": "custom", "phases": [Phase(1, "head", 0.1, math.nan)]},
    {"name": "custom", "phases": [Phase(10**9, "head", 0.1)]},
    {"name": "custom", "phases": [Phase(1, "top:" + "9" * 5000, 0.1)]},
])
def test_schedule_config_refuses(bad):
    with pytest.raises(ConfigError, match="schedule"):
        ScheduleConfig(**bad).validate()


def test_schedule_config_keeps_what_worked():
    ScheduleConfig(lr=5.0, lr_ratio=0.5, layer_decay=1.0, finetune_lr_factor=10.0, svm_c=1e6, max_steps=0,
                   step_epochs=[1, 2], step_lrs=[1e-2, 1e-3]).validate()
    ScheduleConfig(name="custom", phases=[Phase(1, "head", 0.1), Phase(2, "top:2", 0.01, 0.5)]).validate()


@pytest.mark.parametrize("bad", [
    {"gain": math.inf}, {"gain": 1e5}, {"offset": math.nan}, {"mean": [0.5, math.inf, 0.5]},
    {"std": [0.2, math.nan, 0.2]}, {"std": [0.2, 0.2, math.inf]}, {"radius": MAX_RADIUS + 1}, {"radius": True},
    {"sigma_ratio": math.nan}, {"sigma_ratio": 1e-9}, {"mask_ratio": math.nan},
])
def test_preprocess_config_refuses(bad):
    with pytest.raises(ConfigError, match="loader.preprocess"):
        PreprocessConfig(**bad).validate()


def test_preprocess_config_keeps_what_worked():
    PreprocessConfig(radius=300, gain=-4.0, offset=0.0, mask_ratio=0.0, mean=[0.0] * 3, std=[1.0] * 3).validate()
    PreprocessConfig(radius=MAX_RADIUS).validate()


@pytest.mark.parametrize("bad", [
    {"hflip": -0.1}, {"vflip": 1.01}, {"hflip": math.nan}, {"rotate_deg": math.inf}, {"rotate_deg": 361.0},
    {"brightness": 1.0}, {"contrast": math.nan}, {"saturation": -1.0}, {"crop_scale": [0.5, 0.8, 1.0]},
    {"crop_scale": []}, {"crop_scale": [math.nan, 1.0]}, {"crop_scale": [0.0, 1.0]}, {"crop_scale": [0.5, 1.5]},
])
def test_augment_config_refuses(bad):
    with pytest.raises(ConfigError, match="loader.augment"):
        AugmentConfig(**bad).validate()


def test_augment_config_keeps_what_worked():
    AugmentConfig(hflip=1.0, vflip=0.0, rotate_deg=0.0, crop_scale=[1.0, 1.0], brightness=0.0, contrast=0.9,
                  saturation=0.5).validate()


@pytest.mark.parametrize("bad", [
    {"size": MAX_SIZE + 1}, {"size": 7}, {"batch_size": 10**9}, {"batch_size": 0}, {"workers": -1},
    {"workers": 10**6}, {"shuffle_buffer": 10**9}, {"prefetch_factor": 0}, {"hw_decoder_load": -0.1},
    {"hw_decoder_load": math.inf}, {"batch_size": 8.0},
])
def test_loader_config_refuses(bad):
    with pytest.raises(ConfigError, match="loader"):
        LoaderConfig(**bad).validate()


def test_the_bounds_agree_with_decode_prepare_and_export():
    """A run that trains must export (export.validate_metadata's size range), and the filter's (2R)^2 working
    square must stay within decode.MAX_PIXELS, prepare's radius:N limit."""
    from tltrain.data.decode import MAX_PIXELS
    from tltrain.export import MAX_SIZE as EXPORT_MAX, MIN_SIZE as EXPORT_MIN

    assert (MIN_SIZE, MAX_SIZE) == (EXPORT_MIN, EXPORT_MAX)
    assert MAX_RADIUS == int(math.sqrt(MAX_PIXELS) / 2) and (2 * MAX_RADIUS) ** 2 <= MAX_PIXELS
    assert MAX_RADIUS <= EXPORT_MAX
    LoaderConfig(size=MAX_SIZE).validate()


# -- every shipped preset still validates --------------------------------------------------------------------------
def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


PRESETS = [(group, option) for group in ("loader", "schedule", "trainer", "model", "experiment")
           for option in _options(group)]


@pytest.mark.parametrize("group,option", PRESETS, ids=[f"{g}={o}" for g, o in PRESETS])
def test_every_shipped_preset_passes_the_range_checks(group, option):
    override = f"+experiment={option}" if group == "experiment" else f"{group}={option}"
    cfg = compose("config", [override, "data.shards=/unused"])
    for part, schema in (("loader", LoaderConfig), ("schedule", ScheduleConfig), ("trainer", TrainerConfig)):
        to_typed(OmegaConf.to_container(cfg[part], resolve=True), schema, part)


def test_the_preset_list_is_not_empty():
    assert len([p for p in PRESETS if p[0] == "experiment"]) >= 5 and ("loader", "dali") in PRESETS
