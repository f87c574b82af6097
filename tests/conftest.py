"""Shared fixtures: one small synthetic dataset and its shards per test session (real files, real prepare).

Also the helpers several test modules use (`from conftest import ...`): the repository root, the console scripts of
this venv, free ports, a clean environment for child training processes, polling, and the SLURM cluster check."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = Path(__file__).resolve().parents[1]
# The console scripts installed beside this interpreter (the venv's), not whatever PATH finds first.
TLTRAIN = str(Path(sys.executable).with_name("tltrain"))
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
# The variables torchrun and SLURM set for a rank: a child started from a test must not inherit the test's own.
_RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_USABLE_STATES = {"idle", "mixed", "allocated", "completing"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT / torchrun --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra) -> dict[str, str]:
    """This process's environment without rank and SLURM variables, one OpenMP thread, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def wait_for(predicate, timeout=120) -> bool:
    """Poll predicate every 50 ms; whether it came true within timeout seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


def slurm_cluster_problem(slurm_conf, min_nodes: int = 1, up: str = "sudo bash slurm/up.sh") -> str | None:
    """Why the SLURM tests cannot run here (their skip reason), or None when min_nodes nodes of the cluster that
    slurm_conf describes are usable. `up` is the command that starts that cluster."""
    for tool in ("sinfo", "sbatch"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH (install slurm-client and run `{up}`)"
    conf = Path(slurm_conf)
    if not conf.is_file():  # without it sinfo tries a DNS lookup for a config server and hangs
        return f"no SLURM config at {conf}: the cluster is not set up (run `{up}`)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | {"SLURM_CONF": str(conf)}
    try:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=15,
                              env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed ({exc}): the SLURM cluster is not up (run `{up}`)"
    usable = {fields[0] for fields in map(str.split, done.stdout.splitlines())
              if len(fields) == 2 and fields[1].rstrip("*~#") in SLURM_USABLE_STATES}
    if done.returncode:
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return f"sinfo failed ({why}): the SLURM cluster is not up (run `{up}`)"
    if len(usable) < min_nodes:
        return f"fewer than {min_nodes} usable SLURM node(s) (sinfo: {done.stdout.strip()!r}); run `{up}`"
    return None


@pytest.fixture(scope="session")
def fundus_raw(tmp_path_factory) -> Path:
    from tltrain.data.synth import generate_eyepacs

    root = tmp_path_factory.mktemp("fundus_raw")
    generate_eyepacs(root, n_patients=40, width=160, seed=3, min_per_class=6, workers=2, progress=False)
    return root


@pytest.fixture(scope="session")
def fundus_shards(fundus_raw, tmp_path_factory) -> Path:
    from tltrain.data.prepare import PrepareConfig, run_prepare
    from tltrain.data.sources import SourceConfig

    out = tmp_path_factory.mktemp("fundus_shards")
    run_prepare(PrepareConfig(source=SourceConfig(kind="eyepacs", root=str(fundus_raw)), out=str(out),
                              shard_samples=12, workers=2, progress=False))
    return out


@pytest.fixture(scope="session")
def target_shards(tmp_path_factory) -> Path:
    from tltrain.data.prepare import PrepareConfig, run_prepare
    from tltrain.data.sources import SourceConfig
    from tltrain.data.synth import generate_target_domain

    raw = tmp_path_factory.mktemp("target_raw")
    generate_target_domain(raw, n_per_class=24, size=96, seed=5, workers=2, progress=False)
    out = tmp_path_factory.mktemp("target_shards")
    run_prepare(PrepareConfig(source=SourceConfig(kind="imagefolder", root=str(raw)), out=str(out),
                              val_fraction=0.2, test_fraction=0.2, shard_samples=16, workers=2, progress=False))
    return out


def tiny_run_overrides(shards, run_dir, *extra):
    """A fast real training run (resnet10t at 32 px, CPU): the base of end-to-end tests."""
    return [f"data.shards={shards}", "model.arch=resnet10t", "loader.size=32", "loader.batch_size=8",
            "loader.workers=0", "trainer=cpu", "trainer.progress=false", "schedule=finetune_all",
            "schedule.epochs_per_phase=2", f"run_dir={run_dir}", *extra]


@pytest.fixture(scope="session")
def trained_run(fundus_shards, tmp_path_factory) -> Path:
    from tltrain.train_app import train_from_overrides

    run_dir = tmp_path_factory.mktemp("run") / "fundus"
    result = train_from_overrides(tiny_run_overrides(fundus_shards, run_dir))
    assert result["status"] == "completed"
    return run_dir


@pytest.fixture(scope="session")
def dme_raw(tmp_path_factory) -> Path:
    """A small macular-oedema target (ImageFolder, with lesions.json), as `tltrain demo` writes it."""
    from tltrain.data.synth_dme import generate_dme_target

    raw = tmp_path_factory.mktemp("dme_raw")
    generate_dme_target(raw, n_per_class=20, size=96, seed=1, workers=2, progress=False)
    return raw


def tiny_pipeline_file(path: Path, out: Path, fundus_raw: Path, target_raw: Path, *, train: tuple = (),
                       sweep: tuple = ("schedule=linear_probe", "data.fraction=1.0", "seed=0,1")) -> Path:
    """A user's pipeline YAML for tiny real runs (resnet10t at 32 px on the CPU): fundus (2 array tasks) -> step 1
    -> export -> evaluate -> a 4-run THTL grid on the target (scratch and step 1, 2 seeds) -> report -> package."""
    import yaml

    run = ["model.arch=resnet10t", "loader.size=32", "loader.batch_size=8", "loader.workers=0", "trainer=cpu",
           "trainer.progress=false"]
    config = {
        "name": "tiny_fundus", "out": str(out),
        "sources": {"fundus": {"prepare": ["source=eyepacs", f"source.root={fundus_raw}", "test_fraction=0.25",
                                           "shard_samples=12", "progress=false"], "tasks": 2}},
        "target": {"prepare": ["source=imagefolder", f"source.root={target_raw}", "source.classes=[no_csme,csme]",
                               "val_fraction=0.2", "test_fraction=0.3", "shard_samples=16", "progress=false"]},
        "train": {"overrides": ["data=synthetic_fundus", *run, "schedule=finetune_all", "schedule.epochs_per_phase=2",
                                *train]},
        "export": {"license": "cc-by-4.0", "description": "tiny test checkpoint"},
        "evaluate": {"splits": ["test"], "resamples": 200},
        "grid": {"overrides": ["+experiment=thtl", "data=synthetic_dme", *run, "schedule.epochs_per_phase=1"],
                 "sweep": list(sweep), "runs_at_once": 2,
                 "resources": {"setup": ["export OMP_NUM_THREADS=1"]}},
        "launch": {"time_min": 10},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
