"""What class-balanced sampling costs on the DALI backend: training epochs of the reader (every sample once) and
of the external-source sampler (loader.balanced=true) over the same shards, in turns (benchmarks/quiet.py).

CPU:  python benchmarks/bench_dali_sampling.py --images 64 --width 1024 --out results/dali_sampling_cpu.json
GPU:  python benchmarks/bench_dali_sampling.py --device cuda --images 1024 --width 2592 --batch 64 --workers 8
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import quiet

import torch

from tltrain.data.loaders import LoaderConfig, build_loader
from tltrain.data.prepare import PrepareConfig, run_prepare
from tltrain.data.sources import SourceConfig
from tltrain.data.synth import generate_eyepacs


def _rate(loader, device: str, epoch: int) -> float:
    loader.set_epoch(epoch)
    count, start = 0, time.perf_counter()
    for batch in loader:
        if device == "cuda":
            torch.cuda.synchronize()
        count += int(batch.valid.sum())
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--model-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=quiet.MIN_REPEATS)
    quiet.add_arguments(parser)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_dali_sampling_"))
    try:
        generate_eyepacs(work / "raw", n_patients=args.images // 2, width=args.width, seed=0, min_per_class=2,
                         progress=False)
        run_prepare(PrepareConfig(source=SourceConfig(kind="eyepacs", root=str(work / "raw")), out=str(work / "s"),
                                  val_fraction=0.0, test_fraction=0.0, progress=False))
        loaders = {name: build_loader(LoaderConfig(backend="dali", batch_size=args.batch, size=args.model_size,
                                                   workers=args.workers, balanced=balanced), work / "s", "train",
                                      train=True, device=args.device, seed=0)
                   for name, balanced in (("reader", False), ("balanced", True))}
        epochs = iter(range(1, 10_000))
        for loader in loaders.values():
            _rate(loader, args.device, 0)  # warm-up
        watch = quiet.Watch().start(args.quiet_wait)
        runs = quiet.interleaved({name: (lambda loader=loader: _rate(loader, args.device, next(epochs)))
                                  for name, loader in loaders.items()}, args.repeats)
        report = {"benchmark": "dali_sampling", "device": args.device, "images": args.images, "width": args.width,
                  "model_size": args.model_size, "batch": args.batch, "workers": args.workers, "runs": runs,
                  "balanced_over_reader": runs["balanced"]["median"] / runs["reader"]["median"], **watch.verdict()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    if not report["recorded"] and not args.smoke:
        raise SystemExit(quiet.REFUSED_EXIT)


if __name__ == "__main__":
    main()
