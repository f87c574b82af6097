"""Part f of gpu_all.sh: smoke runs of the shipped DDP and DeepSpeed ZeRO-2 presets (bf16, channels_last) as users
launch them (torchrun, world size 1, NCCL on a GPU, gloo on the CPU), with the images/s the run itself reports.

Quiet rule (benchmarks/quiet.py): it waits up to --quiet-wait s for a quiet machine, records the load and the
other processes' CPU use in the JSON (torchrun and its ranks count as its own) and exits 3 when the figures are
refused, unless --smoke. Each run trains 1 + --repeats (>= 3) epochs: images_per_s is the median of the epochs after
the first (which pays the start-up), with images_per_s_spread beside it. The presets are not run in turns: each is
a torchrun launch of 15-30 s of start-up on a GPU, and three launches of each would not fit gpu_all's budget.

  GPU:  python benchmarks/bench_strategies.py --device cuda --out X.json
  CPU:  python benchmarks/bench_strategies.py --device cpu --small
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import quiet
from gpu_common import provenance, synthetic_shards, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--small", action="store_true", help="CPU smoke run: resnet10t @32, torch loader")
    parser.add_argument("--presets", nargs="+", default=["ddp", "deepspeed"])
    parser.add_argument("--timeout", type=int, default=0, help="seconds per run (default 150 on a GPU, 600 small)")
    parser.add_argument("--repeats", type=int, default=quiet.MIN_REPEATS,
                        help="timed epochs per run (after one start-up epoch); the median counts")
    quiet.add_arguments(parser)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    repeats = max(args.repeats, quiet.MIN_REPEATS)
    images, source, overrides = 1024, 768, ["model.arch=resnet50", "loader=dali", "loader.size=224",
                                            "loader.batch_size=128", "loader.workers=16"]
    if args.small:
        images, source, overrides = 24, 256, ["model.arch=resnet10t", "loader=torch", "loader.size=32",
                                              "loader.batch_size=4", "loader.workers=0"]
    args.timeout = args.timeout or (600 if args.small else 150)
    work = Path(tempfile.mkdtemp(prefix="bench_strategies_"))
    report = {"benchmark": "strategies", **provenance(args.device), "world_size": 1, "timed_epochs": repeats,
              "results": []}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not gpu:
        env["DS_ACCELERATOR"] = "cpu"
    watch = quiet.Watch().start(args.quiet_wait)
    try:
        shards = synthetic_shards(work, images, source, val_fraction=0.1)
        for preset in args.presets:
            run_dir = work / f"run_{preset}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                   "-m", "tltrain.cli", "train", f"data.shards={shards}", f"trainer={preset}", "trainer.progress=false",
                   "schedule=finetune_all", f"schedule.epochs_per_phase={1 + repeats}", "data.test_split=",
                   f"run_dir={run_dir}", f"device={args.device}", *overrides]
            start = time.perf_counter()
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, cwd=work)
                code, tail = proc.returncode, (proc.stdout + proc.stderr)[-1500:]
            except subprocess.TimeoutExpired as exc:
                out = exc.output or b""
                code, tail = "timeout", (out.decode(errors="replace") if isinstance(out, bytes) else out)[-1500:]
            row = {"preset": preset, "exit_code": code, "wall_s": round(time.perf_counter() - start, 1)}
            metrics_path = run_dir / "metrics.json"
            if code == 0 and metrics_path.is_file():
                metrics = json.loads(metrics_path.read_text())
                rates = [h["images_per_s"] for h in metrics.get("history", []) if "images_per_s" in h]
                # the epochs after the first: the first includes start-up (cuDNN autotuning, DALI warm-up)
                rates = rates[1:] or rates
                row["images_per_s"] = round(statistics.median(rates), 1) if rates else None
                row["images_per_s_spread"] = round(max(rates) / min(rates) - 1, 3) if rates and min(rates) > 0 \
                    else None
                row["images_per_s_values"] = [round(r, 1) for r in rates]
                row["val_kappa"] = metrics.get("final", {}).get("kappa")
            else:
                row["log_tail"] = tail
            report["results"].append(row)
            write_json(args.out, {**report, "status": "partial"}, echo=False)
            print(row, flush=True)
        report["status"] = "ok" if all(r["exit_code"] == 0 for r in report["results"]) else "failed"
        report.update(watch.verdict())
        write_json(args.out, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if report["status"] != "ok":
        sys.exit(1)
    if not report["recorded"] and not args.smoke:
        sys.exit(quiet.REFUSED_EXIT)


if __name__ == "__main__":
    main()
