"""`tltrain submit`: the command line over `submit` and `submit_chain` (`tltrain jobs` is in launch.jobs)."""
from __future__ import annotations

import argparse
import sys

from tltrain.launch.chain import submit_chain
from tltrain.launch.config import LaunchConfig, parse_mem_gb, parse_time_min
from tltrain.launch.submit import submit

USAGE = """tltrain submit [options] OVERRIDE... [--chain STEP2_OVERRIDE...]

examples:
  tltrain submit --nodes 2 --tasks-per-node 4 --gpus-per-node 4 --time 12:00:00 trainer.strategy=ddp data.shards=...
  tltrain submit --time 4:00:00 data.shards=/data/eyepacs --chain data.shards=/data/aptos schedule=finetune_all
"""


def _parser() -> argparse.ArgumentParser:
    defaults = LaunchConfig()
    parser = argparse.ArgumentParser(
        prog="tltrain submit", usage=USAGE,
        description="Submit a training run to SLURM and return at once with its job id (without SLURM, i.e. no "
                    "sbatch on PATH, it runs on this machine through submitit's local executor). The overrides are "
                    "those of `tltrain train`. Runs resume from their own checkpoints when requeued.")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the run (key=value, group=option)")
    parser.add_argument("--nodes", type=int, default=defaults.nodes, help="nodes (default %(default)s)")
    parser.add_argument("--tasks-per-node", type=int, default=defaults.tasks_per_node,
                        help="processes per node, one per GPU; more than one task needs trainer.strategy=ddp "
                             "or deepspeed (default %(default)s)")
    parser.add_argument("--gpus-per-node", type=int, default=defaults.gpus_per_node, help="(default %(default)s)")
    parser.add_argument("--cpus-per-task", type=int, default=defaults.cpus_per_task,
                        help="(default: the partition's)")
    parser.add_argument("--partition", default=defaults.partition, help="(default: the cluster's)")
    parser.add_argument("--time", type=parse_time_min, default=defaults.time_min, dest="time_min",
                        help="time limit: minutes, HH:MM:SS or D-HH:MM:SS (default %(default)s min)")
    parser.add_argument("--mem", type=parse_mem_gb, default=defaults.mem_gb, dest="mem_gb",
                        help="memory per node: 64G, 512M or GB (default: the partition's)")
    parser.add_argument("--max-retries", type=int, default=defaults.max_retries,
                        help="requeues after time limits and preemptions (default %(default)s)")
    parser.add_argument("--signal-delay-s", type=int, default=defaults.signal_delay_s,
                        help="USR2 this long before the time limit: checkpoint and requeue (default %(default)s)")
    parser.add_argument("--root", default=defaults.root, help="run dirs are created here (default %(default)s)")
    parser.add_argument("--registry", default=None,
                        help="job registry file, e.g. ~/.tltrain/jobs.jsonl (default: ROOT/.tltrain_jobs.jsonl)")
    parser.add_argument("--name", default=None, help="run dir name (default: from the overrides)")
    parser.add_argument("--after", default=None, help="a SLURM job id that must succeed first (afterok)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--local", dest="local", action="store_true", default=None,
                       help="run with submitit's local executor even where SLURM is available")
    where.add_argument("--slurm", dest="local", action="store_false", help="fail unless SLURM is available")
    parser.add_argument("--prepare", action="store_true",
                        help="the overrides are those of `tltrain prepare`: run it as check/write arrays of "
                             "--tasks tasks and a finish job (shards identical to a one-process prepare)")
    parser.add_argument("--tasks", type=int, default=1, help="array tasks of --prepare (default %(default)s)")
    parser.add_argument("--wait", action="store_true", help="wait for the job(s); exit 1 if one failed")
    return parser


def cli_submit(argv: list[str]) -> int:
    """Options, then step 1's overrides; everything after --chain is step 2's overrides (its model.weights is
    set to step 1's run dir, and it starts only after step 1 succeeded). Prints the job ids; returns the exit code."""
    if "--chain" in argv:
        step1, step2 = argv[:argv.index("--chain")], argv[argv.index("--chain") + 1:]
    else:
        step1, step2 = argv, None
    args = _parser().parse_args(step1)
    launch = {key: value for key, value in vars(args).items()
              if key not in ("overrides", "name", "after", "wait", "prepare", "tasks")}
    if args.prepare:
        return _submit_prepare(args, launch)
    if step2 is not None:
        if args.after:
            print("tltrain submit: --after and --chain cannot be combined (step 2 already waits for step 1)",
                  file=sys.stderr)
            return 2
        jobs = submit_chain(args.overrides, step2, name=args.name or "chain", **launch)
    else:
        jobs = (submit(args.overrides, name=args.name, dependency=args.after, **launch),)
    print(" ".join(str(job.job_id) for job in jobs), flush=True)
    if not args.wait:
        return 0
    code = 0
    for job in jobs:
        error = job.exception()
        if error is not None:
            print(f"job {job.job_id} failed: {error}", file=sys.stderr)
            code = 1
    return code


def _submit_prepare(args: argparse.Namespace, launch: dict) -> int:
    """`tltrain submit --prepare --tasks K OVERRIDE...`: prints the finish job's id (it runs last)."""
    from tltrain.launch.prepare_job import submit_prepare

    jobs = submit_prepare(args.overrides, tasks=args.tasks, name=args.name, **launch)
    print(jobs[-1].job_id, flush=True)
    if args.wait and jobs[-1].exception() is not None:
        print(f"job {jobs[-1].job_id} failed: {jobs[-1].exception()}", file=sys.stderr)
        return 1
    return 0
