"""Where a submitit task sits in its job, exported as the torchrun variables the engine and DeepSpeed read.

submitit knows rank, world size and hosts from SLURM (or from its local executor); the engine
(tltrain.engine.distributed.read_env) and DeepSpeed expect RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT. CUDA_VISIBLE_DEVICES is left alone: submitit's default rewrite to one device per task would make
every task see "cuda:0" and break DeepSpeed's choice of device by LOCAL_RANK.
"""
from __future__ import annotations

import os

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def in_submitit_job() -> bool:
    """True inside a task started by submitit (SLURM or local executor)."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def export_distributed_env() -> dict[str, str]:
    """Export the torch.distributed variables of this submitit task; returns them (empty outside submitit).

    Overwrites values inherited from the submitting shell (sbatch copies its environment into the job), so a
    RANK left over from an interactive torchrun session cannot leak into the job.
    """
    if not in_submitit_job():
        return {}
    from submitit.helpers import TorchDistributedEnvironment

    for name in TORCHRUN_VARIABLES:  # inherited from the submitter, not this job's: the port is re-derived
        os.environ.pop(name, None)   # from the job id, the same in every task of the job
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return {name: os.environ[name] for name in TORCHRUN_VARIABLES}
