"""A run_dir belongs to one run, and what a run leaves behind tells the truth: the lock (two real `tltrain train`
processes), stale status after kill -9, resume of a dead run, signals during start-up, half-written files,
trainer.epochs, Hydra's output folder, and skipped samples in metrics.json."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from conftest import wait_for as poll_until
from conftest import ROOT, TLTRAIN, tiny_run_overrides
from tltrain.engine.rundir import RunDirBusy, claim_run_dir, is_stale, lock_state, read_owner
from tltrain.engine.signals import PREEMPTED_EXIT_CODE
from tltrain.errors import ConfigError

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# Whole CLI processes start here (imports take seconds on loaded cores): a longer default bound than conftest's.
wait_for = partial(poll_until, timeout=300)


def status_of(run_dir):
    try:
        return json.loads((Path(run_dir) / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler installed for sig (the SigCgt mask in /proc/PID/status)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in text.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (sig - 1) & 1)


def test_claim_is_exclusive_between_processes_nested_within_one_and_freed_on_exit(tmp_path):
    run_dir = tmp_path / "run"
    assert lock_state(run_dir) == "absent"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from tltrain.engine.rundir import "
                               "claim_run_dir\nwith claim_run_dir(sys.argv[1]):\n print('held', flush=True); "
                               "time.sleep(60)", str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lock_state(run_dir) == "held" and read_owner(run_dir)["pid"] == holder.pid
        with pytest.raises(RunDirBusy, match=f"in use by a live run \\(pid {holder.pid} on "):
            with claim_run_dir(run_dir):
                pass
        assert is_stale(run_dir, {"state": "running", "pid": holder.pid}) is False
    finally:
        holder.kill()
        holder.wait()
    assert lock_state(run_dir) == "free"  # the OS released it with the process
    assert is_stale(run_dir, {"state": "running", "pid": holder.pid})
    assert not is_stale(run_dir, {"state": "completed"})
    with claim_run_dir(run_dir):
        with claim_run_dir(run_dir):  # the trainer inside train_app.run: same process, no deadlock
            assert lock_state(run_dir) == "held"
        assert lock_state(run_dir) == "held"
    assert lock_state(run_dir) == "free"


def test_stale_without_a_lock_file_uses_the_pid_on_this_host(tmp_path):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    assert is_stale(tmp_path, {"state": "running", "pid": dead.pid, "host": host})
    assert not is_stale(tmp_path, {"state": "running", "pid": os.getpid(), "host": host})
    assert not is_stale(tmp_path, {"state": "running", "pid": dead.pid, "host": "another-node"})  # can't tell


def test_claim_removes_what_a_killed_run_left_half_written(tmp_path):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    (ckpt / "step-00000004").mkdir(parents=True)
    leftovers = [run_dir / ".status.json.k2j3.tmp", ckpt / ".step-00000006.pt.a8f1.tmp",
                 ckpt / "step-00000004" / ".tltrain_trainer.pt.x1.tmp", ckpt / "step-00000006.pt"]
    kept = [run_dir / "status.json", ckpt / "step-00000002.pt", ckpt / "step-00000004" / "tltrain_trainer.pt",
            run_dir / "notes.tmp"]
    for path in leftovers + kept:
        path.write_bytes(b"x" * 16)
    (ckpt / "index.json").write_text(json.dumps({"checkpoints": [{"name": "step-00000002", "kind": "file"},
                                                                 {"name": "step-00000004", "kind": "deepspeed"}],
                                                 "latest": "step-00000004", "best": None, "best_value": None}))
    with claim_run_dir(run_dir):
        pass
    assert [p for p in leftovers if p.exists()] == []
    assert all(p.exists() for p in kept)


def _train_cmd(shards, run_dir, *extra):
    return [TLTRAIN, "train", *tiny_run_overrides(shards, run_dir, *extra)]


def test_second_train_into_a_live_run_dir_exits_2_and_touches_nothing(fundus_shards, tmp_path):
    """Two real `tltrain train` processes, one run_dir (relative, from another working directory): the second
    prints one line and exits 2; the first is untouched. Hydra writes no runs/<timestamp>/ or .hydra folder."""
    first = subprocess.Popen(_train_cmd(fundus_shards, "shared", "schedule.epochs_per_phase=200"), cwd=tmp_path,
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "shared"
    try:
        assert wait_for(lambda: status_of(run_dir).get("state") == "running" or first.poll() is not None)
        assert first.poll() is None, first.stderr.read()[-3000:]
        config_before = (run_dir / "config.yaml").read_text()
        second = subprocess.run(_train_cmd(fundus_shards, "shared", "seed=1"), cwd=tmp_path, env=ENV,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        lines = [line for line in (second.stdout + second.stderr).splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: run_dir='{run_dir}' is in use by a live run "
                                                       f"(pid {first.pid} on "), lines
        assert first.poll() is None and (run_dir / "config.yaml").read_text() == config_before
        assert status_of(run_dir)["pid"] == first.pid
    finally:
        first.kill()
        first.wait()
    assert not (tmp_path / "runs").exists() and not (run_dir / ".hydra").exists()
    assert status_of(run_dir)["state"] == "running" and is_stale(run_dir, status_of(run_dir))


def test_killed_run_shows_stale_in_jobs_and_resumes(fundus_shards, tmp_path):
    from tltrain.launch.jobs import REGISTRY_NAME, list_jobs, record_job

    run_dir = tmp_path / "run"
    args = tiny_run_overrides(fundus_shards, run_dir, "data.fraction=0.4", "trainer.checkpoint_every_steps=1")
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "signal_run.py"), "KILL", "3", *args], cwd=ROOT,
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    status = status_of(run_dir)
    assert status["state"] == "running" and status["pid"] and status["host"]
    record_job(tmp_path / REGISTRY_NAME, {"job_id": "4242", "run_dir": str(run_dir), "executor": "slurm"})
    [row] = list_jobs(tmp_path)  # no SLURM here: the run's own files decide
    assert row["state"] == "STALE" and row["run_state"] == "stale"
    from tltrain.report import collect_runs

    [report_row] = collect_runs(tmp_path)  # `tltrain report` does not list the dead run as running either
    assert report_row["status"] == "stale"
    resumed = subprocess.run([TLTRAIN, "train", *args], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed from step-00000002" in resumed.stdout
    assert status_of(run_dir)["state"] == "completed"
    assert list_jobs(tmp_path)[0]["state"] == "COMPLETED"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_stop_signal_during_start_up_is_a_clean_preemption(sig, fundus_shards, tmp_path):
    """Sent while `tltrain train` is still importing: no 143/140 death, status "preempted", the requeue code."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(fundus_shards, run_dir), cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: catches(proc.pid, sig), timeout=60)  # tltrain.cli's first act; imports take seconds
    assert not (run_dir / "status.json").exists(), "start-up was already over: the test proves nothing"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-2000:] + err[-2000:]
    status = status_of(run_dir)
    assert status["state"] == "preempted" and status["signal"] == sig and status["step"] == 0
    assert not list((run_dir / "checkpoints").glob("step-*"))  # nothing trained, nothing to save


def test_trainer_epochs_is_rejected_with_the_key_to_use(fundus_shards, tmp_path):
    from tltrain.config import compose
    from tltrain.train_app import load_run_config

    with pytest.raises(ConfigError, match=r"trainer.epochs=3 is not used by tltrain train.*schedule.epochs_per_phase"):
        load_run_config(compose("config", tiny_run_overrides(fundus_shards, tmp_path, "trainer.epochs=3")))
    assert load_run_config(compose("config", tiny_run_overrides(fundus_shards, tmp_path))).trainer.epochs is None


def test_skipped_samples_are_counted_in_metrics_json(fundus_shards, tmp_path):
    from tltrain.data.loaders.plan import sample_refs, select_shards
    from tltrain.train_app import train_from_overrides

    shards = tmp_path / "damaged"
    shutil.copytree(fundus_shards, shards)
    bad = []
    for split in ("train", "val"):
        ref = sample_refs(shards, select_shards(shards, split)[1])[1]
        offset, size, _ = ref.members["jpg"]
        with open(ref.tar, "r+b") as handle:
            handle.seek(offset)
            handle.write(b"\0" * size)
        bad.append(ref.key)
    # 56 training images in batches of 8: an epoch needs all of them, so the damaged one is always met;
    # the checksum check would (rightly) refuse these shards before training: off, to reach the loader's skip
    train_from_overrides(tiny_run_overrides(shards, tmp_path / "run", "schedule.epochs_per_phase=1",
                                            "data.verify_checksums=false"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    skipped = metrics["skipped_samples"]
    assert (skipped["train"], skipped["val"], skipped["test"]) == (1, 1, 0)
    assert metrics["history"][0]["skipped_samples"] == 1
    assert any(bad[0] in m for m in skipped["examples"]) and any(bad[1] in m for m in skipped["examples"])
