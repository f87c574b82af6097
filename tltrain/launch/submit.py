"""Submit training runs to SLURM with submitit: one job per run, requeued after time limits and preemption.

A job runs `TrainJob`, which exports the torch.distributed variables from SLURM and calls
`train_from_overrides` with a fixed run_dir. The run resumes by itself from that run_dir's checkpoints, so a
requeue only has to start the same callable again.

Preemption and time limits: while training, the engine owns SIGUSR2/SIGTERM (checkpoint at the next step,
return status "preempted"); outside training, submitit's own USR2 handler is installed. After a preempted
run, `requeue_preempted` hands over to submitit's handler, so both paths requeue the same way (rank 0 calls
`checkpoint()` and `scontrol requeue`, counting retries in submitit's max_num_timeout). A run stopped by
SIGTERM is not requeued by us: SLURM sends SIGTERM when it ends the job itself (scancel, or a requeue it
performs), and a second requeue would fight it.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

from tltrain.errors import PREEMPTED_EXIT_CODE, ConfigError, TltrainError
from tltrain.launch.config import LaunchConfig
from tltrain.launch.env import export_distributed_env, in_submitit_job
from tltrain.launch.jobs import record_job, registry_path
from tltrain.run_folder import RunFolder

#: Batch-script lines (before submitit's srun): USR2 sent to the batch shell (`scancel --signal=USR2 --batch`, or
#: --full) must reach the tasks instead of killing the shell, and with it the job. bash runs a trap only after
#: the foreground command ends, so srun runs in the background under a `wait` loop, and the trap passes the
#: signal to srun, which forwards it to every task (they checkpoint, and rank 0 requeues the job).
BATCH_SHELL_USR2 = [
    'srun() { command srun "$@" & _tltrain_srun=$!; local rc; while :; do wait "$_tltrain_srun"; rc=$?; '
    'kill -0 "$_tltrain_srun" 2>/dev/null || return "$rc"; done; }',
    "trap 'echo \"tltrain: USR2 reached the batch shell; passing it to the tasks\" >&2; "
    "kill -USR2 \"$_tltrain_srun\" 2>/dev/null' USR2",
]


class TrainJob:
    """The callable a SLURM task runs: one training run in a fixed run_dir, resumable and requeueable."""

    def __init__(self, overrides: list[str], run_dir: str | Path, attempt: int = 0):
        self.overrides = [o for o in overrides if not o.startswith("run_dir=")]
        self.run_dir = str(run_dir)
        self.attempt = attempt  # how many times this run was started before (requeues)

    def __call__(self) -> dict:
        export_distributed_env()
        from tltrain.train_app import train_from_overrides

        print(f"tltrain: run {self.run_dir} (attempt {current_attempt(self.attempt)})", flush=True)
        try:
            result = train_from_overrides(self.overrides + [f"run_dir={self.run_dir}"])
        except BaseException as exc:
            _mark_failed(self.run_dir, exc)
            raise
        requeue_preempted(result.get("status"), self.run_dir)
        return {k: result.get(k) for k in ("status", "exit_code", "step", "epoch", "run_dir", "final", "test")}

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on rank 0 before a requeue: the same run again (it resumes from run_dir)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(TrainJob(self.overrides, self.run_dir, self.attempt + 1))

    def __repr__(self) -> str:
        return f"TrainJob(run_dir={self.run_dir!r}, attempt={self.attempt})"


def current_attempt(requeues_known: int = 0) -> int:
    """1 for the first start. A requeue by submitit (our checkpoint()) counts in requeues_known; one that SLURM
    starts by itself (`scontrol requeue`, preemption, node failure) re-runs the original pickle, so SLURM's own
    SLURM_RESTART_COUNT is the count that is always right."""
    try:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        restarts = 0
    return max(requeues_known, restarts) + 1


def _mark_failed(run_dir: str, exc: BaseException) -> None:
    """status.json says failed with the error, also when the run died before the trainer wrote one (bad config,
    missing shards), so `tltrain jobs` can show why; the trainer's own record of a failure is kept. Rank 0 only;
    a preemption exit is not a failure."""
    if isinstance(exc, SystemExit) or os.environ.get("RANK", "0") != "0":
        return
    RunFolder(run_dir).mark_failed(f"{type(exc).__name__}: {exc}", keep_first=True)


def requeue_preempted(state: str | None, run_dir: str | Path) -> None:
    """After a run returned "preempted" inside a submitit job: requeue it (USR2: time limit or preemption
    notice) or exit without a result (SIGTERM: SLURM is ending or requeueing the job itself).

    Returns normally when there is nothing to do (completed run, not under submitit, or a rank other than 0
    after submitit's handler declined: those ranks simply end, rank 0 requeues the whole job).
    """
    if state != "preempted" or not in_submitit_job():
        return
    stop_signal = _stop_signal(run_dir)
    if stop_signal == signal.SIGTERM:
        print("tltrain: stopped by SIGTERM after checkpointing; SLURM decides about the requeue", flush=True)
        raise SystemExit(PREEMPTED_EXIT_CODE)
    handler = signal.getsignal(signal.SIGUSR2)
    if not callable(handler):  # submitit's handler is not installed (should not happen in a submitit task)
        raise SystemExit(PREEMPTED_EXIT_CODE)
    print("tltrain: preempted after checkpointing; handing over to submitit to requeue", flush=True)
    handler(signal.SIGUSR2, None)  # rank 0: checkpoint() + requeue + exit, or UncompletedJobError (no retries)


def _stop_signal(run_dir: str | Path) -> int | None:
    """The signal that stopped the run, as its status.json records it (bounded read; None if absent or odd)."""
    value = RunFolder(run_dir).read_status().get("signal")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# -- submitting ----------------------------------------------------------------------------------------------
def slurm_available() -> bool:
    return shutil.which("sbatch") is not None


def _run_name(overrides: list[str]) -> str:
    """A readable run-dir name from the overrides that usually tell runs apart."""
    keys = ("experiment", "schedule", "model", "model.arch", "data", "data.fraction", "seed")
    values = dict(o.split("=", 1) for o in overrides if "=" in o)
    parts = [values[k] for k in keys if k in values]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts))[:80] or "run"


def _new_run_dir(root: Path, name: str) -> Path:
    """Create (and so reserve) a fresh run dir: two submissions in the same second never share one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for index in range(1000):
        candidate = root / (f"{stamp}_{name}" + (f"-{index}" if index else ""))
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
    raise TltrainError(f"{root}: could not create a fresh run dir named {stamp}_{name}")


def check_run(overrides: list[str], launch: LaunchConfig) -> None:
    """The whole run checked here, before anything waits in the queue: the composed config (misspelt keys, bad
    values), its paths (data.shards, model.weights) and the strategy against the number of tasks. Torch and timm
    are not imported (the config side is torch-free), so this takes well under a second."""
    from tltrain.config import compose, load_run_config

    run = load_run_config(compose("config", [o for o in overrides if not o.startswith("run_dir=")]))
    tasks = launch.nodes * launch.tasks_per_node
    if tasks > 1 and run.trainer.strategy == "single":
        raise ConfigError(f"trainer.strategy=single runs one process, but --nodes {launch.nodes} x --tasks-per-node "
                          f"{launch.tasks_per_node} starts {tasks}: use trainer=ddp or trainer=deepspeed")


def _executor(cfg: LaunchConfig, folder: str, local: bool, job_name: str, dependency: str | None):
    import submitit

    cluster = "local" if local else "slurm"
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, **{f"{cluster}_max_num_timeout": cfg.max_retries})
    params = {"name": job_name, "timeout_min": cfg.time_min, "nodes": cfg.nodes, "tasks_per_node": cfg.tasks_per_node}
    for key in ("cpus_per_task", "mem_gb"):
        if getattr(cfg, key) is not None:
            params[key] = getattr(cfg, key)
    if cfg.gpus_per_node:
        params["gpus_per_node"] = cfg.gpus_per_node
    if local:
        params["local_setup"] = list(cfg.setup)
    else:
        params["slurm_setup"] = BATCH_SHELL_USR2 + list(cfg.setup)
        params["slurm_signal_delay_s"] = cfg.signal_delay_s
        if cfg.partition:
            params["slurm_partition"] = cfg.partition
        if dependency:  # if the job it waits for fails, SLURM cancels this one instead of leaving it PENDING
            params["slurm_additional_parameters"] = {"dependency": f"afterok:{dependency}",
                                                     "kill_on_invalid_dep": "yes"}
    executor.update_parameters(**params)
    return executor


def submit(overrides: list[str], *, run_dir: str | Path | None = None, name: str | None = None,
           dependency: str | None = None, **launch):
    """Submit one training run without waiting; returns the submitit job (job.job_id, job.result(), ...).

    launch: `LaunchConfig` fields (nodes, tasks_per_node, time_min, max_retries, root, registry, local, ...).
    run_dir: where the run writes (default: a fresh folder under root). dependency: a SLURM job id that must end
    successfully first (afterok). Each submission is appended to the job registry for `tltrain jobs`.
    """
    cfg = LaunchConfig(**launch)
    cfg.validate()
    overrides = list(overrides)
    run_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")), run_dir)
    check_run(overrides, cfg)
    use_local = cfg.local if cfg.local is not None else not slurm_available()
    if use_local and cfg.local is None:
        print("SLURM is not available here (no sbatch on PATH): the job runs on this machine with submitit's "
              "LocalExecutor", file=sys.stderr, flush=True)
    if not use_local and not slurm_available():
        raise ConfigError("launch.local=false but SLURM is not available here (no sbatch on PATH)")
    if use_local and dependency:
        raise ConfigError(f"dependency={dependency!r} needs SLURM; the local executor has no job dependencies")
    root_path = Path(cfg.root).expanduser().resolve()
    run_path = Path(run_dir).resolve() if run_dir else _new_run_dir(root_path, name or _run_name(overrides))
    run_path.mkdir(parents=True, exist_ok=True)
    submitit_folder = cfg.folder or str(run_path / ".submitit" / "%j")
    executor = _executor(cfg, submitit_folder, use_local, f"tltrain_{run_path.name}", dependency)
    job = executor.submit(TrainJob(overrides, run_path))
    job.tltrain_run_dir = str(run_path)  # job_run_dir reads it here instead of unpickling the submission file
    record_job(registry_path(root_path, cfg.registry), {
        "job_id": str(job.job_id), "run_dir": str(run_path), "overrides": overrides,
        "executor": "local" if use_local else "slurm", "folder": str(job.paths.folder),
        "stderr": str(job.paths.stderr), "dependency": dependency, "tasks": cfg.nodes * cfg.tasks_per_node,
        "submitted": time.time()})
    print(f"submitted {'local' if use_local else 'SLURM'} job {job.job_id}: {run_path}", flush=True)
    return job


def job_run_dir(job) -> str:
    """The run dir of a job submitted by `submit` (as submit recorded it on the job; for a job object made
    elsewhere, read back from submitit's pickled submission, which this process wrote)."""
    run_dir = getattr(job, "tltrain_run_dir", None)
    return run_dir if run_dir is not None else job.submission().function.run_dir
