"""Part d of gpu_all.sh: input-pipeline efficiency = training images/s fed by the real loader over images/s on
synthetic tensors already on the device, same model, batch, precision (bf16 autocast) and channels_last.

Goal >= 0.95: the loader keeps the GPU busy. Models: resnet50 @224 and resnet18 @512 (the fundus size).
Quiet rule (benchmarks/quiet.py): it waits up to --quiet-wait s for a quiet machine, times the two feeds in turns
(--repeats >= 3 rounds of --warmup + --steps steps each; the warm-up of every round drains what the loader prefetched
while the synthetic feed ran), reports the medians with *_spread beside them, records the load in the JSON and exits
3 when the figures are refused, unless --smoke.
  GPU:  python benchmarks/bench_input_pipeline.py --device cuda --out X.json
  CPU:  python benchmarks/bench_input_pipeline.py --device cpu --small
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import quiet
from gpu_common import provenance, synthetic_shards, write_json
from tltrain.data.loaders import LoaderConfig, build_loader


def make_step(model, device: str, bf16: bool):
    """forward + loss + backward + SGD step; one function for both feeds so only the input differs."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(images, labels):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def timed(step, batches, steps: int, warmup: int, device: str) -> float:
    """Images/s over `steps` steps after `warmup`, from an iterator of (images, labels) already on the device."""
    for _ in range(warmup):
        step(*next(batches))
    if device == "cuda":
        torch.cuda.synchronize()
    start, count = time.perf_counter(), 0
    for _ in range(steps):
        images, labels = next(batches)
        step(images, labels)
        count += images.shape[0]
    if device == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def loader_batches(loader):
    """Endless (images, labels) from a loader, epoch after epoch."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            yield batch.images, batch.labels
        epoch += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--small", action="store_true", help="CPU smoke run: resnet10t @64, batch 8, few steps")
    parser.add_argument("--images", type=int, default=2048, help="images in the shard set the loader reads")
    parser.add_argument("--source", type=int, default=1024, help="source JPEG width (4:3)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=quiet.MIN_REPEATS, help="rounds of each feed, in turns")
    quiet.add_arguments(parser)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device, gpu = args.device, args.device == "cuda"
    configs = [("resnet50", 224, 256), ("resnet18", 512, 128)]
    if args.small:
        configs, args.images, args.source, args.steps, args.warmup, args.workers = \
            [("resnet10t", 64, 8)], 16, 256, 4, 1, 1
    work = Path(tempfile.mkdtemp(prefix="bench_input_"))
    report = {"benchmark": "input_pipeline", **provenance(device), "goal": "efficiency >= 0.95",
              "precision": "bf16" if gpu else "fp32", "channels_last": True, "results": []}
    watch = quiet.Watch().start(args.quiet_wait)
    try:
        shards = synthetic_shards(work, args.images, args.source)
        for arch, size, batch in configs:
            torch.manual_seed(0)
            model = timm.create_model(arch, num_classes=5).to(device).to(memory_format=torch.channels_last).train()
            step = make_step(model, device, bf16=gpu)
            images = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
            labels = torch.randint(0, 5, (batch,), device=device)
            cfg = LoaderConfig(backend="dali" if gpu else "torch", batch_size=batch, size=size, workers=args.workers,
                               dtype="bf16" if gpu else "fp32", channels_last=True)
            loader = build_loader(cfg, shards, "train", train=True, device=device)
            feeds = {"synthetic": iter(lambda: (images, labels), None), "loader": loader_batches(loader)}
            # the two feeds in turns, args.repeats rounds each (benchmarks/quiet.py): medians and spreads
            runs = quiet.interleaved({name: (lambda feed=feed: timed(step, feed, args.steps, args.warmup, device))
                                      for name, feed in feeds.items()}, args.repeats)
            synthetic, real = runs["synthetic"]["median"], runs["loader"]["median"]
            row = {"model": f"{arch}@{size}", "batch": batch, "backend": cfg.backend,
                   "synthetic_img_s": round(synthetic, 1), "synthetic_spread": runs["synthetic"]["spread"],
                   "loader_img_s": round(real, 1), "loader_spread": runs["loader"]["spread"],
                   "efficiency": round(real / synthetic, 3),
                   "efficiency_values": [round(r / s, 3) for r, s in zip(runs["loader"]["values"],
                                                                         runs["synthetic"]["values"])],
                   "loader_wait_fraction": loader.stats().get("wait_fraction")}
            report["results"].append(row)
            write_json(args.out, {**report, "status": "partial"}, echo=False)
            print(row, flush=True)
        report["status"] = "ok"
        report.update(watch.verdict())
        write_json(args.out, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not report["recorded"] and not args.smoke:
        raise SystemExit(quiet.REFUSED_EXIT)


if __name__ == "__main__":
    main()
