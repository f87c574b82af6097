"""How long `tltrain submit` takes with a valid config, and where the time goes.

    source slurm/env.sh     # a running cluster (slurm/up.sh); without sbatch the local executor is timed
    .venv/bin/python benchmarks/bench_submit.py --shards /path/to/shards --out benchmarks/results/submit.json

Each repeat runs the real command line in a fresh process (as a user does), then cancels the queued job, so the
cluster stays free. Also timed in fresh processes: the submit-time check alone (compose + validate the whole
run: check_run) and, for comparison, `import torch` and `import timm`, which the check used to pay for. CPU times
are reported next to wall times because a shared machine's load inflates wall time.

Quiet rule (benchmarks/quiet.py): it waits up to --quiet-wait s for a quiet machine, runs the five commands in
turns, --repeats (>= 3) times each (medians, with wall_spread beside them), records the load and the other
processes' CPU use in the JSON (the commands it starts count as its own, and so does the CPU time a local job used
before it was cancelled; a SLURM cluster's daemons on this machine do not) and exits 3 when refused, unless --smoke.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

import quiet


def timed(cmd: list[str], env: dict) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall and CPU (user + sys of the child) seconds of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), done


def summary(pairs: list[tuple[float, float]]) -> dict:
    walls, cpus = [p[0] for p in pairs], [p[1] for p in pairs]
    return {"wall_median_s": statistics.median(walls), "wall_min_s": min(walls), "wall_max_s": max(walls),
            "wall_spread": round(max(walls) / min(walls) - 1, 3) if min(walls) > 0 else None,
            "cpu_median_s": statistics.median(cpus), "runs": len(pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", required=True, help="a prepared shard folder (data.shards)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command, in turns (at least 3)")
    quiet.add_arguments(parser)
    parser.add_argument("--out", default=None, help="JSON file; default: print only")
    args = parser.parse_args()
    env = dict(os.environ)
    python = sys.executable
    overrides = [f"data.shards={args.shards}", "model.arch=resnet18", "trainer=ddp"]
    slurm = shutil.which("sbatch") is not None
    root = Path(tempfile.mkdtemp(prefix="bench_submit_"))
    check = ("from tltrain.launch.config import LaunchConfig; from tltrain.launch.submit import check_run; "
             f"check_run({overrides!r}, LaunchConfig(tasks_per_node=2))")
    results: dict = {"slurm": slurm, "load_average": os.getloadavg(), "overrides": overrides}
    pairs: dict[str, list[tuple[float, float]]] = {}
    submitted = iter(range(10 ** 6))
    jobs_cpu = [0.0]  # CPU seconds of the local jobs, read before they are cancelled: this benchmark's own work

    def run_code(name: str, code: str) -> float:
        wall, cpu, _ = timed([python, "-c", code], env)
        pairs.setdefault(name, []).append((wall, cpu))
        return wall

    def submit() -> float:
        index = next(submitted)
        cmd = [python, "-m", "tltrain.cli", "submit", "--tasks-per-node", "2", "--time", "5", "--root", str(root),
               "--name", f"bench{index}", *(["--slurm"] if slurm else ["--local"]), *overrides]
        wall, cpu, done = timed(cmd, env)
        if done.returncode != 0:
            raise SystemExit(f"submit failed: {done.stderr[-2000:]}")
        job_id = done.stdout.split()[-1]
        if slurm:
            subprocess.run(["scancel", job_id], check=False)
        else:
            try:  # the local executor's job is a process of this machine (not a child that this one waits for)
                job = psutil.Process(int(job_id))
                jobs_cpu[0] += sum(sum(p.cpu_times()[:4]) for p in [job, *job.children(recursive=True)])
                os.kill(int(job_id), 15)
            except (OSError, ValueError, psutil.Error):
                pass
        pairs.setdefault("tltrain_submit", []).append((wall, cpu))
        return wall

    variants = {name: (lambda name=name, code=code: run_code(name, code))
                for name, code in (("python_startup", "pass"), ("import_torch", "import torch"),
                                   ("import_timm", "import timm"), ("check_run", check))}
    variants["tltrain_submit"] = submit
    watch = quiet.Watch().start(args.quiet_wait)
    # every command in turns, args.repeats times each (benchmarks/quiet.py): a slow moment hits them alike
    quiet.interleaved(variants, args.repeats)
    for name in variants:
        results[name] = summary(pairs[name])
    watch.own -= jobs_cpu[0]  # the cancelled local jobs' CPU counts as this benchmark's, not as another process's
    results["local_jobs_cpu_s"] = round(jobs_cpu[0], 2)
    results.update(watch.verdict())
    shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if not results["recorded"] and not args.smoke:
        raise SystemExit(quiet.REFUSED_EXIT)


if __name__ == "__main__":
    main()
