"""Seeds, RNG state and torch's determinism switches: what makes a run a function of its config and seed.

Every random stream of a run derives from `seed`: the model's initial weights (seeded before the model is
built), the trainer's global RNGs (seed + rank), the loaders' shuffles and augmentations (numpy Generators keyed
by (seed, epoch, rank, worker); DALI pipelines re-seeded per epoch) and DataLoader worker seeds (a torch.Generator
of their own, so creating an iterator never draws from the global RNG). Resumed runs restore the global RNG state
from the checkpoint. The RNG state is stored as tensors, ints and lists only, so a checkpoint loads with
torch.load(weights_only=True). docs/architecture.md says what stays nondeterministic on a GPU.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

#: cuBLAS needs a fixed workspace to give reproducible results (CUDA >= 10.2); set before its first use.
CUBLAS_WORKSPACE = ":4096:8"


def derive_seed(*parts: int) -> int:
    """A 31-bit seed that is a fixed function of integer parts (seed, epoch, rank, ...), for DALI and workers."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0]) & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Python, numpy and torch (CPU and every GPU) global RNGs from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(enabled: bool) -> None:
    """trainer.deterministic=true: torch's deterministic algorithms, cuDNN without autotuning, fixed cuBLAS workspace.

    Ops that have no deterministic implementation (on CUDA, e.g. adaptive average pooling's backward) warn once,
    naming themselves, instead of stopping the run (warn_only): the run is then deterministic except for them.
    Called with False it switches them back to torch's defaults (an in-process sweep over trainer.deterministic
    would otherwise keep the first deterministic run's switches); CUBLAS_WORKSPACE_CONFIG stays, since cuBLAS reads
    it once.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(enabled, warn_only=enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False


def rng_state() -> dict:
    """This process's global RNG states as plain containers and tensors (weights_only-loadable)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": {"version": int(version), "state": [int(v) for v in internal],
                       "gauss": None if gauss is None else float(gauss)},
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned (also the tuple form older checkpoints stored)."""
    python = state["python"]
    if isinstance(python, dict):
        python = (python["version"], tuple(python["state"]), python["gauss"])
    random.setstate(python)
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        keys = numpy["keys"].numpy() if torch.is_tensor(numpy["keys"]) else np.asarray(numpy["keys"])
        numpy = (numpy["kind"], keys.astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])
    np.random.set_state(numpy)
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
