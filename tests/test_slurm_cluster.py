"""The one-node SLURM cluster of slurm/up.sh really runs, accounts and requeues jobs.

These tests talk to real slurmctld/slurmd/slurmdbd daemons through sbatch, sacct and scontrol, because the
submitit launcher and the sbatch example depend on exactly these behaviours (sacct states, multi-task steps,
SLURM_RESTART_COUNT after a requeue). CI runs `slurm/up.sh` first; elsewhere they skip with the reason.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import slurm_cluster_problem

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(150)]

STATE_DIR = Path(os.environ.get("TLTRAIN_SLURM_DIR", "/tmp/tltrain-slurm"))
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}


def _slurm_env() -> dict[str, str]:
    """The caller's environment, pointed at the up.sh cluster unless SLURM_CONF already names one."""
    env = dict(os.environ)
    env.setdefault("SLURM_CONF", str(STATE_DIR / "etc" / "slurm.conf"))
    return env


def _run(*cmd: str, timeout: float = 30) -> str:
    done = subprocess.run(cmd, env=_slurm_env(), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout.strip()


_PROBLEM = slurm_cluster_problem(_slurm_env()["SLURM_CONF"])
if _PROBLEM:
    pytestmark.append(pytest.mark.skip(reason=_PROBLEM))


def submit(folder: Path, body: str, *sbatch_args: str) -> str:
    """Write a batch script into `folder`, submit it with its output there, return the job id."""
    script = folder / "job.sh"
    script.write_text("#!/bin/bash\nset -eu\n" + body)
    return _run("sbatch", "--parsable", "--job-name=tltrain-test", f"--chdir={folder}",
                f"--output={folder}/slurm-%j.out", *sbatch_args, str(script)).split(";")[0]


def sacct_fields(job_id: str, fields: str = "State,ExitCode") -> list[str]:
    """The job's allocation record in the accounting DB ([] until slurmctld has sent it)."""
    out = _run("sacct", "-j", job_id, "-X", "-n", "-P", "-o", fields)
    return out.splitlines()[0].split("|") if out else []


def wait_finished(job_id: str, timeout: float = 60) -> list[str]:
    """Poll sacct until the job reaches a final state; returns [State, ExitCode].

    Also waits for the Partition field: for a job that ends within a second, slurmdbd briefly holds the end
    record before the start record has filled in partition and account.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = sacct_fields(job_id, "State,ExitCode,Partition")
        if record and record[0].split()[0] in TERMINAL_STATES and record[2]:
            return record[:2]
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not finished after {timeout} s: sacct says {sacct_fields(job_id)}, "
                         f"squeue says {_run('squeue', '-h', '-j', job_id, '-o', '%T %r')!r}")


def job_field(job_id: str, key: str) -> str:
    """One KEY=value field of `scontrol show job` (jobs stay listed MinJobAge=300 s after they end)."""
    for token in _run("scontrol", "show", "job", "-o", job_id).split():
        if token.startswith(key + "="):
            return token.split("=", 1)[1]
    raise AssertionError(f"scontrol show job {job_id} has no {key}")


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory) -> tuple[str, Path, list[str]]:
    """One successful job shared by the completion checks (each submission costs a few seconds)."""
    folder = tmp_path_factory.mktemp("ok_job")
    job_id = submit(folder, 'echo "job $SLURM_JOB_ID on $SLURMD_NODENAME" > result.txt\n')
    return job_id, folder, wait_finished(job_id)


def test_batch_job_writes_its_file_and_completes(finished_job):
    job_id, folder, _ = finished_job
    assert (folder / "result.txt").read_text().startswith(f"job {job_id} on ")
    assert (folder / f"slurm-{job_id}.out").exists()
    assert job_field(job_id, "JobState") == "COMPLETED"
    assert job_field(job_id, "ExitCode") == "0:0"


def test_sacct_reports_completed(finished_job):
    job_id, _, record = finished_job
    assert record == ["COMPLETED", "0:0"]
    partition, account = sacct_fields(job_id, "Partition,Account")
    assert partition == "debug"
    assert account  # accounting came through slurmdbd with an association, not just the controller


def test_failing_job_is_reported_failed(tmp_path):
    job_id = submit(tmp_path, "echo about to fail\nexit 1\n")
    assert wait_finished(job_id) == ["FAILED", "1:0"]


def test_two_task_job_runs_two_tasks(tmp_path):
    job_id = submit(tmp_path, 'srun bash -c \'echo "$SLURM_PROCID $SLURM_NTASKS" > "task_$SLURM_PROCID.txt"\'\n',
                    "--ntasks=2", "--cpus-per-task=1")
    assert wait_finished(job_id) == ["COMPLETED", "0:0"]
    lines = sorted(p.read_text().strip() for p in tmp_path.glob("task_*.txt"))
    assert lines == ["0 2", "1 2"]
    step_tasks = _run("sacct", "-j", f"{job_id}.0", "-n", "-P", "-o", "NTasks")
    assert step_tasks.splitlines()[0] == "2"


def test_requeue_runs_the_job_again(tmp_path):
    # First run: record restart count 0 and wait to be requeued; second run: record 1 and finish.
    body = ('echo "${SLURM_RESTART_COUNT:-0}" >> restarts.txt\n'
            'if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then exit 0; fi\n'
            "sleep 300\n")
    job_id = submit(tmp_path, body, "--requeue")
    log = tmp_path / "restarts.txt"
    deadline = time.monotonic() + 30
    while not (log.exists() and log.read_text().strip()):
        assert time.monotonic() < deadline, f"job {job_id} did not start within 30 s"
        time.sleep(0.3)

    started = time.monotonic()
    _run("scontrol", "requeue", job_id)
    assert wait_finished(job_id, timeout=90) == ["COMPLETED", "0:0"]
    print(f"requeue -> completed in {time.monotonic() - started:.1f} s")

    assert log.read_text().split() == ["0", "1"]
    assert job_field(job_id, "Restarts") == "1"
    history = _run("sacct", "-j", job_id, "-X", "-n", "-P", "--duplicates", "-o", "State").split()
    assert history[0] == "REQUEUED" and history[-1] == "COMPLETED"


def test_sbatch_example_sets_ranks_and_requeues_a_preempted_run(tmp_path):
    # The trainer's side of the contract is stood in by a tiny interpreter: it records the rank environment the
    # example gives each task and exits 75 (PREEMPTED_EXIT_CODE, "checkpointed, resume me") on the first run.
    stand_in = tmp_path / "python"
    stand_in.write_text(
        "#!/bin/bash\n"
        'echo "$RANK $LOCAL_RANK $WORLD_SIZE $MASTER_ADDR $MASTER_PORT ${SLURM_RESTART_COUNT:-0} $*" >> calls.txt\n'
        '[ "${SLURM_RESTART_COUNT:-0}" -ge 1 ] && exit 0 || exit 75\n')
    stand_in.chmod(0o755)
    example = Path(__file__).resolve().parents[1] / "slurm" / "sbatch_example.sh"
    env = _slurm_env() | {"PYTHON": str(stand_in)}
    # The cluster has one 2-core node without GPUs: shrink the example's allocation on the command line.
    done = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={tmp_path}", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
         "--cpus-per-task=1", "--mem-per-cpu=200M", "--time=5", str(example), "model=resnet18"],
        env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip().split(";")[0]

    assert wait_finished(job_id, timeout=90) == ["COMPLETED", "0:0"]
    calls = sorted(line.split() for line in (tmp_path / "calls.txt").read_text().splitlines())
    port = str(20000 + int(job_id) % 20000)
    host = _run("scontrol", "show", "hostnames", job_field(job_id, "NodeList"))
    assert [c[:6] for c in calls] == [["0", "0", "2", host, port, "0"], ["0", "0", "2", host, port, "1"],
                                      ["1", "1", "2", host, port, "0"], ["1", "1", "2", host, port, "1"]]
    for call in calls:  # every rank runs the lead's CLI with the example's overrides, then the extra one last
        assert call[6:10] == ["-m", "tltrain.cli", "train", "data=eyepacs"]
        assert f"run_dir=runs/slurm-{job_id}" in call and call[-1] == "model=resnet18"
    assert job_field(job_id, "Restarts") == "1"
