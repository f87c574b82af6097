"""Resources and retry policy of a submitted run, and the sbatch-style values the CLI accepts for them."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from tltrain.errors import ConfigError

DEFAULT_ROOT = "runs"


@dataclass
class LaunchConfig:
    """What `tltrain submit` asks SLURM for (through submitit), and where runs and the job registry go."""

    nodes: int = 1
    tasks_per_node: int = 1  # one task per GPU; >1 task in all needs trainer.strategy=ddp or deepspeed
    gpus_per_node: int = 0
    cpus_per_task: int | None = None  # None: the partition's default
    partition: str | None = None  # None: the cluster's default partition
    time_min: int = 60  # wall-clock limit; SLURM sends USR2 signal_delay_s before it
    mem_gb: int | None = None  # per node; None: the partition's default
    max_retries: int = 3  # requeues after time limits/preemptions (submitit's max_num_timeout; its default is 0)
    signal_delay_s: int = 120  # how long before the time limit the run is warned (checkpoint + requeue)
    root: str = DEFAULT_ROOT  # fresh run dirs are created here
    registry: str | None = None  # job registry file; None: <root>/.tltrain_jobs.jsonl (e.g. ~/.tltrain/jobs.jsonl)
    folder: str | None = None  # submitit folder (pickles, logs); None: <run_dir>/.submitit/%j
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
        if self.signal_delay_s >= self.time_min * 60:
            raise ConfigError(f"launch.signal_delay_s={self.signal_delay_s} must be shorter than the time limit "
                              f"(launch.time_min={self.time_min} = {self.time_min * 60} s)")


_TIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


def parse_time_min(text: str) -> int:
    """sbatch --time forms -> whole minutes: "90", "1:30:00", "2-00:00:00" (days-hours:minutes:seconds)."""
    match = _TIME.match(text.strip())
    if not match:
        raise ConfigError(f"--time={text!r}: use minutes (90), HH:MM:SS (1:30:00) or D-HH:MM:SS (2-00:00:00)")
    days, a, b, c = (int(match[k]) if match[k] else None for k in ("days", "a", "b", "c"))
    if days is None and b is None:
        minutes = a  # plain minutes
    elif c is None and days is None:
        minutes = a + (b >= 30)  # MM:SS, rounded to minutes
    else:  # HH:MM[:SS], optionally with days
        minutes = (days or 0) * 1440 + a * 60 + (b or 0) + ((c or 0) >= 30)
    return max(1, minutes)


def parse_mem_gb(text: str) -> int:
    """sbatch --mem forms -> whole GB: "16", "16G", "16GB", "512M" (rounded up), "1T"."""
    match = re.match(r"^(\d+)\s*([MGT]?)B?$", text.strip(), re.IGNORECASE)
    if not match:
        raise ConfigError(f"--mem={text!r}: use GB (16), or a number with M, G or T (512M, 16G, 1T)")
    value, unit = int(match[1]), match[2].upper() or "G"
    return {"M": -(-value // 1024), "G": value, "T": value * 1024}[unit]
