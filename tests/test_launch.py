"""Launcher pieces that need no SLURM: the local-executor fallback (real processes), the registry and the
state rules of `tltrain jobs`, and the checks that fail before anything is queued."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import tiny_run_overrides
from tltrain.errors import ConfigError, DataError
from tltrain.launch.jobs import (REGISTRY_NAME, cli_jobs, combined_state, list_jobs, read_registry, record_job,
                                 registry_files)
from tltrain.launch.submit import LaunchConfig, TrainJob, cli_submit, job_run_dir, submit


def _without_sbatch_path() -> str:
    """PATH with every folder that holds sbatch removed: what a laptop without SLURM looks like."""
    return os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if not (Path(p) / "sbatch").exists())


@pytest.mark.timeout(180)
def test_local_fallback_runs_to_completion(fundus_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", _without_sbatch_path())
    assert shutil.which("sbatch") is None
    overrides = [o for o in tiny_run_overrides(fundus_shards, "unused") if not o.startswith("run_dir=")]
    job = submit(overrides + ["schedule.epochs_per_phase=1"], root=str(tmp_path / "runs"), time_min=5)
    assert "SLURM is not available" in capsys.readouterr().err  # local=None fell back, and said so
    result = job.result()
    run_dir = Path(job_run_dir(job))
    assert result["status"] == "completed" and result["step"] > 0
    assert run_dir.parent == (tmp_path / "runs").resolve()
    assert json.loads((run_dir / "metrics.json").read_text())["final"]["count"] > 0
    [row] = list_jobs(tmp_path / "runs")
    assert row["state"] == "COMPLETED" and row["slurm_state"] == "COMPLETED"
    assert row["step"] == result["step"] and row["epoch"] == row["total_epochs"] == 1
    assert row["accuracy"] == pytest.approx(result["final"]["accuracy"])
    assert cli_jobs([str(tmp_path / "runs")]) == 0
    assert "COMPLETED" in capsys.readouterr().out


def test_trainjob_marks_a_run_failed_before_the_trainer_starts(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match="nonexistent"):
        TrainJob(["data.shards=/nonexistent"], run_dir)()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "no manifest.json" in status["error"]


def test_a_misspelt_override_fails_before_submitting(tmp_path):
    with pytest.raises(ConfigError, match="trainr"):
        submit(["trainr.lr=0.1"], root=str(tmp_path), local=True)
    assert not (tmp_path / REGISTRY_NAME).exists()
    with pytest.raises(ConfigError, match="trainr"):
        cli_submit(["--local", "--root", str(tmp_path), "trainr.lr=0.1"])


@pytest.mark.parametrize("field, value, message", [("nodes", 0, "launch.nodes=0 must be >= 1"),
                                                   ("max_retries", -1, "launch.max_retries=-1"),
                                                   ("mem_gb", 0, "launch.mem_gb=0"),
                                                   ("time_min", 0, "launch.time_min=0")])
def test_launch_config_names_the_bad_key(field, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        LaunchConfig(**{field: value}).validate()
    with pytest.raises(ConfigError, match="needs SLURM"):
        LaunchConfig(nodes=2, local=True).validate()


def test_local_executor_refuses_dependencies(tmp_path, fundus_shards):
    with pytest.raises(ConfigError, match="dependency='123' needs SLURM"):
        submit([f"data.shards={fundus_shards}"], root=str(tmp_path), local=True, dependency="123")


@pytest.mark.parametrize("slurm, run, expected", [
    ("COMPLETED", "failed", "FAILED"),  # a sweep job catches its run's error: SLURM says COMPLETED
    ("COMPLETED", "completed", "COMPLETED"),
    ("COMPLETED", "preempted", "PREEMPTED"),  # stopped and not requeued: must not look finished
    ("COMPLETED", None, "NO STATUS"),
    ("RUNNING", "running", "RUNNING"),
    ("TIMEOUT", "running", "TIMEOUT"),
    ("PENDING", None, "PENDING"),
    (None, "running", "RUNNING"),
])
def test_combined_state(slurm, run, expected):
    assert combined_state(slurm, run) == expected


def test_registry_round_trip_and_damaged_line(tmp_path):
    record_job(tmp_path, {"job_id": "1", "run_dir": "a"})
    record_job(tmp_path / "sweep", {"job_id": "2_0", "run_dir": "b"})
    assert [e["job_id"] for e in read_registry(tmp_path / REGISTRY_NAME)] == ["1"]
    assert len(registry_files(tmp_path)) == 2  # a root finds the sweeps' registries below it too
    with open(tmp_path / REGISTRY_NAME, "a") as handle:
        handle.write("{not json\n")
    with pytest.raises(DataError, match=rf"{REGISTRY_NAME}:2: not a JSON line"):
        read_registry(tmp_path / REGISTRY_NAME)
    with pytest.raises(DataError, match="no such registry"):
        registry_files(tmp_path / "missing")


def test_hydra_launcher_configs_compose():
    """The launcher groups resolve to hydra-submitit-launcher's configs with our defaults and callback."""
    from hydra import compose, initialize_config_dir

    from tltrain.config import CONFIG_DIR, register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        slurm = compose("config", ["hydra/launcher=slurm"], return_hydra_config=True).hydra
        local = compose("config", ["hydra/launcher=local"], return_hydra_config=True).hydra
    assert slurm.launcher._target_.endswith("SlurmLauncher")
    assert slurm.launcher.partition == "debug" and slurm.launcher.max_num_timeout == 3
    assert local.launcher._target_.endswith("LocalLauncher")
    for cfg in (slurm, local):
        assert cfg.callbacks.tltrain_submitit._target_ == "tltrain.launch.submit.SweepJobCallback"
