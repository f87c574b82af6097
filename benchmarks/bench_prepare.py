"""Images per second of `tltrain prepare` on synthetic camera-size JPEGs, 1 vs 2 processes, pass-through vs
resize, and peak memory (main process and its workers, each configuration measured in a fresh
process). Ratios are against the 1-process pass-through run of the same invocation. Each configuration runs
--repeats times, the configurations in turns (benchmarks/quiet.py), medians count; a loaded machine is refused.
Only images_per_s is a median (with its spread); a configuration's peak memory and seconds are those of its last
run (the rounds repeat the same work), and synth_seconds is a single figure (it makes the input, not a result).

  python benchmarks/bench_prepare.py --images 48 --out benchmarks/results/prepare.json
  python benchmarks/bench_prepare.py --small            # 8 images: a quick smoke run (well under a minute)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import quiet

from tltrain.data.prepare import PrepareConfig, run_prepare
from tltrain.data.sources import SourceConfig
from tltrain.data.synth import generate_eyepacs


def _peak_mb() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"self_peak_mb": round(own, 1), "worker_peak_mb": round(children, 1)}


def _one_run(spec: str) -> None:
    """One prepare in a fresh process, so its peak memory (main and workers) is its own, not the synth's."""
    raw, out, resize, workers = json.loads(spec)
    cfg = PrepareConfig(source=SourceConfig(kind="eyepacs", root=raw), out=out, resize=resize, workers=workers,
                        progress=False)
    t = time.perf_counter()
    manifest = run_prepare(cfg)
    seconds = time.perf_counter() - t
    n = manifest["counts"]["written"]
    print(json.dumps({"resize": resize, "workers": workers, "images": n, "seconds": round(seconds, 2),
                      "images_per_s": round(n / seconds, 2),
                      "shard_mb": round(sum(s["bytes"] for s in manifest["shards"]) / 1e6, 1), **_peak_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=48, help="images (two per patient)")
    parser.add_argument("--width", type=int, default=2592)
    parser.add_argument("--height", type=int, default=1944)
    parser.add_argument("--resize", default="radius:256", help="the resized variant: radius:N or longest:N")
    parser.add_argument("--small", action="store_true", help="8 images, for a quick check that it runs")
    parser.add_argument("--out", default=None, help="JSON results file")
    parser.add_argument("--repeats", type=int, default=quiet.MIN_REPEATS, help="runs of each configuration")
    quiet.add_arguments(parser)
    parser.add_argument("--one-run", default=None, help=argparse.SUPPRESS)  # internal: one measured prepare
    args = parser.parse_args()
    if args.one_run:
        return _one_run(args.one_run)
    if args.small:
        args.images = 8
    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        t = time.perf_counter()
        generate_eyepacs(work / "raw", n_patients=max(1, args.images // 2), width=args.width, height=args.height,
                         seed=0, min_per_class=2, progress=False)
        synth_s = time.perf_counter() - t
        raw_mb = sum(p.stat().st_size for p in (work / "raw" / "train").glob("*")) / 1e6
        last: dict[tuple, dict] = {}

        def measure(resize: str, workers: int) -> float:
            out = work / f"shards_{resize.replace(':', '')}_{workers}"
            shutil.rmtree(out, ignore_errors=True)  # every run writes every shard (no resume)
            spec = json.dumps([str(work / "raw"), str(out), resize, workers])
            run = subprocess.run([sys.executable, __file__, "--one-run", spec], capture_output=True, text=True,
                                 check=True)
            last[resize, workers] = json.loads(run.stdout.strip().splitlines()[-1])
            print(json.dumps(last[resize, workers]), flush=True)
            return last[resize, workers]["images_per_s"]

        configs = [(resize, workers) for resize in ("none", args.resize) for workers in (1, 2)]
        watch = quiet.Watch().start(args.quiet_wait)
        runs = quiet.interleaved({f"{r}|{w}": (lambda r=r, w=w: measure(r, w)) for r, w in configs}, args.repeats)
        results = [{**last[r, w], "images_per_s": round(runs[f"{r}|{w}"]["median"], 2),
                    "spread": runs[f"{r}|{w}"]["spread"]} for r, w in configs]
        base = results[0]["images_per_s"]
        for r in results:
            r["ratio_vs_1proc_passthrough"] = round(r["images_per_s"] / base, 2)
        report = {"benchmark": "prepare", "machine": platform.machine(), "cpus": os.cpu_count(),
                  "source": f"{args.images} synthetic {args.width}x{args.height} JPEGs, {raw_mb:.1f} MB",
                  "synth_seconds": round(synth_s, 1), "results": results, **watch.verdict()}
        print(json.dumps(report, indent=1))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not report["recorded"] and not args.smoke:
        raise SystemExit(quiet.REFUSED_EXIT)


if __name__ == "__main__":
    main()
