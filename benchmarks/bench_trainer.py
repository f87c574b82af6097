"""Trainer overhead and torch.compile speed-up, on synthetic tensors already on the device (no data cost).

overhead: images/s of the full engine (tltrain.engine.trainer, single strategy) divided by images/s of a bare
    loop (forward, loss, backward, step) in the same process, same model/precision/batch. Goal >= 0.97.
compile:  images/s of the bare loop with torch.compile over the eager one (compile time reported apart).
Prints one JSON object (and writes it with --out).  GPU:  python benchmarks/bench_trainer.py
CPU smoke run:  python benchmarks/bench_trainer.py --small
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

import quiet
from tltrain.engine.config import TrainerConfig
from tltrain.engine.synthetic import Batch
from tltrain.engine.trainer import train
from tltrain.models import create_model


class RepeatLoader:
    """The same device-resident batch `steps` times: measures the engine, not the data path."""

    def __init__(self, batch: Batch, steps: int, num_classes: int):
        self.batch, self.steps, self.num_classes = batch, steps, num_classes
        self.batch_size = len(batch.labels)

    def __len__(self):
        return self.steps

    def __iter__(self):
        return (self.batch for _ in range(self.steps))

    def set_epoch(self, epoch):
        pass


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(model, batch, steps, warmup, precision, device) -> float:
    """The reference: the minimum a training step must do. Returns images/s over `steps` after `warmup`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    loss_fn = torch.nn.CrossEntropyLoss()
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model(batch.images).float(), batch.labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return steps * len(batch.labels) / (time.perf_counter() - start)


def engine_loop(model, batch, steps, warmup, precision, num_classes, channels_last) -> float:
    """The engine on the same batch: epoch 0 warms up, epoch 1 is timed by the engine itself."""
    cfg = TrainerConfig(epochs=2, precision=precision, channels_last=channels_last, lr=1e-4, warmup_epochs=0,
                        lr_schedule="constant", log_every_steps=max(steps // 4, 1), image_grid=0, progress=False,
                        keep_last=1)  # no validation loader: no checkpoint is ever "best"
    loader = RepeatLoader(batch, max(steps, warmup), num_classes)
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(cfg, model, loader, None, run_dir, num_classes=num_classes)
    if result["status"] != "completed":  # e.g. gpu_all's time-out sent SIGTERM: the engine stopped cleanly
        raise SystemExit(f"engine run {result['status']} at step {result['step']}: no timing")
    return result["history"][1]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU-sized run: resnet10t @64, batch 16, few steps")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=quiet.MIN_REPEATS, help="interleaved runs of each loop")
    quiet.add_arguments(parser)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.small:
        args.arch, args.image_size, args.batch_size, args.steps, args.warmup = "resnet10t", 64, 16, 12, 3
        args.precision = "fp32"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    num_classes = 5
    channels_last = device.type == "cuda"
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    batch = Batch(images, torch.randint(0, num_classes, (args.batch_size,), device=device),
                  [f"b{i}" for i in range(args.batch_size)], torch.ones(args.batch_size, dtype=torch.bool))

    def fresh_model():
        torch.manual_seed(0)
        model = create_model(args.arch, num_classes).to(device)
        return model.to(memory_format=torch.channels_last) if channels_last else model

    # bare and engine in turns, args.repeats times each (benchmarks/quiet.py): medians, spreads, the load around
    watch = quiet.Watch().start(args.quiet_wait)
    runs = quiet.interleaved({
        "bare": lambda: bare_loop(fresh_model(), batch, args.steps, args.warmup, args.precision, device),
        "engine": lambda: engine_loop(fresh_model(), batch, args.steps, args.warmup, args.precision, num_classes,
                                      channels_last)}, args.repeats)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size,
              "precision": args.precision, "steps": args.steps, "repeats": len(runs["bare"]["values"]),
              "bare_images_per_s": runs["bare"]["median"], "engine_images_per_s": runs["engine"]["median"],
              "engine_over_bare": runs["engine"]["median"] / runs["bare"]["median"], "goal_engine_over_bare": 0.97,
              "runs": runs}
    if not args.no_compile:
        compiled = torch.compile(fresh_model())
        start = time.perf_counter()
        bare_loop(compiled, batch, 1, 1, args.precision, device)  # triggers compilation
        report["compile_seconds"] = time.perf_counter() - start
        report["compiled_images_per_s"] = bare_loop(compiled, batch, args.steps, args.warmup, args.precision, device)
        report["compile_speedup"] = report["compiled_images_per_s"] / report["bare_images_per_s"]
    report.update(watch.verdict())
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    if not report["recorded"] and not args.smoke:
        raise SystemExit(quiet.REFUSED_EXIT)


if __name__ == "__main__":
    main()
