"""Per-sample memory of prepare's main process and of the loaders' index, at several N (Python heap, tracemalloc).

    .venv/bin/python benchmarks/bench_memory.py --n 1000 10000 --json benchmarks/results/memory.json

Peak RSS (bench_scale.py) mixes the per-sample state with libraries and allocator slack; this measures the Python
heap itself: prepare's traced peak in its main process (the pool's children are not counted), and the heap a
loader holds once built (its sample index; the torch loader's workers start later). The growth between two N,
divided by the samples added, is the per-sample cost: what must stay small for 88,702 images and beyond.

Quiet rule (benchmarks/quiet.py): it waits up to --quiet-wait s for a quiet machine, records the load and the other
processes' CPU use in the JSON and exits 3 when refused, unless --smoke. The loaders' heaps (cheap to take) are
traced --repeats >= 3 times, the backends in turns: held_bytes and peak_bytes are the medians, with held_spread and
peak_spread beside them. prepare's peak and synth_s are single figures: each is a whole prepare (or synth) of N
images, and a traced heap does not move with the machine's load the way a time does.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import statistics
import time
import tracemalloc
from pathlib import Path

import quiet


def traced(fn):
    """(result, heap held after fn and a gc, peak heap during fn), both relative to the heap before."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    result = fn()
    gc.collect()
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, held - base, peak - base


def run_n(n: int, args) -> dict:
    from tltrain.data.loaders import LoaderConfig, build_loader
    from tltrain.data.prepare import PrepareConfig, run_prepare
    from tltrain.data.sources import SourceConfig
    from tltrain.data.synth import generate_eyepacs

    work = Path(args.out) / f"n{n}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        start = time.perf_counter()
        generate_eyepacs(work / "raw", n_patients=n // 2, width=args.width, seed=1, workers=args.workers,
                         progress=False)
        result = {"n": n, "synth_s": round(time.perf_counter() - start, 1)}
        cfg = PrepareConfig(source=SourceConfig(kind="eyepacs", root=str(work / "raw")), out=str(work / "shards"),
                            workers=args.workers, progress=False, shard_samples=args.shard_samples)
        # the pool's children are forked from a traced process; their allocations are not counted here
        manifest, held, peak = traced(lambda: run_prepare(cfg))
        written = manifest["counts"]["written"]
        result["prepare"] = {"samples": written, "peak_bytes": peak, "held_after_bytes": held}
        builds, peaks = {}, {}
        for backend in ("torch", "dali"):
            loader_cfg = LoaderConfig(backend=backend, batch_size=32, size=32, workers=2)
            if backend == "dali":
                loader_cfg.dali_device = "cpu"
            builds[backend] = lambda c=loader_cfg: build_loader(c, work / "shards", "train", train=True)
            builds[backend]()  # imports and one-time set-up are not per-sample state

        def held_by(backend):
            loader, held_bytes, peak = traced(builds[backend])
            del loader
            peaks.setdefault(backend, []).append(peak)
            return held_bytes

        # the backends in turns, args.repeats times each (benchmarks/quiet.py): medians and spreads
        runs = quiet.interleaved({backend: (lambda b=backend: held_by(b)) for backend in builds}, args.repeats)
        samples = manifest["splits"]["train"]["count"]
        for backend, run in runs.items():
            p = peaks[backend]
            result[f"loader_{backend}"] = {"samples": samples, "held_bytes": round(run["median"]),
                                           "peak_bytes": round(statistics.median(p)), "held_spread": run["spread"],
                                           "peak_spread": round(max(p) / min(p) - 1, 3) if min(p) > 0 else None,
                                           "held_values": [round(v) for v in run["values"]]}
        print(json.dumps(result), flush=True)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def slopes(runs: list[dict]) -> dict:
    """Bytes per added sample between the smallest and the largest N."""
    small, large = runs[0], runs[-1]
    out = {}
    for name, value in (("prepare_peak", "peak_bytes"), ("loader_torch_held", "held_bytes"),
                        ("loader_dali_held", "held_bytes")):
        part = name.rsplit("_", 1)[0]
        added = large[part]["samples"] - small[part]["samples"]
        out[name] = round((large[part][value] - small[part][value]) / added) if added else None
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--width", type=int, default=128, help="synthetic image width (as bench_scale.py)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-samples", type=int, default=1000)
    parser.add_argument("--out", default="/tmp/tltrain_bench_memory")
    parser.add_argument("--json", default=None)
    parser.add_argument("--repeats", type=int, default=quiet.MIN_REPEATS,
                        help="traced builds of each loader, in turns; the medians count")
    quiet.add_arguments(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    watch = quiet.Watch().start(args.quiet_wait)
    runs = [run_n(n, args) for n in sorted(args.n)]
    report = {"runs": runs, "bytes_per_added_sample": slopes(runs) if len(runs) > 1 else None, **watch.verdict()}
    print(json.dumps(report["bytes_per_added_sample"]))
    if not report["recorded"]:
        print(f"not to be recorded: {report['refused']}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return quiet.REFUSED_EXIT if not report["recorded"] and not args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
