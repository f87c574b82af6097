"""All-reduce time against message size between ranks, the communication input of docs/scaling.md.

Run one process per rank with the torch.distributed variables set, e.g. on the two-node cluster of
`slurm/up.sh --nodes 2` (gloo between network namespaces):

    srun -N2 -n2 .venv/bin/python benchmarks/bench_allreduce.py --out benchmarks/results/allreduce_gloo.json

Under SLURM without torchrun the ranks come from SLURM_PROCID / SLURM_NTASKS and the first host of the job.
On GPUs (NCCL) pass --device cuda. Rank 0 writes JSON: per size the median and minimum of the timed all-reduces,
and the bus bandwidth 2 (n-1)/n * bytes / time (NCCL-tests' definition).

Quiet rule (benchmarks/quiet.py): every rank waits up to --quiet-wait s for a quiet machine; the sizes are timed in
turns, --rounds >= 3 rounds of --repeats all-reduces each (after --warmup): median_s is the median of the rounds'
medians, min_s the fastest all-reduce of all, with median_spread (across rounds) beside them. Rank 0 gathers every
rank's load and CPU use: ranks on the same kernel (same boot id: the network-namespace "nodes" of slurm/up.sh share
one machine) count as one machine's own use. The JSON says recorded/refused; a refused run exits 3 unless --smoke.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist

import quiet

MIB = 1 << 20


def _slurm_env() -> None:
    """torchrun-style variables from SLURM's, when started by srun."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], capture_output=True,
                           text=True, check=True).stdout.split()
    os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                      LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"), MASTER_ADDR=hosts[0],
                      MASTER_PORT=str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000))


def _boot_id() -> str:
    """The kernel this rank runs on: equal for ranks on one machine, network namespaces or not."""
    try:
        return open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        return socket.gethostname()


def verdict(watch: quiet.Watch) -> dict:
    """quiet's verdict over every rank (collective: every rank calls it; rank 0's answer counts): per machine, the
    CPU time the machine spent less what this job's ranks on it spent."""
    busy, own = quiet._busy_seconds(), quiet._own_seconds()
    mine = {"machine": _boot_id(), "host": socket.gethostname(), "load_before": watch.load_before,
            "wall": time.monotonic() - watch.started, "busy": None if busy is None or watch.busy is None
            else busy - watch.busy, "own": own - watch.own}
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    limit, problems, foreign = quiet.load_limit(), [], {}
    for machine in dict.fromkeys(r["machine"] for r in ranks):
        on = [r for r in ranks if r["machine"] == machine]
        hosts = ",".join(sorted({r["host"] for r in on}))
        load = max(r["load_before"] for r in on)
        if load > limit:
            problems.append(f"{hosts}: load average {load:.2f} above {limit:.2f} when it started")
        busy_seconds = [r["busy"] for r in on if r["busy"] is not None]
        if busy_seconds:
            wall = max(r["wall"] for r in on)
            foreign[hosts] = round(max(0.0, max(busy_seconds) - sum(r["own"] for r in on)) / wall, 2)
            if foreign[hosts] > quiet.FOREIGN_CORES:
                problems.append(f"{hosts}: other processes used {foreign[hosts]:.2f} cores on average while it "
                                f"measured (limit {quiet.FOREIGN_CORES})")
    return {"load_before": max(r["load_before"] for r in ranks), "load_after": quiet.load_average(),
            "load_limit": limit, "foreign_cores": max(foreign.values()) if foreign else None,
            "foreign_cores_per_machine": foreign, "cpus": os.cpu_count(),
            "seconds": round(max(r["wall"] for r in ranks), 1), "recorded": not problems,
            "refused": "; ".join(problems) + ": run it again with nothing beside it" if problems else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mib", default="0.25,1,4,16,25,64,100", help="message sizes in MiB (fp32)")
    parser.add_argument("--repeats", type=int, default=10, help="timed all-reduces per size and round")
    parser.add_argument("--rounds", type=int, default=quiet.MIN_REPEATS, help="rounds over the sizes, in turns")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl)")
    quiet.add_arguments(parser)
    parser.add_argument("--out", default=None, help="JSON file (rank 0); default: print only")
    args = parser.parse_args()
    _slurm_env()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [float(s) for s in args.sizes_mib.split(",")]
    tensors = {size_mib: torch.ones(int(size_mib * MIB) // 4, dtype=torch.float32, device=device)
               for size_mib in sizes}
    times: dict[float, list[float]] = {size_mib: [] for size_mib in sizes}

    def timed(tensor: torch.Tensor) -> float:
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def one_round(size_mib: float) -> float:
        """The median of `repeats` all-reduces of this size (every rank runs the same sequence)."""
        values = [timed(tensors[size_mib]) for _ in range(args.repeats)]
        times[size_mib] += values
        return statistics.median(values)

    for size_mib in sizes:
        for _ in range(args.warmup):
            timed(tensors[size_mib])
    watch = quiet.Watch().start(args.quiet_wait)
    dist.barrier()  # the ranks waited for quiet each on its own
    # the sizes in turns, args.rounds rounds each (benchmarks/quiet.py): medians and spreads
    runs = quiet.interleaved({size_mib: (lambda s=size_mib: one_round(s)) for size_mib in sizes}, args.rounds)
    rows = []
    for size_mib, run in runs.items():
        median = run["median"]
        rows.append({"size_mib": size_mib, "median_s": median, "min_s": min(times[size_mib]),
                     "median_spread": run["spread"], "round_medians_s": run["values"],
                     "bus_gb_per_s": 2 * (world - 1) / world * size_mib * MIB / median / 1e9})
        if rank == 0:
            print(f"{size_mib:8.2f} MiB  median {median * 1e3:9.2f} ms  min {min(times[size_mib]) * 1e3:9.2f} ms  "
                  f"spread {run['spread']}  bus {rows[-1]['bus_gb_per_s']:.3f} GB/s", flush=True)
    checked = verdict(watch)
    if rank == 0 and not checked["recorded"]:
        print(f"not to be recorded: {checked['refused']}", flush=True)
    if rank == 0 and args.out:
        result = {"backend": dist.get_backend(), "world_size": world, "host": socket.gethostname(),
                  "nodes": os.environ.get("SLURM_JOB_NODELIST"), "load_average": os.getloadavg(),
                  "torch": torch.__version__, "repeats": args.repeats,
                  "rounds": max(args.rounds, quiet.MIN_REPEATS), "rows": rows, **checked}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    dist.destroy_process_group()
    if not checked["recorded"] and not args.smoke:
        raise SystemExit(quiet.REFUSED_EXIT)


if __name__ == "__main__":
    main()
