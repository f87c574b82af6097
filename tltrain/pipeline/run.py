"""`tltrain pipeline CONFIG`: submit the stages that are not done yet, each waiting for the stages it needs.

On SLURM every missing task is submitted at once (arrays for arrays) with `afterok` dependencies and
kill_on_invalid_dep, so a failed stage cancels its dependants and the command returns at once (`--wait` follows
it to the end). Without SLURM the same jobs run through submitit's local executor, stage after stage, the grid
`runs_at_once` runs at a time; a failed stage cancels its dependants here too and the others go on.

Run it again and it continues: a task is done when its record says so under the same settings
(tltrain.pipeline.tasks), a task whose SLURM job is still pending or running is waited for, not submitted twice,
and everything else (failed, cancelled, never started) is submitted again; a training run resumes from its
checkpoints. What was submitted is kept in <out>/.pipeline/jobs.json for `tltrain jobs <out>`.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from pathlib import Path

from tltrain import safe_io
from tltrain.errors import ConfigError, TltrainError
from tltrain.launch.jobs import record_job, registry_path, slurm_states
from tltrain.launch.submit import _executor, slurm_available
from tltrain.pipeline.config import PipelineConfig
from tltrain.pipeline.stages import Stage, build_stages
from tltrain.pipeline.state import read_jobs, read_record, record_path, state_dir, write_jobs

LIVE_SLURM_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                     "REQUEUE_HOLD", "REQUEUE_FED")


@contextlib.contextmanager
def _driver_lock(root: Path):
    """One driver per pipeline folder at a time (two would submit the same tasks twice)."""
    state_dir(root).mkdir(parents=True, exist_ok=True)
    path = state_dir(root) / "driver.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{root}: another `tltrain pipeline` is driving this folder now; wait for it or "
                              "follow it with `tltrain jobs`") from None
        yield
    finally:
        os.close(fd)


def done_tasks(root: Path, stage: Stage) -> list[int]:
    """Tasks of the stage whose record says completed under this config. A record of other settings is refused:
    its outputs (a run folder, shards) are not this config's, and re-running into them would mix the two."""
    done = []
    for task, fingerprint in enumerate(stage.fingerprints):
        record = read_record(root, stage.name, task)
        if record is None:
            continue
        if record["fingerprint"] != fingerprint:
            raise ConfigError(f"{record_path(root, stage.name, task)}: stage {stage.name} task {task} was done with "
                              "other settings (this stage's or one before it); use a new out= folder for the new "
                              "settings, or delete that folder to start again")
        done.append(task)
    return done


def _live_jobs(previous: dict) -> dict[int, str]:
    """task -> job id of the stage's jobs from an earlier submission that SLURM still runs or queues."""
    if previous.get("executor") != "slurm":
        return {}
    by_task = {int(t): str(j) for t, j in (previous.get("jobs") or {}).items()}
    states = slurm_states(sorted(set(by_task.values())))
    return {t: j for t, j in by_task.items() if states.get(j, {}).get("state") in LIVE_SLURM_STATES}


def run_pipeline(cfg: PipelineConfig, *, local: bool | None = None, wait: bool = False, dry_run: bool = False) -> int:
    """Submit (SLURM) or run (local) every task that is not done; returns the exit code (1: a stage failed)."""
    root = cfg.root
    stages = build_stages(cfg)
    use_local = local if local is not None else (cfg.launch.local if cfg.launch.local is not None
                                                 else not slurm_available())
    if not use_local and not slurm_available():
        raise ConfigError("the pipeline asks for SLURM (--slurm or launch.local=false) but there is no sbatch here")
    _check_stage_configs(cfg, stages)
    if dry_run:
        for stage in stages:
            print(f"{stage.name:<28} {stage.tasks:>3} task(s)  after {', '.join(stage.after) or '-'}: {stage.what}")
        return 0
    root.mkdir(parents=True, exist_ok=True)
    with _driver_lock(root):
        jobs = read_jobs(root)
        jobs["dag"] = [{"stage": s.name, "what": s.what, "after": list(s.after), "tasks": s.tasks,
                        "fingerprints": s.fingerprints} for s in stages]
        jobs["executor"] = "local" if use_local else "slurm"
        jobs.setdefault("stages", {})
        write_jobs(root, jobs)
        if use_local:
            code = _run_local(cfg, stages, jobs)
        else:
            code = _submit_slurm(cfg, stages, jobs)
    from tltrain.pipeline.dag import print_dag, wait_for

    if not use_local and wait:
        code = wait_for(root)
    else:
        print_dag(root)
    return code


def _check_stage_configs(cfg: PipelineConfig, stages: list[Stage]) -> None:
    """Misspelt keys and unknown options of every stage's command, before anything waits in a queue (the shards
    they name may not exist yet: the full checks run in the jobs)."""
    from tltrain.config import compose, compose_prepare

    for name, source in {**cfg.sources, **({"target": cfg.target} if cfg.target else {})}.items():
        try:
            compose_prepare(list(source.prepare) + [f"out={cfg.shards(name)}"])
        except ConfigError as exc:
            raise ConfigError(f"pipeline {'target' if name == 'target' else 'sources.' + name}.prepare: {exc}") \
                from None
    for stage in stages:  # one run of each training stage: the grid's runs differ only in the swept values
        if stage.specs[0]["kind"] == "train":
            try:
                compose("config", stage.specs[0]["overrides"])
            except ConfigError as exc:
                raise ConfigError(f"pipeline {'train' if stage.name == 'train' else 'grid'}: {exc}") from None


def _submit(cfg: PipelineConfig, stage: Stage, tasks: list[int], local: bool, dependency: list[str]) -> dict[int, str]:
    """Submit the given tasks of a stage (an array when several); returns task -> job, registered for `jobs`."""
    root = cfg.root
    launch = stage.launch
    folder = str(state_dir(root) / "logs" / stage.name.replace(":", "-") / "%j")
    executor = _executor(launch, folder, local, f"tltrain_{cfg.name}_{stage.name}",
                         ":".join(dependency) if dependency else None)
    from submitit.core.utils import FailedJobError

    try:
        if len(tasks) > 1:
            with executor.batch():
                submitted = [executor.submit(stage.job(str(root), task)) for task in tasks]
        else:
            submitted = [executor.submit(stage.job(str(root), tasks[0]))]
    except FailedJobError as exc:  # sbatch refused it: its own words, on one line
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise TltrainError(f"stage {stage.name}: sbatch refused the job: {' / '.join(lines[-3:])}") from None
    registry = registry_path(root)
    for task, job in zip(tasks, submitted):
        spec = stage.specs[task]
        record_job(registry, {
            "job_id": str(job.job_id), "run_dir": spec.get("run_dir") or str(_output_of(cfg, stage, spec)),
            "overrides": [f"pipeline_stage={stage.name}", f"task={task}"] + list(spec.get("overrides", [])),
            "executor": "local" if local else "slurm", "folder": str(job.paths.folder),
            "stderr": str(job.paths.stderr), "dependency": dependency[0] if dependency else None,
            "tasks": launch.nodes * launch.tasks_per_node, "submitted": time.time()})
    return dict(zip(tasks, submitted))


def _output_of(cfg: PipelineConfig, stage: Stage, spec: dict) -> Path:
    args = spec.get("args", {})
    for key in ("out_dir", "grid_dir"):
        if args.get(key):
            return Path(args[key])
    if stage.name.startswith("prepare:"):
        return cfg.shards(stage.name.split(":")[1])
    return cfg.root


def _submit_slurm(cfg: PipelineConfig, stages: list[Stage], jobs: dict) -> int:
    """Every task not done and not queued is submitted now, with afterok on the stages it waits for."""
    root = cfg.root
    waiting_on: dict[str, list[str]] = {}  # stage -> SLURM job ids (arrays by their base id) not finished yet
    for stage in stages:
        done = set(done_tasks(root, stage))
        previous = jobs["stages"].get(stage.name, {})
        live = _live_jobs(previous)
        missing = [t for t in range(stage.tasks) if t not in done and t not in live]
        dependency = sorted({j for name in stage.after for j in waiting_on.get(name, [])})
        ids = {t: j for t, j in live.items() if t not in done}
        if missing:
            submitted = _submit(cfg, stage, missing, local=False, dependency=dependency)
            ids.update({t: str(job.job_id) for t, job in submitted.items()})
            print(f"submitted {stage.name}: {len(missing)} task(s), job {_base(next(iter(ids.values())))}"
                  + (f" after {', '.join(dependency)}" if dependency else ""), file=sys.stderr, flush=True)
            jobs["stages"][stage.name] = {"executor": "slurm", "submitted": time.time(),
                                          "jobs": {str(t): j for t, j in sorted(ids.items())}}
            write_jobs(root, jobs)
        elif ids:
            print(f"{stage.name}: {len(ids)} task(s) still queued or running from before", file=sys.stderr,
                  flush=True)
        if ids:
            waiting_on[stage.name] = sorted({_base(j) for j in ids.values()})
    return 0


def _base(job_id: str) -> str:
    """An array task's job id -> the array's id (afterok on it waits for every task)."""
    return str(job_id).split("_")[0]


def _run_local(cfg: PipelineConfig, stages: list[Stage], jobs: dict) -> int:
    """Stage after stage on this machine; a failed stage's dependants are marked cancelled, the rest go on."""
    root = cfg.root
    failed: dict[str, str] = {}  # stage -> why it did not finish
    for stage in stages:
        blocked = next((name for name in stage.after if name in failed), None)
        if blocked:
            failed[stage.name] = f"cancelled: {blocked} did not finish"
            jobs["stages"][stage.name] = {"executor": "local", "cancelled": failed[stage.name],
                                          "submitted": time.time()}
            write_jobs(root, jobs)
            continue
        done = set(done_tasks(root, stage))
        missing = [t for t in range(stage.tasks) if t not in done]
        if not missing:
            print(f"{stage.name}: done (recorded)", file=sys.stderr, flush=True)
            continue
        print(f"\n=== pipeline stage {stage.name}: {stage.what} ({len(missing)} task(s)) ===", flush=True)
        errors = _run_local_tasks(cfg, stage, missing, jobs)
        if errors:
            failed[stage.name] = errors[0]
    if failed:
        print(f"\npipeline: {len(failed)} stage(s) did not finish; run the same command again to resubmit them",
              file=sys.stderr, flush=True)
    return 1 if failed else 0


def _run_local_tasks(cfg: PipelineConfig, stage: Stage, tasks: list[int], jobs: dict) -> list[str]:
    """Run the tasks `stage.at_once` at a time (all at once when None); returns the errors."""
    root = cfg.root
    at_once = stage.at_once or len(tasks)
    pending, running, errors = list(tasks), {}, []
    entry = {"executor": "local", "submitted": time.time(), "jobs": {}}
    jobs["stages"][stage.name] = entry
    while pending or running:
        while pending and len(running) < at_once:
            task = pending.pop(0)
            job = _submit(cfg, stage, [task], local=True, dependency=[])[task]
            running[task] = job
            entry["jobs"][str(task)] = str(job.job_id)
            write_jobs(root, jobs)
        finished = [t for t, job in running.items() if job.done()]
        if not finished:
            time.sleep(0.5)
            continue
        for task in finished:
            job = running.pop(task)
            error = job.exception()
            if error is not None:
                line = _first_error_line(error)
                errors.append(f"task {task}: {line}")
                print(f"pipeline stage {stage.name} task {task} FAILED: {line}", file=sys.stderr, flush=True)
    return errors


def _first_error_line(error: BaseException) -> str:
    """The last line of a failed job's traceback names the error (submitit wraps it in its own exception)."""
    text = str(error).strip().splitlines()
    lines = [line for line in text if line.strip()]
    return safe_io.printable(lines[-1] if lines else type(error).__name__, 500)
