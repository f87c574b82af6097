"""The launcher against the real one-node SLURM cluster of slurm/up.sh: sweeps as arrays, DDP across SLURM
tasks, two-step chains with afterok, preemption -> checkpoint -> requeue -> resume, failures in `tltrain jobs`.

Every job is a real tiny training run (resnet10t at 32 px on the CPU); skipped with the reason when the
cluster is not up.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import ROOT, slurm_cluster_problem, tiny_run_overrides
from tltrain.launch import job_run_dir, list_jobs, submit, submit_chain
from tltrain.launch.jobs import read_registry, slurm_states

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(170)]

STATE_DIR = Path(os.environ.get("TLTRAIN_SLURM_DIR", "/tmp/tltrain-slurm"))
os.environ.setdefault("SLURM_CONF", str(STATE_DIR / "etc" / "slurm.conf"))


_PROBLEM = slurm_cluster_problem(os.environ["SLURM_CONF"])
if _PROBLEM:
    pytestmark.append(pytest.mark.skip(reason=_PROBLEM))


def _overrides(shards, *extra) -> list[str]:
    return [o for o in tiny_run_overrides(shards, "unused") if not o.startswith("run_dir=")] + list(extra)


def _accounting(job_id: str) -> dict:
    """sacct's record once complete (right after a job ends the record may briefly lack Start/End)."""
    for _ in range(20):
        record = slurm_states([job_id]).get(job_id, {})
        if record.get("end") not in (None, "", "Unknown"):
            return record
        time.sleep(0.5)
    raise AssertionError(f"sacct has no complete record of job {job_id}: {record}")


def _settled_rows(root) -> list[dict]:
    """list_jobs once SLURM's accounting caught up: a job whose result is written may show RUNNING a moment."""
    for _ in range(40):
        rows = list_jobs(root)
        if all(r["slurm_state"] not in ("RUNNING", "COMPLETING", "PENDING") for r in rows):
            return rows
        time.sleep(0.5)
    raise AssertionError(f"jobs still running according to SLURM: {rows}")


def test_hydra_sweep_is_one_array_and_every_run_completes(fundus_shards, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "tltrain.cli", "train", "-m", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep}",
           "hydra.sweep.subdir=${hydra.job.num}", "hydra.launcher.timeout_min=5",
           *_overrides(fundus_shards, "schedule.epochs_per_phase=1"), "seed=0,1,2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=160)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    entries = read_registry(sweep / ".tltrain_jobs.jsonl")
    assert len(entries) == 3
    arrays = {e["job_id"].split("_")[0] for e in entries}
    assert len(arrays) == 1, f"expected one SLURM array, got job ids {[e['job_id'] for e in entries]}"
    assert sorted(e["job_id"].split("_")[1] for e in entries) == ["0", "1", "2"]
    for num in range(3):
        metrics = json.loads((sweep / str(num) / "metrics.json").read_text())
        assert metrics["final"]["count"] > 0 and len(metrics["history"]) == 1
    rows = _settled_rows(sweep)
    assert [r["state"] for r in rows] == ["COMPLETED"] * 3
    assert {r["slurm_state"] for r in rows} == {"COMPLETED"}


def test_two_slurm_tasks_get_a_working_torch_distributed_env(tmp_path):
    """2 tasks of one SLURM job (srun) join one gloo process group from the variables exported from SLURM's."""
    import cloudpickle
    import submitit
    import test_launch

    cloudpickle.register_pickle_by_value(test_launch)  # the job process cannot import tests/
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(tasks_per_node=2, nodes=1, timeout_min=3)
    job = executor.submit(test_launch._all_reduce_ranks)
    results = sorted(job.results(), key=lambda r: r["RANK"])
    assert [r["RANK"] for r in results] == ["0", "1"] and {r["WORLD_SIZE"] for r in results} == {"2"}
    assert len({r["MASTER_ADDR"] + ":" + r["MASTER_PORT"] for r in results}) == 1
    assert [r["sum"] for r in results] == [3.0, 3.0]


def test_two_slurm_tasks_train_with_ddp_and_agree(fundus_shards, tmp_path):
    job = submit(_overrides(fundus_shards, "trainer.strategy=ddp", "schedule.epochs_per_phase=1"),
                 root=str(tmp_path), local=False, tasks_per_node=2, time_min=5)
    rank0, rank1 = job.results()
    assert rank0["status"] == rank1["status"] == "completed"
    assert rank0["step"] == rank1["step"] > 0
    assert rank0["final"] == rank1["final"]  # metrics gathered over both ranks, identical everywhere
    status = json.loads((Path(job_run_dir(job)) / "status.json").read_text())
    assert status["world_size"] == 2 and status["strategy"] == "ddp"


def test_chain_step2_starts_after_step1_from_its_weights(fundus_shards, tmp_path):
    step1 = _overrides(fundus_shards, "schedule.epochs_per_phase=1")
    step2 = _overrides(fundus_shards, "schedule=linear_probe", "schedule.epochs_per_phase=1")
    job1, job2 = submit_chain(step1, step2, root=str(tmp_path), local=False, time_min=5)
    assert job2.result()["status"] == "completed"
    end1 = datetime.fromisoformat(_accounting(str(job1.job_id))["end"])
    start2 = datetime.fromisoformat(_accounting(str(job2.job_id))["start"])
    assert start2 >= end1, f"step 2 started {start2} before step 1 ended {end1}"
    step1_dir, step2_dir = job_run_dir(job1), job_run_dir(job2)
    assert f"model.weights={step1_dir}" in job2.submission().function.overrides
    report = json.loads((Path(step2_dir) / "weights_report.json").read_text())
    assert any(k.startswith("layer4.") for k in report["matched"])  # the backbone came from step 1
    assert not report["new"] and not report["mismatched"]


def test_preempted_run_requeues_and_resumes_to_the_full_step_count(fundus_shards, tmp_path):
    job = submit(_overrides(fundus_shards, "schedule.epochs_per_phase=4"), root=str(tmp_path), local=False,
                 time_min=5, max_retries=2)
    run_dir = Path(job_run_dir(job))
    deadline = time.time() + 90
    status = {}
    while status.get("step", 0) < 8:  # past the first epoch: the signal lands mid-run
        assert time.time() < deadline, f"run did not reach step 8: {status}"
        time.sleep(0.3)
        try:
            status = json.loads((run_dir / "status.json").read_text())
        except (OSError, ValueError):
            pass
    subprocess.run(["scancel", "--signal=USR2", str(job.job_id)], check=True)  # SLURM's time-limit warning
    result = job.result()
    assert result["status"] == "completed"
    assert result["step"] == status["steps_per_epoch"] * 4 and result["epoch"] == 4
    log = Path(job.paths.stdout).read_text()
    assert "handing over to submitit to requeue" in log and "resumed from step-" in log
    assert "(attempt 2)" in log
    [row] = _settled_rows(tmp_path)
    assert row["state"] == "COMPLETED" and row["step"] == result["step"]


def test_failed_run_is_reported_with_its_error(fundus_shards, tmp_path):
    overrides = [o for o in _overrides(fundus_shards) if not o.startswith("loader.batch_size=")]
    job = submit(overrides + ["loader.batch_size=4096"], root=str(tmp_path), local=False, time_min=5)
    assert "cannot fill one batch of 4096" in str(job.exception())
    [row] = _settled_rows(tmp_path)
    assert row["state"] == "FAILED" and row["slurm_state"] == "FAILED"
    assert "cannot fill one batch of 4096" in row["error"]
    assert any("ConfigError" in line for line in row["log_tail"])


def test_prepare_as_three_array_tasks_matches_one_process(fundus_raw, tmp_path):
    """`submit_prepare` with K=3: check and write as arrays, finish after them; shards byte-identical."""
    from test_prepare_tasks import same_result

    from tltrain.data.prepare import PrepareConfig, run_prepare
    from tltrain.data.sources import SourceConfig
    from tltrain.launch.prepare_job import submit_prepare

    run_prepare(PrepareConfig(source=SourceConfig(kind="eyepacs", root=str(fundus_raw)), out=str(tmp_path / "one"),
                              shard_samples=7, resize="radius:24", workers=2, progress=False))
    jobs = submit_prepare([f"source.root={fundus_raw}", f"out={tmp_path / 'split'}", "shard_samples=7",
                           "resize=radius:24", "workers=1"], tasks=3, root=str(tmp_path), local=False, time_min=5)
    assert len(jobs) == 7 and len({str(j.job_id).split("_")[0] for j in jobs}) == 3
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert jobs[-1].result()["shards"] == len(one["shards"])
    same_result(tmp_path / "one", tmp_path / "split")
    states = {str(j.job_id): _accounting(str(j.job_id)).get("state") for j in jobs}
    assert set(states.values()) == {"COMPLETED"}, states
