"""Hydra callback for sweeps run by hydra-submitit-launcher (`tltrain train -m hydra/launcher=slurm ...`).

The plugin maps one sweep batch to one SLURM array and re-runs the same Hydra job after a requeue; what it
lacks is done here, inside each job: the torch.distributed variables, a registry line for `tltrain jobs`,
and the requeue after a run the engine stopped at a step boundary (configs/hydra/launcher/*.yaml enable it).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from tltrain.errors import ConfigError
from tltrain.launch.env import export_distributed_env, in_submitit_job
from tltrain.launch.jobs import record_job, registry_path
from tltrain.launch.submit import requeue_preempted


class SweepJobCallback:
    """registry: the job registry file; None writes <sweep dir>/.tltrain_jobs.jsonl."""

    def __init__(self, registry: str | None = None):
        self.registry = registry

    def on_job_start(self, config, **kwargs) -> None:
        if not in_submitit_job():
            return
        export_distributed_env()
        if os.environ.get("RANK", "0") != "0":
            return
        import submitit

        job = submitit.JobEnvironment()
        path = registry_path(Path(str(config.hydra.sweep.dir)).resolve(), self.registry)
        record_job(path, {
            "job_id": job.job_id, "run_dir": _hydra_run_dir(config), "overrides": list(config.hydra.overrides.task),
            "executor": "local" if job.cluster == "local" else "slurm", "folder": str(job.paths.folder),
            "stderr": str(job.paths.stderr), "dependency": None, "tasks": job.num_tasks, "submitted": time.time()})

    def on_job_end(self, config, job_return, **kwargs) -> None:
        """A preempted run returns normally with status "preempted": requeue it the way `TrainJob` does."""
        from hydra.core.utils import JobStatus

        if job_return.status == JobStatus.COMPLETED and isinstance(job_return.return_value, dict):
            requeue_preempted(job_return.return_value.get("status"), _hydra_run_dir(config))

    def on_multirun_start(self, config, **kwargs) -> None:
        """Without SLURM the plugin would fail deep inside submitit: say what to do instead."""
        if str(config.hydra.launcher.get("_target_", "")).endswith("SlurmLauncher") and not shutil.which("sbatch"):
            raise ConfigError("hydra/launcher=slurm but SLURM is not available here (no sbatch on PATH): use "
                              "hydra/launcher=local to run the sweep on this machine with submitit's local executor")

    # Hydra calls these too; nothing to do for them
    def on_run_start(self, config, **kwargs) -> None: ...
    def on_run_end(self, config, **kwargs) -> None: ...
    def on_multirun_end(self, config, **kwargs) -> None: ...


def _hydra_run_dir(config) -> str:
    return str(Path(config.get("run_dir") or config.hydra.runtime.output_dir).resolve())
