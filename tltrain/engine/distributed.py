"""Where this process sits in the job: rank, world size, master address, from torchrun or SLURM/submitit.

torchrun and submitit's TorchDistributedEnvironment export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT;
a plain `srun` only gives SLURM_* variables, so those are the fallback (master = first host of the node list).
"""
from __future__ import annotations

import gc
import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tltrain.errors import ConfigError

DEFAULT_PORT = 29500
_control_group = None  # any_rank_on_cpu's gloo group beside an NCCL default group (made on first use)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_env(environ: dict | None = None) -> DistEnv:
    """The distributed environment from torchrun-style variables, else SLURM's, else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                       local_rank=int(env.get("LOCAL_RANK", 0)), master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        return DistEnv(rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_NTASKS"]),
                       local_rank=int(env.get("SLURM_LOCALID", 0)),
                       master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
                       # a port derived from the job id lets two jobs share a node without colliding
                       master_port=int(env.get("MASTER_PORT", 20000 + job_id % 20000)))
    return DistEnv()


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[03-05,07],cpu1' -> 'gpu03'; 'node1,node2' -> 'node1'."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r} cannot be parsed")
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def export_env(env: DistEnv) -> None:
    """Write the torchrun variables so torch.distributed and DeepSpeed (no launcher, no MPI discovery) find them."""
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))


def device_for(env: DistEnv, requested: str = "auto") -> torch.device:
    """cuda:<local_rank> when CUDA is present (or asked for), else cpu."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device={requested!r} asked for CUDA but no GPU is visible")
    return torch.device("cuda", env.local_rank % torch.cuda.device_count())


def init_process_group(env: DistEnv, device: torch.device, timeout_s: int = 1800) -> bool:
    """Join the process group (nccl on GPU, gloo on CPU) if world_size > 1 and not joined yet; True if joined here."""
    if env.world_size <= 1 or dist.is_initialized():
        return False
    export_env(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=timeout_s))
    return True


def leave_process_group() -> None:
    """Destroy the process group at the end of a successful run. Without it NCCL warns at exit that the group was
    not destroyed (pending work may be lost), and an in-process sweep's next run would reuse a stale group. No
    barrier first: a rank whose peer failed after the last collective must not wait for it."""
    global _control_group
    if dist.is_available() and dist.is_initialized():
        # Objects in reference cycles (an engine, its optimizer, pending gloo work holding tensors) would otherwise
        # be freed during interpreter finalization, where a gloo worker thread touching them aborts the process
        # ("terminate called without an active exception", exit -6 after a completed run). Free them now.
        gc.collect()
        dist.destroy_process_group()  # every group, the control group too
    _control_group = None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Logical OR of each flag across ranks: every rank takes the same stop decision."""
    if not is_distributed():
        return list(flags)
    tensor = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def any_rank_on_cpu(flags: list[bool]) -> list[bool]:
    """any_rank over a gloo group on the CPU: no GPU synchronisation, so it can run before each step's forward
    pass without stalling the device queue (one small message per step; NCCL runs get their own gloo group)."""
    global _control_group
    if not is_distributed():
        return list(flags)
    cpu_capable = "gloo" in str(dist.get_backend())  # "gloo", or "cpu:gloo,cuda:nccl"
    if not cpu_capable and _control_group is None:
        _control_group = dist.new_group(backend="gloo")  # collective: every rank reaches this first call together
    tensor = torch.tensor([float(f) for f in flags])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=None if cpu_capable else _control_group)
    return [bool(v) for v in tensor.tolist()]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank src's object on every rank (e.g. a run-dir decision)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
