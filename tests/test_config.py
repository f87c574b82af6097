"""Configs are typed and validated before anything runs; bad values name the key and the valid choices."""
import subprocess

import pytest

from conftest import TLTRAIN
from tltrain.config import compose, to_typed
from tltrain.errors import ConfigError, DataError
from tltrain.train_app import load_run_config


def test_unknown_model_lists_similar_names(fundus_shards):
    with pytest.raises(ConfigError, match="resnet18"):
        load_run_config(compose("config", [f"data.shards={fundus_shards}", "model.arch=resnet18x"]))


def test_unknown_schedule_group_lists_options():
    with pytest.raises(ConfigError, match="swft"):
        compose("config", ["schedule=nonexistent"])


def test_unknown_backend_and_key(fundus_shards):
    with pytest.raises(ConfigError, match="choose one of: dali, torch"):
        load_run_config(compose("config", [f"data.shards={fundus_shards}", "loader.backend=tf"]))
    with pytest.raises(ConfigError, match="lr_typo"):
        load_run_config(compose("config", [f"data.shards={fundus_shards}", "+trainer.lr_typo=1"]))


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(DataError, match="no manifest.json"):
        load_run_config(compose("config", [f"data.shards={tmp_path}"]))
    from tltrain.data.prepare import PrepareConfig

    with pytest.raises(DataError, match="no such folder"):
        to_typed(compose("prepare", [f"source.root={tmp_path}/nope", f"out={tmp_path}/o"]), PrepareConfig)


def test_fraction_must_be_prepared(fundus_shards):
    with pytest.raises(ConfigError, match="choose one of: 0.1, 0.2"):
        load_run_config(compose("config", [f"data.shards={fundus_shards}", "data.fraction=0.3"]))


def test_scratch_with_weights_is_contradictory(fundus_shards, tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    with pytest.raises(ConfigError, match="random-init reference"):
        load_run_config(compose("config", [f"data.shards={fundus_shards}", "schedule=scratch",
                                           f"model.weights={weights}"]))


def test_cli_prints_errors_without_traceback(tmp_path):
    done = subprocess.run([TLTRAIN, "prepare", f"source.root={tmp_path}", f"out={tmp_path}/o", "on_problem=maybe"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "choose one of: fail, skip" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([TLTRAIN, "train", f"data.shards={tmp_path}"], capture_output=True, text=True)
    assert done.returncode == 2 and "no manifest.json" in done.stdout + done.stderr


@pytest.mark.parametrize("name", ["li2017", "cheng_malhi", "hulman", "thtl_step1", "thtl_step2", "alzubaidi", "sallam"])
def test_paper_experiment_configs_validate(name, fundus_shards):
    run = load_run_config(compose("config", [f"+experiment={name}", f"data.shards={fundus_shards}"]))
    assert run.schedule.name and run.model.arch


def test_sweep_run_folder_names_fit_the_file_system():
    """A sweep with many overrides (the demo's grid has 13) once failed: 'File name too long'."""
    from tltrain.config import MAX_SUBDIR_BYTES, sweep_subdir, weights_tag

    short = sweep_subdir(3, "schedule=swft,seed=1")
    assert short == "3_schedule=swft,seed=1"
    many = ",".join(f"key{i}.option=value_{i}" for i in range(30))
    cut, other = sweep_subdir(12, many), sweep_subdir(12, many + ",seed=2")
    assert len(cut.encode()) <= MAX_SUBDIR_BYTES and cut.startswith("12_key0.option=value_0") and cut != other
    assert weights_tag(None) == "scratch" and weights_tag("/runs/step1_fundus") == "run-step1_fundus"
