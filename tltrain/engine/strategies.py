"""One small interface over single-device, DDP and DeepSpeed training, so one loop drives all three.

Per micro-batch the loop does:  with strategy.micro_batch(boundary): out = strategy.forward(x); strategy.backward(loss)
then strategy.step(boundary). `boundary` is True on the last micro-batch of an optimizer step (gradient
accumulation); DDP skips its gradient all-reduce on the others (no_sync), DeepSpeed counts micro-steps itself.
Checkpoint I/O lives in checkpoint.py; strategies only say what to save and how to restore it.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from tltrain.engine.config import TrainerConfig
from tltrain.engine.distributed import DistEnv, is_distributed
from tltrain.engine.optim import build_optimizer, carry_optimizer_state

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Strategy:
    """Single device: autocast, GradScaler for fp16, clipping, gradient accumulation."""

    name = "single"
    saves_with_engine = False  # True: checkpoints go through the engine's own API (DeepSpeed)
    #: Whether the best checkpoint's consolidated weights can be loaded back into the model for the test split.
    reloads_weights = True

    def __init__(self, cfg: TrainerConfig, env: DistEnv, device: torch.device):
        self.cfg, self.env, self.device = cfg, env, device
        self.raw_model: nn.Module | None = None  # the unwrapped nn.Module (state dicts, EMA, export)
        self.model: nn.Module | None = None  # what forward() calls (compiled / DDP / engine)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    # -- set-up ---------------------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move to device and memory format once; returns the raw module (unwrapped)."""
        model = model.to(self.device)
        if self.cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.raw_model = model
        return model

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, micro_batch_size: int) -> None:
        """Called at the start of every schedule phase with the phase's optimizer."""
        self.optimizer = optimizer
        if self.model is None:
            self.model = torch.compile(model) if self.cfg.compile else model

    def enter_phase(self, groups: list[dict], micro_batch_size: int) -> None:
        """A schedule phase starts: a new optimizer over the phase's parameter groups, keeping the per-parameter
        state (Adam moments, momentum) of parameters trainable before and after, then (re)wrap the model."""
        optimizer = build_optimizer(groups, self.cfg)
        carry_optimizer_state(self.carried_optimizer(), optimizer)
        self.wrap(self.unwrap(), optimizer, micro_batch_size)

    def carried_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer whose per-parameter state the next phase's optimizer starts from."""
        return self.optimizer

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    # -- one micro-batch ------------------------------------------------------------------------------------
    def autocast(self):
        dtype = AUTOCAST_DTYPES.get(self.cfg.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def micro_batch(self, boundary: bool):
        return contextlib.nullcontext()

    def prepare_inputs(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.cfg.precision not in AUTOCAST_DTYPES and images.is_floating_point() and images.dtype != torch.float32:
            images = images.float()  # bf16/fp16 batches (loader.dtype) into an fp32 model: no autocast casts them
        if self.cfg.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model(images)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.cfg.grad_accum).backward()

    def step(self, boundary: bool) -> torch.Tensor | None:
        """Optimizer update on the boundary micro-batch; returns the gradient norm when clipping (a device tensor:
        reading it would make the host wait for the device, so nothing here does)."""
        if not boundary:
            return None
        norm = None
        if self.cfg.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def train(self, mode: bool = True) -> None:
        self.raw_model.train(mode)

    # -- state ----------------------------------------------------------------------------------------------
    def unwrap(self) -> nn.Module:
        return self.raw_model

    def state_dict(self) -> dict:
        return {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def restore(self, checkpoints, entry: dict, content: dict) -> None:
        """Resume from a checkpoint: `content` is what checkpoints.read(entry) returned."""
        self.load_state_dict(content)

    def load_state_dict(self, state: dict, load_optimizer: bool = True) -> None:
        self.raw_model.load_state_dict(state["model"])
        if load_optimizer and state.get("optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def close(self) -> None:
        """Release what the strategy holds on to beyond the model (a no-op except for DeepSpeed)."""


class DDPStrategy(Strategy):
    """DistributedDataParallel over the process group (nccl on GPU, gloo on CPU)."""

    name = "ddp"

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, micro_batch_size: int) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.optimizer = optimizer
        inner = torch.compile(model) if self.cfg.compile else model
        if not is_distributed():
            self.model = inner
            return
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Re-wrapped at each phase: DDP registers its gradient hooks on the params trainable at wrap time.
        self.model = DistributedDataParallel(inner, device_ids=device_ids)

    def micro_batch(self, boundary: bool):
        if boundary or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO 1/2/3 with bf16/fp16, without the deepspeed launcher (env from torchrun/SLURM)."""

    name = "deepspeed"
    saves_with_engine = True
    reloads_weights = False  # ZeRO partitions are not reloaded mid-run: the test split sees the final weights

    def __init__(self, cfg: TrainerConfig, env: DistEnv, device: torch.device):
        super().__init__(cfg, env, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=False)  # DeepSpeed scales fp16 losses itself

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Parameters stay in the default layout even with channels_last: DeepSpeed's initial broadcast views
        each bf16/fp16 parameter as bytes (needs stride(-1) == 1), and ZeRO 1/2 re-create the parameters as
        views of flat, default-strided buffers anyway. The inputs are still channels_last (prepare_inputs),
        which is what selects the NHWC convolution kernels."""
        self.raw_model = model.to(self.device)
        return self.raw_model

    def ds_config(self, micro_batch_size: int) -> dict:
        ds = self.cfg.deepspeed
        zero = {"stage": ds.zero_stage, "overlap_comm": ds.overlap_comm,
                "contiguous_gradients": ds.contiguous_gradients, "reduce_bucket_size": ds.reduce_bucket_size,
                "allgather_bucket_size": ds.allgather_bucket_size}
        if ds.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        return {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": self.cfg.grad_accum,
            "gradient_clipping": self.cfg.clip_grad_norm,
            "bf16": {"enabled": self.cfg.precision == "bf16"},
            "fp16": {"enabled": self.cfg.precision == "fp16", "initial_scale_power": 16},
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,  # torch AdamW/SGD are fine; DeepSpeed only warns about them
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, micro_batch_size: int) -> None:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        self.close()  # a new phase: the previous engine's ZeRO gradient hooks must not stay on the parameters
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config(micro_batch_size))
        dtype = AUTOCAST_DTYPES.get(self.cfg.precision)
        if dtype is not None:  # DeepSpeed casts parameters, not buffers: BatchNorm statistics must follow
            for buffer in self.model.module.buffers():
                if buffer.is_floating_point():
                    buffer.data = buffer.data.to(dtype)

    def close(self) -> None:
        """Destroy the engine: removes its ZeRO hooks and drops its buffers (and their pending communication
        handles) now, while the interpreter and the process group are alive, not in finalization at exit."""
        engine = getattr(self, "model", None)
        if engine is not None and hasattr(engine, "destroy"):
            engine.destroy()
        self.model = self.optimizer = None

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def autocast(self):
        return contextlib.nullcontext()  # the engine already holds bf16/fp16 weights

    def prepare_inputs(self, images: torch.Tensor) -> torch.Tensor:
        images = super().prepare_inputs(images)
        dtype = AUTOCAST_DTYPES.get(self.cfg.precision)
        return images.to(dtype) if dtype is not None else images

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)  # divides by gradient_accumulation_steps itself

    def step(self, boundary: bool) -> float | None:
        # Updates only at DeepSpeed's own accumulation boundary; its micro-step counter and ours agree because
        # the trainer skips an epoch's remainder micro-batches.
        self.model.step()
        norm = self.model.get_global_grad_norm() if boundary else None
        return float(norm) if norm is not None else None

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def carried_optimizer(self) -> None:
        return None  # ZeRO's partitioned state is the engine's own: the next phase's engine starts afresh

    def unwrap(self) -> nn.Module:
        return self.model.module if self.model is not None else self.raw_model

    def restore(self, checkpoints, entry: dict, content: dict) -> None:
        self.load(checkpoints.dir, entry["name"])  # every rank reads its own ZeRO partition

    def save(self, directory: Path, tag: str, client_state: dict) -> None:
        """Every rank must call this: each writes its own ZeRO partition."""
        self.model.save_checkpoint(str(directory), tag=tag, client_state=client_state)

    def load(self, directory: Path, tag: str, load_optimizer: bool = True) -> dict:
        from tltrain.safe_load import deepspeed_weights_only  # DeepSpeed's own torch.load calls: weights-only

        with deepspeed_weights_only(Path(directory) / tag, Path(directory).parent):
            _, client_state = self.model.load_checkpoint(str(directory), tag=tag, load_optimizer_states=load_optimizer,
                                                         load_lr_scheduler_states=False)
        return client_state or {}


STRATEGY_CLASSES = {"single": Strategy, "ddp": DDPStrategy, "deepspeed": DeepSpeedStrategy}


def build_strategy(cfg: TrainerConfig, env: DistEnv, device: torch.device) -> Strategy:
    return STRATEGY_CLASSES[cfg.strategy](cfg, env, device)
