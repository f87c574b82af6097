"""Multi-node training on the real two-node cluster of `slurm/up.sh --nodes 2` (slurmd n1 and n2 in their own
network namespaces, gloo between them over a bridge), submitted as a user would with `tltrain submit` and the
shipped presets: DDP and DeepSpeed ZeRO-2 on 2 nodes x 1 task agree with 1 node x 2 tasks, 2 x 2 runs, USR2 to
the batch shell and `scontrol requeue` resume to the weights of the uninterrupted run, a SIGKILLed rank fails the
job quickly and `tltrain jobs` says so, a failed chain step 1 cancels step 2.

The jobs are polled with sacct on this cluster's SLURM_CONF (never through submitit's shared job watcher, which
would mix up job ids with the one-node cluster's when both run in one pytest process). Skipped with the reason
when the cluster is not up; CI starts it (.ci/run) and runs this module with `make test-multinode`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, slurm_cluster_problem, tiny_run_overrides

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.multinode, pytest.mark.timeout(900)]

STATE_DIR = Path(os.environ.get("TLTRAIN_SLURM_MN_DIR", "/tmp/tltrain-slurm-mn"))
SLURM_CONF = STATE_DIR / "etc" / "slurm.conf"
END_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_CONF=str(SLURM_CONF), TLTRAIN_SLURM_DIR=str(STATE_DIR), OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu")
    return env


_PROBLEM = slurm_cluster_problem(SLURM_CONF, min_nodes=2, up="sudo bash slurm/up.sh --nodes 2")
if _PROBLEM:
    pytestmark.append(pytest.mark.skip(reason=_PROBLEM))


def _run(*cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}: {done.stdout[-1500:]}{done.stderr[-1500:]}")
    return done


_START_WEIGHTS: list[str] = []  # set by the start_weights fixture


def _overrides(shards, *extra: str) -> list[str]:
    """The tiny run of the other SLURM tests with a shipped trainer preset; 2 epochs give a requeue room. Every
    run starts from the same local weights, so runs in different layouts can be compared weight for weight."""
    base = [o for o in tiny_run_overrides(shards, "unused")
            if not o.startswith(("run_dir=", "trainer=", "loader.batch_size=", "schedule.epochs_per_phase="))]
    return base + ["loader.batch_size=4", "schedule.epochs_per_phase=2", "device=cpu", *_START_WEIGHTS, *extra]


@pytest.fixture(autouse=True)
def this_cluster(monkeypatch):
    """In-process calls (list_jobs runs sacct) talk to this cluster too, only for the duration of a test."""
    monkeypatch.setenv("SLURM_CONF", str(SLURM_CONF))


@pytest.fixture(scope="module", autouse=True)
def start_weights(trained_run):
    _START_WEIGHTS[:] = [f"model.weights={trained_run}"]
    yield
    _START_WEIGHTS.clear()


def tltrain_submit(root: Path, name: str, nodes: int, tasks: int, overrides: list[str], *options: str) -> str:
    done = _run(sys.executable, "-m", "tltrain.cli", "submit", "--slurm", "--nodes", str(nodes), "--tasks-per-node",
                str(tasks), "--time", "20", "--root", str(root), "--name", name, *options, *overrides)
    return done.stdout.split()[-1]


def sacct(job_id: str) -> dict:
    out = _run("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,ExitCode,NodeList,Reason",
               check=False).stdout.strip().splitlines()
    if not out:
        return {}
    state, code, nodes, reason = out[0].split("|")
    return {"state": state.split()[0], "exit_code": code, "nodes": nodes, "reason": reason}


def restarts(job_id: str) -> int:
    """How often SLURM requeued the job (scontrol keeps ended jobs MinJobAge=300 s)."""
    fields = dict(t.split("=", 1) for t in _run("scontrol", "show", "job", "-o", job_id).stdout.split() if "=" in t)
    return int(fields["Restarts"])


def wait_end(job_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = sacct(job_id)
        if record.get("state") in END_STATES:
            return record
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not end in {timeout} s: {sacct(job_id)}")


def run_dir(root: Path, name: str) -> Path:
    [path] = [p for p in root.iterdir() if p.is_dir() and p.name.endswith(f"_{name}")]
    return path


def status(path: Path) -> dict:
    try:
        return json.loads((path / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_checkpoint(path: Path, step: int, timeout: float = 400) -> int:
    """The step of the run's latest checkpoint once it is at least `step`. With trainer.checkpoint_every_steps a
    run records progress mid-epoch this way (status.json only at epoch ends), so a signal or a kill can be sent
    early in epoch 1 and land with most of the run still ahead, however fast the machine trains."""
    from tltrain.engine.checkpoint import CheckpointManager
    from tltrain.errors import DataError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            latest = CheckpointManager(path, is_main=False).latest()
        except (OSError, DataError):
            latest = None
        if latest and latest["step"] >= step:
            return latest["step"]
        time.sleep(0.2)
    raise AssertionError(f"{path} wrote no checkpoint at step {step} or later: {status(path)}")


def final_metrics(path: Path) -> dict:
    return json.loads((path / "metrics.json").read_text())["final"]


def weights(path: Path) -> dict:
    from tltrain.engine.checkpoint import consolidate_checkpoint

    return consolidate_checkpoint(path)


def assert_same_run(a: Path, b: Path, atol: float = 1e-4) -> None:
    fa, fb = final_metrics(a), final_metrics(b)
    assert fa["count"] == fb["count"]
    for key in ("accuracy", "kappa", "cross_entropy"):
        assert fa[key] == pytest.approx(fb[key], abs=atol), (key, fa[key], fb[key])
    wa, wb = weights(a), weights(b)
    for key in wb:
        torch.testing.assert_close(wa[key].float(), wb[key].float(), atol=atol, rtol=1e-3)


def _submit_and_wait(root: Path, shards, plan: dict) -> tuple[dict, dict]:
    started = time.monotonic()
    jobs = {name: tltrain_submit(root, name, nodes, tasks, _overrides(shards, preset))
            for name, (nodes, tasks, preset) in plan.items()}
    records = {name: wait_end(job) for name, job in jobs.items()}
    print(f"multinode: {', '.join(plan)} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return jobs, records


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multinode")


@pytest.fixture(scope="module")
def runs(root, fundus_shards):
    """The uninterrupted DDP runs, all submitted at once (the cluster queues what does not fit)."""
    plan = {"ddp_2x1": (2, 1, "trainer=ddp"), "ddp_1x2": (1, 2, "trainer=ddp"), "ddp_2x2": (2, 2, "trainer=ddp")}
    jobs, records = _submit_and_wait(root, fundus_shards, plan)
    return root, jobs, records


@pytest.fixture(scope="module")
def ds_runs(root, fundus_shards):
    plan = {"ds_2x1": (2, 1, "trainer=deepspeed"), "ds_1x2": (1, 2, "trainer=deepspeed")}
    jobs, records = _submit_and_wait(root, fundus_shards, plan)
    return root, jobs, records


def _compare_layouts(root: Path, records: dict, strategy: str, atol: float) -> None:
    two_nodes, one_node = records[f"{strategy}_2x1"], records[f"{strategy}_1x2"]
    assert two_nodes["state"] == one_node["state"] == "COMPLETED", (two_nodes, one_node)
    assert two_nodes["nodes"] == "n[1-2]" and one_node["nodes"] in ("n1", "n2")
    a, b = run_dir(root, f"{strategy}_2x1"), run_dir(root, f"{strategy}_1x2")
    assert status(a)["world_size"] == status(b)["world_size"] == 2
    assert status(a)["strategy"] == ("ddp" if strategy == "ddp" else "deepspeed")
    assert_same_run(a, b, atol=atol)  # the same global batches in the same order: float noise only


def test_ddp_two_nodes_one_task_each_match_one_node_two_tasks(runs):
    root, jobs, records = runs
    _compare_layouts(root, records, "ddp", atol=1e-4)


def test_two_nodes_two_tasks_each(runs):
    root, jobs, records = runs
    assert records["ddp_2x2"]["state"] == "COMPLETED" and records["ddp_2x2"]["nodes"] == "n[1-2]"
    path = run_dir(root, "ddp_2x2")
    assert status(path)["world_size"] == 4 and status(path)["state"] == "completed"
    assert final_metrics(path)["count"] == final_metrics(run_dir(root, "ddp_2x1"))["count"]  # every val image once


@pytest.mark.parametrize("interrupt", ["usr2_batch_shell", "scontrol_requeue"])
def test_interrupted_two_node_run_resumes_to_the_same_weights(runs, fundus_shards, interrupt):
    root, jobs, records = runs
    # a checkpoint every 2 steps (weights unchanged): the signal goes out at the first one, in epoch 1, and has the
    # rest of the run to land in (waiting for epoch 1's end left only epoch 2: ~2 s here, less on a faster machine)
    job = tltrain_submit(root, interrupt, 2, 1, _overrides(fundus_shards, "trainer=ddp",
                                                           "trainer.checkpoint_every_steps=2"))
    path = run_dir(root, interrupt)
    reached = wait_checkpoint(path, 2)
    if interrupt == "usr2_batch_shell":  # what a user or a site's preemption script sends; used to kill the job
        _run("scancel", "--signal=USR2", "--batch", job)
    else:
        _run("scontrol", "requeue", job)
    record = wait_end(job)
    assert record["state"] == "COMPLETED" and restarts(job) == 1, record
    log = "\n".join(p.read_text() for p in (path / ".submitit").rglob("*_0_log.out"))
    assert "(attempt 1)" in log and "(attempt 2)" in log and "(attempt 3)" not in log
    assert "CalledProcessError" not in log
    assert "resumed from step-" in log
    assert status(path)["step"] == status(run_dir(root, "ddp_2x1"))["step"] > reached
    assert_same_run(path, run_dir(root, "ddp_2x1"), atol=1e-5)


def test_a_sigkilled_rank_fails_the_job_within_a_minute(root, fundus_shards):
    job = tltrain_submit(root, "killed", 2, 1, _overrides(fundus_shards, "trainer=ddp",
                                                          "trainer.checkpoint_every_steps=2"))
    path = run_dir(root, "killed")
    wait_checkpoint(path, 2)  # early in epoch 1: the rank is killed mid-run, not after the run ended
    victim = _task_pid(job, procid=1)
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    record = wait_end(job, timeout=120)
    assert record["state"] in ("FAILED", "CANCELLED"), record
    assert time.monotonic() - killed < 60
    from tltrain.launch.jobs import list_jobs

    [row] = [r for r in list_jobs(root) if r["job_id"] == job]
    assert row["state"] in ("FAILED", "CANCELLED") and row["error"], row
    shown = _run(sys.executable, "-m", "tltrain.cli", "jobs", str(root), check=False)
    assert shown.returncode == 1 and "Traceback" not in shown.stderr, shown.stderr[-2000:]
    assert job in shown.stdout


def _task_pid(job_id: str, procid: int) -> int:
    """The training process of one task (all nodes share this machine's process table)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = dict(item.split("=", 1) for item in (proc / "environ").read_bytes().decode(errors="replace")
                           .split("\0") if "=" in item)
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if environ.get("SLURM_JOB_ID") == job_id and environ.get("SLURM_PROCID") == str(procid) \
                and "submitit.core._submit" in cmdline:
            return int(proc.name)
    raise AssertionError(f"no process of job {job_id} task {procid}")


def test_a_failed_chain_step1_cancels_step2_and_jobs_says_why(root, fundus_shards):
    chain_root = root / "chain"
    step1 = [o for o in _overrides(fundus_shards, "trainer=ddp") if not o.startswith("loader.batch_size=")]
    done = _run(sys.executable, "-m", "tltrain.cli", "submit", "--slurm", "--time", "10", "--root", str(chain_root),
                *step1, "loader.batch_size=4096", "--chain", *_overrides(fundus_shards, "trainer=ddp"))
    job1, job2 = done.stdout.split()[-2:]
    assert wait_end(job1)["state"] == "FAILED"
    record = wait_end(job2, timeout=60)  # --kill-on-invalid-dep=yes: cancelled, not PENDING forever
    assert record["state"] == "CANCELLED", record
    from tltrain.launch.jobs import list_jobs

    for _ in range(30):  # sacct's records of both jobs settle a moment after the states
        rows = {r["job_id"]: r for r in list_jobs(chain_root)}
        if rows[job1]["error"] and rows[job2]["error"]:
            break
        time.sleep(1)
    assert "cannot fill one batch" in rows[job1]["error"]
    assert f"job {job1}" in rows[job2]["error"] and "never started" in rows[job2]["error"]
    watch = _run(sys.executable, "-m", "tltrain.cli", "jobs", str(chain_root), "--watch", "1", check=False,
                 timeout=60)
    assert watch.returncode == 1 and "never started" in watch.stdout


def test_deepspeed_two_nodes_one_task_each_match_one_node_two_tasks(ds_runs):
    """The shipped trainer=deepspeed preset (ZeRO-2, bf16, channels_last) across two nodes."""
    root, jobs, records = ds_runs
    _compare_layouts(root, records, "ds", atol=2e-2)


def test_prepare_as_three_array_tasks_on_two_nodes_matches_one_process(fundus_raw, tmp_path):
    """`tltrain submit --prepare --tasks 3` on the two-node cluster, as a user starts it: the check and write arrays
    spread over both nodes, the finish job writes the manifest and verifies, and the shards are byte-identical to a
    one-process prepare."""
    from test_prepare_tasks import same_result

    from tltrain.data.prepare import PrepareConfig, run_prepare
    from tltrain.data.sources import SourceConfig

    run_prepare(PrepareConfig(source=SourceConfig(kind="eyepacs", root=str(fundus_raw)), out=str(tmp_path / "one"),
                              shard_samples=7, resize="radius:24", workers=2, progress=False))
    name = f"mnprep{os.getpid()}"
    started = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 60))
    # a whole node (2 CPUs) per task: the first two tasks of each array start on n1 and n2 at once
    done = _run(sys.executable, "-m", "tltrain.cli", "submit", "--slurm", "--prepare", "--tasks", "3", "--time", "10",
                "--cpus-per-task", "2", "--root", str(tmp_path), "--name", name, f"source.root={fundus_raw}",
                f"out={tmp_path / 'split'}",
                "shard_samples=7", "resize=radius:24", "workers=1")
    finish = wait_end(done.stdout.split()[-1], timeout=300)
    assert finish["state"] == "COMPLETED", (finish, done.stderr[-1500:])
    same_result(tmp_path / "one", tmp_path / "split")
    nodes = set()
    for phase in ("check", "write"):
        # -S: with --name and no -j, sacct lists only jobs since midnight, so a test that runs across midnight
        # would lose the tasks that started before it; the records can also trail the finish job by a moment
        for _ in range(30):
            rows = _run("sacct", "-X", "-n", "-P", "-S", started, "--name", f"tltrain_{name}_{phase}",
                        "-o", "JobID,NodeList,State").stdout.split()
            if len(rows) == 3 and all(r.split("|")[2] == "COMPLETED" for r in rows):
                break
            time.sleep(1)
        assert len(rows) == 3 and all(r.split("|")[2] == "COMPLETED" for r in rows), rows
        nodes |= {r.split("|")[1] for r in rows}
    assert nodes == {"n1", "n2"}, (nodes, rows)  # the tasks really ran on both nodes
