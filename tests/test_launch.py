"""Launcher pieces that need no SLURM: the local-executor fallback (real processes), the registry and the
state rules of `tltrain jobs`, and the checks that fail before anything is queued."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_run_overrides
from tltrain.errors import ConfigError, DataError
from tltrain.launch import LaunchConfig, TrainJob, cli_jobs, cli_submit, job_run_dir, list_jobs, submit
from tltrain.launch.config import parse_mem_gb, parse_time_min
from tltrain.launch.jobs import REGISTRY_NAME, combined_state, read_registry, record_job, registry_files


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
    record_job(tmp_path / REGISTRY_NAME, {"job_id": "1", "run_dir": "a"})
    record_job(tmp_path / "sweep" / REGISTRY_NAME, {"job_id": "2_0", "run_dir": "b"})
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
        assert cfg.callbacks.tltrain_submitit._target_ == "tltrain.launch.sweep.SweepJobCallback"


@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30:00", 90), ("2-00:00:00", 2880), ("45:40", 46),
                                           ("0:00:10", 1)])
def test_time_limit_forms(text, minutes):
    assert parse_time_min(text) == minutes


@pytest.mark.parametrize("text, gb", [("16", 16), ("16G", 16), ("16gb", 16), ("1500M", 2), ("1T", 1024)])
def test_memory_forms(text, gb):
    assert parse_mem_gb(text) == gb


def test_bad_time_and_memory_name_the_option():
    with pytest.raises(ConfigError, match=r"--time='1h'"):
        parse_time_min("1h")
    with pytest.raises(ConfigError, match=r"--mem='lots'"):
        parse_mem_gb("lots")
    with pytest.raises(ConfigError, match="signal_delay_s=120 must be shorter"):
        LaunchConfig(time_min=2).validate()


def _all_reduce_ranks() -> dict:
    """A job function: join the process group from the exported variables and sum the ranks with gloo."""
    import torch
    import torch.distributed as dist

    from tltrain.launch.env import export_distributed_env

    env = export_distributed_env()
    dist.init_process_group("gloo")
    try:
        total = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(total)
        return {**env, "sum": total.item()}
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_local_tasks_get_a_working_torch_distributed_env(tmp_path):
    """submitit's local executor starts 2 real processes; the exported variables let them all_reduce."""
    import cloudpickle
    import submitit

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the job process cannot import tests/
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="local")
    executor.update_parameters(tasks_per_node=2, nodes=1, timeout_min=2)
    job = executor.submit(_all_reduce_ranks)
    results = sorted(job.results(), key=lambda r: r["RANK"])
    assert [r["RANK"] for r in results] == ["0", "1"] and [r["LOCAL_RANK"] for r in results] == ["0", "1"]
    assert {r["WORLD_SIZE"] for r in results} == {"2"} and len({r["MASTER_PORT"] for r in results}) == 1
    assert [r["sum"] for r in results] == [3.0, 3.0]  # 1 + 2 on both ranks


@pytest.mark.timeout(120)
def test_failed_local_run_is_reported_with_its_error(tmp_path, fundus_shards, monkeypatch, capsys):
    """`tltrain submit --local --wait` of a run that passes the submit-time check but fails in the job: exit 1,
    and `tltrain jobs` shows FAILED with the error from status.json and the tail of submitit's stderr log; the
    registry goes where --registry says."""
    registry = tmp_path / "home" / "jobs.jsonl"
    code = cli_submit(["--local", "--wait", "--root", str(tmp_path / "runs"), "--registry", str(registry),
                       "--name", "broken", f"data.shards={fundus_shards}", "loader.batch_size=4096"])
    assert code == 1
    assert "failed" in capsys.readouterr().err
    [row] = list_jobs(registry)
    assert row["state"] == "FAILED" and Path(row["run_dir"]).name.endswith("broken")
    assert "cannot fill one batch of 4096" in row["error"]
    assert any("ConfigError" in line for line in row["log_tail"])
    assert cli_jobs([str(registry), "--tail", "5"]) == 1
    shown = capsys.readouterr().out
    assert "FAILED" in shown and "cannot fill one batch" in " ".join(shown.split())


def _sweep(shards, sweep_dir, launcher, path_env, *extra):
    overrides = [o for o in tiny_run_overrides(shards, "unused") if not o.startswith("run_dir=")]
    cmd = [sys.executable, "-m", "tltrain.cli", "train", "-m", f"hydra/launcher={launcher}",
           f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}", *overrides, *extra]
    return subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=170, env={**os.environ, "PATH": path_env})


def test_slurm_sweep_without_slurm_says_to_use_the_local_launcher(fundus_shards, tmp_path):
    done = _sweep(fundus_shards, tmp_path / "sweep", "slurm", _without_sbatch_path(), "seed=0,1")
    assert done.returncode != 0
    assert "SLURM is not available here" in done.stderr and "hydra/launcher=local" in done.stderr
    assert not (tmp_path / "sweep" / "0").exists()  # nothing ran


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_local_sweep_runs_every_job_through_submitit(fundus_shards, tmp_path):
    sweep = tmp_path / "sweep"
    done = _sweep(fundus_shards, sweep, "local", os.environ["PATH"], "schedule.epochs_per_phase=1", "seed=0,1")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = list_jobs(sweep)
    assert len(rows) == 2 and [r["state"] for r in rows] == ["COMPLETED", "COMPLETED"]
    assert sorted(Path(r["run_dir"]).name for r in rows) == ["0", "1"]
    for row in rows:
        assert json.loads((Path(row["run_dir"]) / "metrics.json").read_text())["final"]["count"] > 0


GLOO_ERROR = ("RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
              "[10.0.0.2]:41234: Connection reset by peer [bold]")


def _register(root, job_id, run_dir, submitted, overrides=(), **extra):
    record_job(root / REGISTRY_NAME, {"job_id": job_id, "run_dir": str(run_dir), "overrides": list(overrides),
                                      "executor": "local", "folder": str(root / "f"), "stderr": None,
                                      "submitted": submitted, **extra})


def test_jobs_prints_error_text_that_looks_like_rich_markup(tmp_path, capsys):
    """gloo's error of a dead rank ("[/__w/.../pair.cc:545] Read error") is printed verbatim, not parsed as
    markup (it used to raise MarkupError and break the whole listing, --watch included)."""
    run_dir = tmp_path / "[weird]run"
    run_dir.mkdir()
    (run_dir / "status.json").write_text(json.dumps({"state": "failed", "error": GLOO_ERROR}))
    _register(tmp_path, "[/]7", run_dir, 1.0)
    assert cli_jobs([str(tmp_path)]) == 1
    shown = capsys.readouterr().out
    assert "pair.cc:545] Read error" in " ".join(shown.split())
    assert "[/__w/pytorch/" in shown and "[bold]" in shown and "[weird]run" in shown


def test_jobs_sorts_array_tasks_by_index_and_names_sweep_dirs(tmp_path):
    sweep = tmp_path / "sweep"
    for index, submitted in ((2, 3.0), (0, 5.0), (1, 4.0)):  # tasks registered in the order they started
        (sweep / str(index)).mkdir(parents=True)
        _register(tmp_path, f"40_{index}", sweep / str(index), submitted, ["model.arch=resnet10t", f"seed={index}"])
    (tmp_path / "plain").mkdir()
    _register(tmp_path, "39", tmp_path / "plain", 1.0, ["seed=9"])
    rows = list_jobs(tmp_path)
    assert [r["job_id"] for r in rows] == ["39", "40_0", "40_1", "40_2"]
    from tltrain.launch.jobs import run_labels
    assert run_labels(rows) == ["plain", "sweep/0 seed=0", "sweep/1 seed=1", "sweep/2 seed=2"]


def test_a_job_whose_dependency_failed_says_why():
    from tltrain.launch.jobs import _dependency_failure

    entry = {"job_id": "12", "dependency": "11"}
    slurm = {"11": {"state": "FAILED"}, "12": {"state": "CANCELLED", "reason": "DependencyNeverSatisfied"}}
    message = _dependency_failure(entry, slurm["12"], slurm)
    assert "job 11" in message and "FAILED" in message and "never started" in message
    assert _dependency_failure(entry, {"state": "PENDING", "reason": "Dependency"}, {"11": {"state": "RUNNING"}}) == ""


def test_submit_checks_the_whole_run_before_queueing(tmp_path, fundus_shards, capsys):
    """A missing data.shards or model.weights path and trainer=single with several tasks fail at submit time with
    one line and exit 2; nothing is created under the root."""
    from tltrain.cli import main

    root = tmp_path / "runs"
    cases = [(["data.shards=/nonexistent"], "no manifest.json"),
             ([f"data.shards={fundus_shards}", "model.weights=/nonexistent.pt"], "model.weights='/nonexistent.pt'"),
             (["--tasks-per-node", "2", f"data.shards={fundus_shards}"], "trainer.strategy=single runs one process"),
             (["--tasks-per-node", "3", f"data.shards={fundus_shards}", "trainer=gpu"],
              "use trainer=ddp or trainer=deepspeed")]
    for args, message in cases:
        assert main(["submit", "--local", "--root", str(root), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not root.exists()


def test_the_submit_check_imports_neither_torch_nor_timm(fundus_shards, tmp_path):
    """Why `tltrain submit` returns in well under 2 s: the config side is torch-free (torch + timm alone take
    several seconds to import); timm's model names come from a per-version cache file. scipy too: the prepare
    schema's module imports the disc finder (scipy.ndimage, ~0.6 s) only where it runs."""
    code = (f"import sys\nfrom tltrain.launch.config import LaunchConfig\nfrom tltrain.launch.submit import check_run\n"
            f"check_run(['data.shards={fundus_shards}', 'trainer=ddp'], LaunchConfig(tasks_per_node=2))\n"
            f"check_run(['data.shards={fundus_shards}', 'trainer=ddp'], LaunchConfig(tasks_per_node=2))\n"
            "heavy = sorted(m for m in ('torch', 'timm', 'deepspeed', 'nvidia.dali', 'scipy') if m in sys.modules)\n"
            "print('heavy:', heavy)\n")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert list((tmp_path / "cache" / "tltrain").glob("timm-*-models.txt"))  # the first check wrote the cache
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "heavy: []" in again.stdout, again.stdout + again.stderr[-2000:]


def test_sweeps_and_submit_share_the_batch_shell_usr2_lines():
    """Sweeps (Hydra's submitit launcher) get the same batch-script lines as `tltrain submit`, so USR2 sent to
    the batch shell is passed to the tasks in both (tests/test_slurm_multinode.py runs it on a real cluster)."""
    from omegaconf import OmegaConf

    from tltrain.launch.submit import BATCH_SHELL_USR2

    launcher = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs/hydra/launcher/slurm.yaml")
    assert list(launcher.hydra.launcher.setup) == BATCH_SHELL_USR2
    script = subprocess.run(["bash", "-n", "-c", "\n".join(BATCH_SHELL_USR2)], capture_output=True, text=True)
    assert script.returncode == 0, script.stderr
