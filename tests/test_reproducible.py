"""Same config and seed, same run, bit for bit, on the CPU: weights, optimizer state, metrics and predictions.

For both loader backends (torch: webdataset in 2 DataLoader workers with the Poisson class-balanced sampler and
augmentation; DALI CPU: reader shuffle and augmentation ops in 2 threads), with dropout on (the trainer's torch
RNG matters), for a fresh run, and for a run stopped at a random step by kill -9 or by SIGUSR2 (preemption
checkpoint, exit 75) and then resumed in a new process. Every run is a real process (tests/signal_run.py sends
the signal at the chosen batch); only wall-clock figures (images/s, data wait) may differ.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, tiny_run_overrides
from tltrain.engine.checkpoint import CheckpointManager
from tltrain.engine.signals import PREEMPTED_EXIT_CODE

STEPS_PER_EPOCH, EPOCHS = 4, 2  # fraction 0.6 = 33 training images, batches of 8
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
TIMING = ("images_per_s", "wait_fraction", "wall_time_s")
BACKENDS = {
    "torch": ["loader.workers=2", "loader.balanced=true"],
    "dali": ["loader=dali", "loader.dali_device=cpu", "loader.workers=2", "loader.dtype=fp32",
             "loader.channels_last=false"],
}


def overrides(shards, run_dir, backend: str) -> list[str]:
    return tiny_run_overrides(shards, run_dir, "data.fraction=0.6", "model.drop_rate=0.2",
                              "trainer.checkpoint_every_steps=1", *BACKENDS[backend])


def launch(signal_name: str, at: int, args: list[str]) -> subprocess.CompletedProcess:
    """tests/signal_run.py in a fresh process: the run, with signal_name sent at its at-th training batch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    return subprocess.run([sys.executable, str(ROOT / "tests" / "signal_run.py"), signal_name, str(at), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def reference(fundus_shards, tmp_path_factory):
    """The uninterrupted run of each backend, made once per module."""
    runs = {}

    def get(backend: str) -> Path:
        if backend not in runs:
            run_dir = tmp_path_factory.mktemp(f"reference_{backend}") / "run"
            proc = launch("none", 0, overrides(fundus_shards, run_dir, backend))
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
            runs[backend] = run_dir
        return runs[backend]

    return get


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def _tensors(value, prefix=""):
    """Every tensor of a nested state dict, by path."""
    if torch.is_tensor(value):
        yield prefix, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{prefix}/{i}")


def assert_same_run(run: Path, ref: Path, what: str) -> None:
    """Bit-identical: final and best checkpoints (weights and optimizer), metrics.json, test predictions."""
    mine, theirs = CheckpointManager(run, is_main=False), CheckpointManager(ref, is_main=False)
    assert json.loads((run / "status.json").read_text())["state"] == "completed", what
    for pick in ("latest", "best"):
        a, b = getattr(mine, pick)(), getattr(theirs, pick)()
        assert (a["name"], a["step"]) == (b["name"], b["step"]), f"{what}: {pick} checkpoint {a} vs {b}"
        state_a, state_b = mine.read(a), theirs.read(b)
        for part in ("model", "optimizer"):
            ta, tb = dict(_tensors(state_a[part])), dict(_tensors(state_b[part]))
            assert ta.keys() == tb.keys(), f"{what}: {pick} {part} keys differ"
            differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
            assert not differ, f"{what}: {pick} {part} differs in {differ[:4]}"
    metrics_a = _without_timing(json.loads((run / "metrics.json").read_text()))
    metrics_b = _without_timing(json.loads((ref / "metrics.json").read_text()))
    assert json.dumps(metrics_a, sort_keys=True) == json.dumps(metrics_b, sort_keys=True), what
    assert len(metrics_a["history"]) == EPOCHS and all(h["train_loss"] > 0 for h in metrics_a["history"])
    assert metrics_a["test"]["count"] > 0
    for name in ("predictions_test.csv",):  # per-image test predictions, where the trainer writes them
        assert (run / name).exists() == (ref / name).exists(), what
        if (ref / name).exists():
            assert (run / name).read_bytes() == (ref / name).read_bytes(), f"{what}: {name} differs"


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_two_fresh_runs_are_bit_identical(backend, fundus_shards, reference, tmp_path):
    ref = reference(backend)
    proc = launch("none", 0, overrides(fundus_shards, tmp_path / "again", backend))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path / "again", ref, f"{backend} fresh")


def _stop_and_resume(backend, shards, run_dir, signal_name: str, at: int) -> None:
    args = overrides(shards, run_dir, backend)
    stopped = launch(signal_name, at, args)
    status = json.loads((run_dir / "status.json").read_text())
    if signal_name == "KILL":
        assert stopped.returncode == -signal.SIGKILL, stopped.stderr[-3000:]
        assert status["state"] == "running"  # nobody wrote an end: rundir.is_stale tells readers
    else:
        assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stderr[-3000:]
        # a signal during the fetch of batch `at` interrupts that data wait: the checkpoint holds step at - 1;
        # one after the fetch lets the step complete: step at
        saved = at if signal_name.endswith("-after") else at - 1
        assert status["state"] == "preempted" and status["step"] == saved, (status, at)
        assert CheckpointManager(run_dir, is_main=False).latest()["step"] == saved
    resumed = launch("none", 0, args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ("resumed from" in resumed.stdout) == (at > 1 or signal_name != "KILL"), resumed.stdout[-2000:]


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=pytest.mark.slow)])
def test_kill_9_at_a_random_step_then_resume_equals_uninterrupted(backend, fundus_shards, reference, tmp_path):
    at = random.randint(2, TOTAL_STEPS)
    _stop_and_resume(backend, fundus_shards, tmp_path / "run", "KILL", at)
    assert_same_run(tmp_path / "run", reference(backend), f"{backend}: kill -9 at batch {at}, resumed")


@pytest.mark.parametrize("backend", [pytest.param("torch", marks=pytest.mark.slow), "dali"])
def test_usr2_at_a_random_step_then_resume_equals_uninterrupted(backend, fundus_shards, reference, tmp_path):
    at = random.randint(1, TOTAL_STEPS)
    mode = random.choice(["USR2", "USR2-after"])  # during the data wait, or during the step
    _stop_and_resume(backend, fundus_shards, tmp_path / "run", mode, at)
    assert_same_run(tmp_path / "run", reference(backend), f"{backend}: {mode} at batch {at}, resumed")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_preemption_on_an_epochs_last_batch_keeps_its_train_loss(backend, fundus_shards, reference, tmp_path):
    """The checkpoint then holds the whole epoch's loss sum; the resumed run reads no batch of that epoch."""
    _stop_and_resume(backend, fundus_shards, tmp_path / "run", "USR2-after", STEPS_PER_EPOCH)
    assert_same_run(tmp_path / "run", reference(backend), f"{backend}: USR2 on the first epoch's last batch")


@pytest.mark.slow
def test_usr2_while_fetching_an_epochs_first_batch_saves_nothing_new(fundus_shards, reference, tmp_path):
    """The epoch-end checkpoint already holds the state when the next epoch's first fetch is interrupted: no new
    checkpoint, and the resumed run still equals the uninterrupted one."""
    args = overrides(fundus_shards, tmp_path / "run", "torch")
    stopped = launch("USR2", STEPS_PER_EPOCH + 1, args)
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stderr[-3000:]
    manager = CheckpointManager(tmp_path / "run", is_main=False)
    assert manager.latest()["step"] == STEPS_PER_EPOCH
    assert manager.latest()["kappa"] is not None  # still the epoch-end save with its validation metric
    resumed = launch("none", 0, args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "run", reference("torch"), "torch: USR2 while fetching epoch 2's first batch")


@pytest.mark.slow
def test_trainer_deterministic_switches_on_torchs_deterministic_mode(fundus_shards, reference, tmp_path):
    """trainer.deterministic=true reaches torch (deterministic algorithms in warn-only mode, cuDNN without
    autotuning, a fixed cuBLAS workspace) in a real run, and on the CPU it changes no number of the run."""
    script = ("import json, os, sys, torch\n"
              "from tltrain.train_app import train_from_overrides\n"
              "result = train_from_overrides(sys.argv[1:])\n"
              "print(json.dumps({'status': result['status'], 'on': torch.are_deterministic_algorithms_enabled(),"
              " 'warn_only': torch.is_deterministic_algorithms_warn_only_enabled(),"
              " 'cudnn': [torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark],"
              " 'cublas': os.environ.get('CUBLAS_WORKSPACE_CONFIG')}))\n")
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    env.update(OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    args = [*overrides(fundus_shards, tmp_path / "run", "torch"), "trainer.deterministic=true"]
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    flags = json.loads(proc.stdout.strip().splitlines()[-1])
    assert flags == {"status": "completed", "on": True, "warn_only": True, "cudnn": [True, False],
                     "cublas": ":4096:8"}, flags
    assert_same_run(tmp_path / "run", reference("torch"), "trainer.deterministic=true")
