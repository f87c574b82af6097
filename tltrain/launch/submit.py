"""Submit training runs to SLURM with submitit: one job per run, chained two-step jobs, requeue on preemption.

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

import json
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tltrain.errors import ConfigError, TltrainError
from tltrain.launch.env import export_distributed_env, in_submitit_job
from tltrain.launch.jobs import DEFAULT_ROOT, record_job

#: Exit code of a task that stops after a preemption without requeueing itself (EX_TEMPFAIL, as the engine).
PREEMPTED_EXIT_CODE = 75


@dataclass
class LaunchConfig:
    """Resources and retry policy of one submitted run (sbatch options through submitit)."""

    nodes: int = 1
    tasks_per_node: int = 1  # one task per GPU; >1 needs trainer.strategy=ddp or deepspeed
    gpus_per_node: int = 0
    cpus_per_task: int | None = None  # None: the partition's default
    partition: str | None = None  # None: the cluster's default partition
    time_min: int = 60  # wall-clock limit; SLURM sends USR2 signal_delay_s before it
    mem_gb: int | None = None  # per node; None: the partition's default
    max_retries: int = 3  # requeues after timeouts/preemptions (submitit's max_num_timeout)
    signal_delay_s: int = 120  # how long before the time limit the run is warned (checkpoint + requeue)
    root: str = DEFAULT_ROOT  # run dirs are created here; the job registry is <root>/.tltrain_jobs.jsonl
    folder: str | None = None  # submitit folder (pickles, logs); default <run_dir>/.submitit/%j
    local: bool | None = None  # None: SLURM if sbatch is on PATH, else submitit's local executor
    setup: list[str] = field(default_factory=list)  # shell lines run in the batch script before srun

    def validate(self) -> None:
        for key in ("nodes", "tasks_per_node", "time_min"):
            if getattr(self, key) < 1:
                raise ConfigError(f"launch.{key}={getattr(self, key)!r} must be >= 1")
        for key in ("gpus_per_node", "max_retries", "signal_delay_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"launch.{key}={getattr(self, key)!r} must be >= 0")
        for key in ("cpus_per_task", "mem_gb"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"launch.{key}={value!r} must be >= 1 (or unset for the partition default)")
        if self.local and self.nodes > 1:
            raise ConfigError(f"launch.nodes={self.nodes} needs SLURM: the local executor runs on this machine only")


class TrainJob:
    """The callable a SLURM task runs: one training run in a fixed run_dir, resumable and requeueable."""

    def __init__(self, overrides: list[str], run_dir: str | Path, attempt: int = 0):
        self.overrides = [o for o in overrides if not o.startswith("run_dir=")]
        self.run_dir = str(run_dir)
        self.attempt = attempt  # how many times this run was started before (requeues)

    def __call__(self) -> dict:
        export_distributed_env()
        from tltrain.train_app import train_from_overrides

        print(f"tltrain: run {self.run_dir} (attempt {self.attempt + 1})", flush=True)
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


def _mark_failed(run_dir: str, exc: BaseException) -> None:
    """status.json says failed with the error, also when the run died before the trainer wrote one (bad config,
    missing shards), so `tltrain jobs` can show why. Rank 0 only; a preemption exit is not a failure."""
    from tltrain.engine.logging import write_status

    if isinstance(exc, SystemExit) or os.environ.get("RANK", "0") != "0":
        return
    status = Path(run_dir) / "status.json"
    try:
        if status.is_file() and json.loads(status.read_text()).get("state") == "failed":
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_status(run_dir, "failed", error=f"{type(exc).__name__}: {exc}")
    except OSError:
        pass  # the original error matters more than the status file


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
    try:
        return json.loads((Path(run_dir) / "status.json").read_text()).get("signal")
    except (OSError, ValueError):
        return None


# -- Hydra sweeps (hydra-submitit-launcher) -------------------------------------------------------------------
class SweepJobCallback:
    """Hydra callback for sweeps run by hydra-submitit-launcher (configs/hydra/launcher/*.yaml enable it).

    In each job: exports the torch.distributed variables, records the job in <sweep dir>/.tltrain_jobs.jsonl
    for `tltrain jobs`, and after a preempted run requeues it through submitit like `TrainJob` does (the
    requeued job re-runs the same Hydra job in the same output folder, which resumes from its checkpoints).
    """

    def on_job_start(self, config, **kwargs) -> None:
        if not in_submitit_job():
            return
        export_distributed_env()
        import submitit

        if os.environ.get("RANK", "0") != "0":
            return
        job = submitit.JobEnvironment()
        overrides = list(config.hydra.overrides.task)
        record_job(Path(str(config.hydra.sweep.dir)).resolve(), {
            "job_id": job.job_id, "run_dir": _hydra_run_dir(config), "overrides": overrides,
            "executor": "local" if job.cluster == "local" else "slurm", "folder": str(job.paths.folder),
            "stderr": str(job.paths.stderr), "dependency": None, "tasks": job.num_tasks, "submitted": time.time()})

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus

        if job_return.status == JobStatus.COMPLETED and isinstance(job_return.return_value, dict):
            requeue_preempted(job_return.return_value.get("status"), _hydra_run_dir(config))

    # Hydra calls these too; nothing to do for them
    def on_run_start(self, config, **kwargs) -> None: ...
    def on_run_end(self, config, **kwargs) -> None: ...
    def on_multirun_start(self, config, **kwargs) -> None: ...
    def on_multirun_end(self, config, **kwargs) -> None: ...


def _hydra_run_dir(config) -> str:
    return str(Path(config.get("run_dir") or config.hydra.runtime.output_dir).resolve())


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


def _check_overrides(overrides: list[str]) -> None:
    """Compose the config here, so a misspelt key fails now rather than after waiting in the queue."""
    from tltrain.config import compose

    compose("config", [o for o in overrides if not o.startswith("run_dir=")])


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
        params["slurm_setup"] = list(cfg.setup)
        params["slurm_signal_delay_s"] = cfg.signal_delay_s
        if cfg.partition:
            params["slurm_partition"] = cfg.partition
        if dependency:
            params["slurm_additional_parameters"] = {"dependency": f"afterok:{dependency}"}
    executor.update_parameters(**params)
    return executor


def submit(overrides: list[str], *, run_dir: str | Path | None = None, name: str | None = None,
           dependency: str | None = None, nodes: int = 1, tasks_per_node: int = 1, gpus_per_node: int = 0,
           cpus_per_task: int | None = None, partition: str | None = None, time_min: int = 60,
           mem_gb: int | None = None, max_retries: int = 3, signal_delay_s: int = 120, root: str = DEFAULT_ROOT,
           folder: str | None = None, local: bool | None = None, setup: list[str] | None = None):
    """Submit one training run without waiting; returns the submitit job (job.job_id, job.result(), ...).

    dependency: a SLURM job id that must end successfully first (afterok). Each submission is recorded in
    <root>/.tltrain_jobs.jsonl for `tltrain jobs`.
    """
    cfg = LaunchConfig(nodes=nodes, tasks_per_node=tasks_per_node, gpus_per_node=gpus_per_node,
                       cpus_per_task=cpus_per_task, partition=partition, time_min=time_min, mem_gb=mem_gb,
                       max_retries=max_retries, signal_delay_s=signal_delay_s, root=str(root), folder=folder,
                       local=local, setup=list(setup or []))
    cfg.validate()
    overrides = list(overrides)
    run_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")), run_dir)
    _check_overrides(overrides)
    use_local = cfg.local if cfg.local is not None else not slurm_available()
    if use_local and cfg.local is None:
        print("SLURM is not available here (no sbatch on PATH): the job runs locally with submitit's "
              "LocalExecutor", file=sys.stderr, flush=True)
    if not use_local and not slurm_available():
        raise ConfigError("launch.local=false but SLURM is not available here (no sbatch on PATH)")
    if use_local and dependency:
        raise ConfigError(f"dependency={dependency!r} needs SLURM; the local executor has no job dependencies")
    root_path = Path(cfg.root).resolve()
    run_path = Path(run_dir).resolve() if run_dir else _new_run_dir(root_path, name or _run_name(overrides))
    run_path.mkdir(parents=True, exist_ok=True)
    submitit_folder = cfg.folder or str(run_path / ".submitit" / "%j")
    executor = _executor(cfg, submitit_folder, use_local, f"tltrain_{run_path.name}", dependency)
    job = executor.submit(TrainJob(overrides, run_path))
    record_job(root_path, {"job_id": str(job.job_id), "run_dir": str(run_path), "overrides": overrides,
                           "executor": "local" if use_local else "slurm", "folder": str(job.paths.folder),
                           "stderr": str(job.paths.stderr), "dependency": dependency,
                           "tasks": cfg.nodes * cfg.tasks_per_node, "submitted": time.time()})
    print(f"submitted {'local' if use_local else 'SLURM'} job {job.job_id}: {run_path}", flush=True)
    return job


def submit_chain(step1_overrides: list[str], step2_overrides: list[str], *, name: str = "chain", **launch):
    """Two-step transfer: step 2 starts after step 1 succeeded (afterok) from step 1's weights.

    Returns (job1, job2). With the local executor (no SLURM) there are no dependencies, so this waits for
    step 1 to finish before submitting step 2.
    """
    job1 = submit(step1_overrides, name=f"{name}_step1", **launch)
    step1_dir = job_run_dir(job1)
    step2 = [o for o in step2_overrides if not o.startswith("model.weights=")] + [f"model.weights={step1_dir}"]
    if type(job1).__name__ == "LocalJob":
        error = job1.exception()  # waits for the job
        if error is not None:
            raise TltrainError(f"step 1 ({step1_dir}) failed, step 2 not submitted: {error}")
        return job1, submit(step2, name=f"{name}_step2", **launch)
    return job1, submit(step2, name=f"{name}_step2", dependency=str(job1.job_id), **launch)


def job_run_dir(job) -> str:
    """The run dir of a job submitted by `submit` (read back from submitit's pickled submission)."""
    return job.submission().function.run_dir


def cli_submit(argv: list[str]) -> int:
    """`tltrain submit [options] OVERRIDE... [--then OVERRIDE...]`: one run, or a two-step chain with --then."""
    import argparse

    parser = argparse.ArgumentParser(prog="tltrain submit", description="Submit a training run to SLURM (or run "
                                     "it locally with submitit when SLURM is not available). Overrides are the "
                                     "same as for `tltrain train`; `--then OVERRIDES` adds a step 2 that starts "
                                     "from step 1's weights after step 1 succeeded.")
    defaults = LaunchConfig()
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the run (key=value, group=option)")
    parser.add_argument("--nodes", type=int, default=defaults.nodes)
    parser.add_argument("--tasks-per-node", type=int, default=defaults.tasks_per_node, help="one per GPU")
    parser.add_argument("--gpus-per-node", type=int, default=defaults.gpus_per_node)
    parser.add_argument("--cpus-per-task", type=int, default=defaults.cpus_per_task)
    parser.add_argument("--partition", default=defaults.partition)
    parser.add_argument("--time-min", type=int, default=defaults.time_min)
    parser.add_argument("--mem-gb", type=int, default=defaults.mem_gb)
    parser.add_argument("--max-retries", type=int, default=defaults.max_retries,
                        help="requeues after time limits/preemptions")
    parser.add_argument("--signal-delay-s", type=int, default=defaults.signal_delay_s)
    parser.add_argument("--root", default=defaults.root, help="where run dirs and the job registry go")
    parser.add_argument("--name", default=None, help="run dir name (default: from the overrides)")
    parser.add_argument("--after", default=None, help="SLURM job id that must succeed first (afterok)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--local", dest="local", action="store_true", default=None, help="force the local executor")
    where.add_argument("--slurm", dest="local", action="store_false", help="require SLURM")
    parser.add_argument("--wait", action="store_true", help="wait for the job(s) and exit with their outcome")
    step1, step2 = (argv[:argv.index("--then")], argv[argv.index("--then") + 1:]) if "--then" in argv else (argv, None)
    args = parser.parse_args(step1)
    launch = dict(nodes=args.nodes, tasks_per_node=args.tasks_per_node, gpus_per_node=args.gpus_per_node,
                  cpus_per_task=args.cpus_per_task, partition=args.partition, time_min=args.time_min,
                  mem_gb=args.mem_gb, max_retries=args.max_retries, signal_delay_s=args.signal_delay_s,
                  root=args.root, local=args.local)
    if step2 is not None:
        jobs = submit_chain(args.overrides, step2, name=args.name or "chain", **launch)
    else:
        jobs = (submit(args.overrides, name=args.name, dependency=args.after, **launch),)
    if not args.wait:
        return 0
    code = 0
    for job in jobs:
        error = job.exception()
        if error is not None:
            print(f"job {job.job_id} failed: {error}", file=sys.stderr)
            code = 1
    return code
