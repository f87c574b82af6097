"""`tltrain submit --prepare --tasks K`: `tltrain prepare` as three SLURM steps.

check (an array of K tasks: task i inspects images i, i+K, ...) -> write (an array of K tasks, afterok check:
each computes the same shard plan and writes shards i, i+K, ...) -> finish (one job, afterok write: manifest and
verify). Shard names and bytes depend only on the source and the options, never on K (see
`tltrain.data.prepare.run_prepare`). With the local executor the steps run one after the other on this machine.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from tltrain.errors import ConfigError
from tltrain.launch.config import LaunchConfig
from tltrain.launch.jobs import record_job, registry_path
from tltrain.launch.submit import _executor, slurm_available

PHASES = ("check", "write", "finish")


class PrepareTask:
    """The callable one SLURM task runs: one phase of a split prepare, for task i of K."""

    def __init__(self, overrides: list[str], phase: str, task: str):
        self.overrides, self.phase, self.task = list(overrides), phase, task

    def __call__(self) -> dict | None:
        from tltrain.config import compose_prepare, to_typed
        from tltrain.data.prepare import PrepareConfig, run_prepare

        overrides = self.overrides + [f"phase={self.phase}", f"task={self.task}", "progress=false"]
        manifest = run_prepare(to_typed(compose_prepare(overrides), PrepareConfig, where="prepare"))
        return None if manifest is None else {"counts": manifest["counts"], "shards": len(manifest["shards"])}

    def __repr__(self) -> str:
        return f"PrepareTask(phase={self.phase}, task={self.task})"


def _out_dir(overrides: list[str]) -> Path:
    from tltrain.config import compose_prepare

    cfg = compose_prepare(overrides)  # a misspelt key fails here, not after waiting in the queue
    return Path(str(cfg.out)).expanduser().resolve()


def submit_prepare(overrides: list[str], *, tasks: int, name: str | None = None, **launch) -> list:
    """Submit check (K tasks), write (K tasks) and finish (1 task); returns the finish job last in the list.

    overrides: those of `tltrain prepare` (out=... is required). launch: `LaunchConfig` fields; nodes and
    tasks_per_node stay 1 (every array task is one process using its cpus_per_task through prepare.workers)."""
    if tasks < 1:
        raise ConfigError(f"--tasks={tasks} must be >= 1")
    cfg = LaunchConfig(**launch)
    cfg.validate()
    out = _out_dir(overrides)
    overrides = [o for o in overrides if not o.startswith(("out=", "phase=", "task="))] + [f"out={out}"]
    use_local = cfg.local if cfg.local is not None else not slurm_available()
    if not use_local and not slurm_available():
        raise ConfigError("launch.local=false but SLURM is not available here (no sbatch on PATH)")
    folder = cfg.folder or str(out.parent / f".{out.name}.submitit" / "%j")
    label = name or f"prepare_{out.name}"
    jobs, dependency = [], None
    for phase in PHASES:
        count = tasks if phase != "finish" else 1
        executor = _executor(cfg, folder, use_local, f"tltrain_{label}_{phase}", dependency)
        with executor.batch():
            batch = [executor.submit(PrepareTask(overrides, phase, f"{i}/{count}")) for i in range(count)]
        dependency = str(batch[0].job_id).split("_")[0]  # the array's id: afterok waits for all its tasks
        for job in batch:
            record_job(registry_path(Path(cfg.root).expanduser().resolve(), cfg.registry), {
                "job_id": str(job.job_id), "run_dir": str(out), "overrides": overrides + [f"phase={phase}"],
                "executor": "local" if use_local else "slurm", "folder": str(job.paths.folder),
                "stderr": str(job.paths.stderr), "dependency": None, "tasks": 1, "submitted": time.time()})
        print(f"submitted prepare {phase}: {'local' if use_local else 'SLURM'} job {dependency} x {count}",
              file=sys.stderr, flush=True)
        jobs += batch
        if use_local:  # no dependencies without SLURM: each step waits for the previous one
            for job in batch:
                job.result()
    return jobs
