"""An in-memory loader with the real loader contract, and a runnable synthetic training job.

Used by the engine tests, the trainer benchmark and as a smoke test of a cluster set-up:
    torchrun --nproc_per_node 2 -m tltrain.engine.synthetic --strategy ddp --run-dir /tmp/run
The task is learnable in a few steps (the grade shifts image brightness, under noise), so a run that does not
learn it points at the engine, not the data. Sharding follows the loader contract: rank r takes every
world_size-th sample of the epoch's permutation and the last batch is padded (valid=False) so all ranks run
the same number of batches.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from tltrain.contracts import Batch


def make_dataset(count: int, num_classes: int = 5, size: int = 32, seed: int = 0, noise: float = 1.0,
                 signal: float = 0.6) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images whose brightness rises with the grade (plus Gaussian noise); labels are balanced."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % num_classes
    labels = labels[torch.randperm(count, generator=gen)]
    images = noise * torch.randn(count, 3, size, size, generator=gen)
    images += (signal * (labels.float() - (num_classes - 1) / 2)).view(-1, 1, 1, 1)
    keys = [f"synth_{seed}_{i:06d}" for i in range(count)]
    return images, labels, keys


class InMemoryLoader:
    """Batches of a tensor dataset following the tltrain loader contract (see docs/architecture.md)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, keys: list[str], batch_size: int, *,
                 num_classes: int, train: bool, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device: str | torch.device = "cpu", nonfinite_at: int | None = None):
        self.images, self.labels, self.keys = images, labels, keys
        self.batch_size, self.num_classes, self.train = batch_size, num_classes, train
        self.rank, self.world_size, self.seed, self.device = rank, world_size, seed, torch.device(device)
        self.class_counts = torch.bincount(labels, minlength=num_classes).tolist()
        self.epoch = 0
        self.nonfinite_at = nonfinite_at  # test hook: this global sample index gets NaN pixels
        per_rank = math.ceil(len(labels) / world_size)
        self._batches = math.ceil(per_rank / batch_size)

    def __len__(self) -> int:
        return self._batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def stats(self) -> dict:
        return {"images_per_s": float("nan"), "wait_fraction": 0.0}

    def _order(self) -> torch.Tensor:
        if not self.train:
            return torch.arange(len(self.labels))
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self.labels), generator=gen)

    def __iter__(self):
        mine = self._order()[self.rank::self.world_size]
        total = self._batches * self.batch_size
        valid = torch.arange(total) < len(mine)
        padded = mine[torch.arange(total) % len(mine)]  # padding repeats this rank's first samples
        positions = padded.tolist()  # once per epoch: the batches' keys need no read-back of their own
        for b in range(self._batches):
            index = padded[b * self.batch_size:(b + 1) * self.batch_size]
            images = self.images[index].clone()
            if self.nonfinite_at is not None and (index == self.nonfinite_at).any():
                images[index == self.nonfinite_at] = float("nan")
            yield Batch(images.to(self.device), self.labels[index].to(self.device),
                        [self.keys[i] for i in positions[b * self.batch_size:(b + 1) * self.batch_size]],
                        valid[b * self.batch_size:(b + 1) * self.batch_size])


class TinyConvNet(torch.nn.Module):
    """A BatchNorm-free CNN: DDP with N ranks and one process then compute the same gradients exactly."""

    def __init__(self, num_classes: int, width: int = 8):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.fc = torch.nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def main(argv: list[str] | None = None) -> int:
    from tltrain.engine.config import DeepSpeedConfig, TrainerConfig
    from tltrain.engine.distributed import leave_process_group, read_env
    from tltrain.engine.losses import model_outputs
    from tltrain.engine.trainer import NonFiniteLoss, train
    from tltrain.models import create_model

    parser = argparse.ArgumentParser(description="train on a synthetic in-memory task (engine smoke test)")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--strategy", default="single")
    parser.add_argument("--arch", default="tiny", help="'tiny' (BatchNorm-free) or a timm model name")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=320)
    parser.add_argument("--val-size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--loss", default="cross_entropy")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--nan-at", type=int, default=None, help="sample index given NaN pixels")
    parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds per batch (signal tests)")
    parser.add_argument("--val-sleep", type=float, default=0.0,
                        help="seconds per validation batch; <run-dir>/validating marks the first one (signal tests)")
    parser.add_argument("--stall", default=None, metavar="EPOCH:BATCH:SECONDS[:RANK]",
                        help="the train loader waits SECONDS before that batch (on RANK only, default every rank); "
                             "<run-dir>/stalled marks the wait (signal tests: a slow file system)")
    parser.add_argument("--check-every", type=int, default=10, help="trainer.check_every_steps")
    parser.add_argument("--log-every", type=int, default=2, help="trainer.log_every_steps")
    parser.add_argument("--stop-check-at-checks-only", action="store_true",
                        help="trainer.stop_check_every_step=false")
    parser.add_argument("--ema", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result", default=None, help="write the result dict here as JSON (rank 0)")
    args = parser.parse_args(argv)

    env = read_env()
    cfg = TrainerConfig(epochs=args.epochs, strategy=args.strategy, precision=args.precision, channels_last=False,
                        optimizer=args.optimizer, lr=args.lr, weight_decay=0.0, warmup_epochs=0.5,
                        loss=args.loss, grad_accum=args.grad_accum, checkpoint_every_steps=args.checkpoint_every,
                        ema_decay=args.ema, log_every_steps=args.log_every, image_grid=8, progress=False,
                        seed=args.seed, check_every_steps=args.check_every,
                        stop_check_every_step=not args.stop_check_at_checks_only,
                        deepspeed=DeepSpeedConfig(zero_stage=args.zero_stage))
    num_classes = 5
    torch.manual_seed(args.seed)  # identical initial weights on every rank and in every run
    outputs = model_outputs(cfg, num_classes)
    model = TinyConvNet(outputs) if args.arch == "tiny" else create_model(args.arch, outputs)
    images, labels, keys = make_dataset(args.train_size + args.val_size, num_classes, args.image_size, seed=1)
    n = args.train_size
    train_loader = InMemoryLoader(images[:n], labels[:n], keys[:n], args.batch_size, num_classes=num_classes,
                                  train=True, rank=env.rank, world_size=env.world_size, seed=args.seed,
                                  nonfinite_at=args.nan_at)
    val_loader = InMemoryLoader(images[n:], labels[n:], keys[n:], args.batch_size, num_classes=num_classes,
                                train=False, rank=env.rank, world_size=env.world_size)
    if args.step_sleep:
        train_loader = _Slow(train_loader, args.step_sleep)
    if args.stall:
        epoch, batch, seconds, *rank = args.stall.split(":")
        if not rank or int(rank[0]) == env.rank:
            train_loader = _Stall(train_loader, int(epoch), int(batch), float(seconds), Path(args.run_dir) / "stalled")
    if args.val_sleep:
        val_loader = _Slow(val_loader, args.val_sleep, marker=Path(args.run_dir) / "validating")
    try:
        result = train(cfg, model, train_loader, val_loader, args.run_dir, num_classes=num_classes,
                       config_to_save=cfg)
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    leave_process_group()
    if env.rank == 0 and args.result:
        from tltrain.safe_io import atomic_write_text

        atomic_write_text(args.result, json.dumps({k: v for k, v in result.items() if k != "history"}, default=str))
    return result["exit_code"]


class _LoaderWrapper:
    """Base of the test wrappers below: everything but iteration goes to the wrapped loader."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)


class _Slow(_LoaderWrapper):
    """Wraps a loader to sleep per batch, so a test can signal a run mid-epoch."""

    def __init__(self, loader, seconds: float, marker: Path | None = None):
        super().__init__(loader)
        self.seconds, self.marker = seconds, marker

    def __iter__(self):
        import time

        for batch in self.loader:
            if self.marker is not None:
                self.marker.touch()
            time.sleep(self.seconds)
            yield batch


class _Stall(_LoaderWrapper):
    """Wraps the train loader to wait once, before one batch of one epoch (a data wait a test can signal into)."""

    def __init__(self, loader, epoch: int, batch: int, seconds: float, marker: Path):
        super().__init__(loader)
        self.at, self.seconds, self.marker = (epoch, batch), seconds, marker
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.loader.set_epoch(epoch)

    def __iter__(self):
        import time

        for index, batch in enumerate(self.loader):
            if (self.epoch, index) == self.at:
                self.marker.touch()
                time.sleep(self.seconds)
            yield batch


if __name__ == "__main__":
    sys.exit(main())
