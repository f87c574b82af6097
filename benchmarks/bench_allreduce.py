"""All-reduce time against message size between ranks, the communication input of docs/scaling.md.

Run one process per rank with the torch.distributed variables set, e.g. on the two-node cluster of
`slurm/up.sh --nodes 2` (gloo between network namespaces):

    srun -N2 -n2 .venv/bin/python benchmarks/bench_allreduce.py --out benchmarks/results/allreduce_gloo.json

Under SLURM without torchrun the ranks come from SLURM_PROCID / SLURM_NTASKS and the first host of the job.
On GPUs (NCCL) pass --device cuda. Rank 0 writes JSON: per size the median and minimum of --repeats timed
all-reduces (after --warmup), and the bus bandwidth 2 (n-1)/n * bytes / time (NCCL-tests' definition).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mib", default="0.25,1,4,16,25,64,100", help="message sizes in MiB (fp32)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl)")
    parser.add_argument("--out", default=None, help="JSON file (rank 0); default: print only")
    args = parser.parse_args()
    _slurm_env()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for size_mib in (float(s) for s in args.sizes_mib.split(",")):
        tensor = torch.ones(int(size_mib * MIB) // 4, dtype=torch.float32, device=device)
        times = []
        for i in range(args.warmup + args.repeats):
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            dist.all_reduce(tensor)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        median = statistics.median(times)
        rows.append({"size_mib": size_mib, "median_s": median, "min_s": min(times),
                     "bus_gb_per_s": 2 * (world - 1) / world * size_mib * MIB / median / 1e9})
        if rank == 0:
            print(f"{size_mib:8.2f} MiB  median {median * 1e3:9.2f} ms  min {min(times) * 1e3:9.2f} ms  "
                  f"bus {rows[-1]['bus_gb_per_s']:.3f} GB/s", flush=True)
    if rank == 0 and args.out:
        result = {"backend": dist.get_backend(), "world_size": world, "host": socket.gethostname(),
                  "nodes": os.environ.get("SLURM_JOB_NODELIST"), "load_average": os.getloadavg(),
                  "torch": torch.__version__, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
