"""Data-parallel scaling model of docs/scaling.md: predicted throughput and efficiency from a measured step time and
measured all-reduce times.

    .venv/bin/python benchmarks/scaling_model.py                       # the tables of docs/scaling.md
    .venv/bin/python benchmarks/scaling_model.py --allreduce benchmarks/results/allreduce_gloo.json

Per optimizer step of one rank (DDP, gradient accumulation A, per-GPU batch B):
    t_step(N) = A * t_compute(B)  +  s * log2(N) * t_compute(B)  +  exposed_comm(N)
    exposed_comm = max(t_last_bucket, t_allreduce(G, N) - overlap * t_backward)
    t_allreduce(bytes, N) = sum over DDP buckets of [2 (N - 1) * alpha + 2 (N - 1) / N * bucket / busbw(N)]
t_backward = 2/3 of t_compute (backward costs about twice the forward), overlapped only in the last
micro-batch (no_sync skips the others). busbw(N): intra-node bus bandwidth up to gpus_per_node ranks, the
inter-node one beyond. s is the per-doubling slowdown not caused by the all-reduce (input pipeline, stragglers,
clock drop), paid once per optimizer step (a synchronisation point): calibrated so that 8 GPUs give NVIDIA's
published 84 % (see docs/scaling.md), 0 when uncalibrated.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

RESNET50_PARAMS = 25_557_032
MB = 1e6


@dataclass
class Network:
    name: str
    alpha_s: float  # per-hop latency of one ring step
    busbw_intra: float  # bytes/s, ranks on one node
    busbw_inter: float  # bytes/s, once the ring leaves the node
    gpus_per_node: int = 8

    def busbw(self, n: int) -> float:
        return self.busbw_intra if n <= self.gpus_per_node else self.busbw_inter

    def allreduce_s(self, nbytes: float, n: int) -> float:
        if n == 1:
            return 0.0
        return 2 * (n - 1) * self.alpha_s + 2 * (n - 1) / n * nbytes / self.busbw(n)


def buckets(grad_bytes: float, bucket_mb: float, first_mb: float = 1.0) -> list[float]:
    """DDP's buckets: a small first one (1 MB, so communication starts early), then bucket_cap_mb each."""
    sizes, left = [], grad_bytes
    for cap in [first_mb * MB] + [bucket_mb * MB] * 100000:
        if left <= 0:
            break
        sizes.append(min(cap, left))
        left -= cap
    return sizes


def step_time(t_compute: float, n: int, net: Network, grad_bytes: float, bucket_mb: float, accum: int,
              slowdown: float, overlap: float = 1.0) -> tuple[float, float]:
    """(seconds per optimizer step, exposed communication seconds)."""
    parts = buckets(grad_bytes, bucket_mb)
    comm = sum(net.allreduce_s(b, n) for b in parts)
    last = net.allreduce_s(parts[-1], n)  # the bucket that is ready only when backward ends
    exposed = 0.0 if n == 1 else max(last, comm - overlap * (2 / 3) * t_compute)
    return accum * t_compute + slowdown * math.log2(n) * t_compute + exposed, exposed


def calibrate_slowdown(anchor_eff: float, n: int, t_compute: float, net: Network, grad_bytes: float,
                       bucket_mb: float) -> float:
    """s such that the model gives the anchor's efficiency at n ranks (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        t, _ = step_time(t_compute, n, net, grad_bytes, bucket_mb, 1, mid)
        lo, hi = (mid, hi) if t_compute / t > anchor_eff else (lo, mid)
    return (lo + hi) / 2


def table(label: str, t_compute: float, batch: int, net: Network, slowdown: float, gpus=(1, 8, 16, 64),
          bucket_mbs=(25.0,), accums=(1,), grad_bytes: float = 4 * RESNET50_PARAMS) -> list[dict]:
    rows = []
    for bucket_mb in bucket_mbs:
        for accum in accums:
            for n in gpus:
                t, exposed = step_time(t_compute, n, net, grad_bytes, bucket_mb, accum, slowdown)
                throughput = n * accum * batch / t
                rows.append({"case": label, "gpus": n, "bucket_mb": bucket_mb, "grad_accum": accum,
                             "step_s": t, "exposed_comm_ms": exposed * 1e3, "images_per_s": throughput,
                             "efficiency": accum * t_compute / t})
    return rows


def fit_network(path: str | Path, gpus_per_node: int = 1) -> Network:
    """alpha and bus bandwidth from bench_allreduce.py rows (2 ranks: t = 2 alpha + bytes / busbw)."""
    data = json.loads(Path(path).read_text())
    n = data["world_size"]
    xs = [2 * (n - 1) / n * r["size_mib"] * (1 << 20) for r in data["rows"]]
    ys = [r["median_s"] for r in data["rows"]]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    intercept = max(mean_y - slope * mean_x, 0.0)
    bw = 1 / slope
    return Network(f"{data['backend']} measured ({path})", intercept / (2 * (n - 1)), bw, bw, gpus_per_node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--allreduce", default=None, help="bench_allreduce.py JSON (adds a measured-network table)")
    parser.add_argument("--cpu-step-s", type=float, default=None, help="measured CPU step time for that table")
    parser.add_argument("--cpu-batch", type=int, default=32)
    parser.add_argument("--json", default=None, help="write all rows here")
    args = parser.parse_args()

    # GPU inputs. Step time: NVIDIA's published ResNet-50 v1.5 AMP throughput on one A100 80GB at batch 256
    # (2470 img/s); replace with bench_trainer.py on your GPU. Network: NCCL bus bandwidth of a DGX A100 class
    # node (NVLink/NVSwitch ~230 GB/s) and 8x200 Gb/s InfiniBand between nodes (~20 GB/s bus bandwidth per GPU
    # ring), 10 us per ring hop; replace with bench_allreduce.py --device cuda on your cluster.
    nccl = Network("NCCL, NVSwitch + 8x HDR IB (published-class figures)", 10e-6, 230e9, 20e9, 8)
    t224 = 256 / 2470
    s = calibrate_slowdown(0.84, 8, t224, nccl, 4 * RESNET50_PARAMS, 25.0)
    # 512 px: 5.2x the FLOPs per image ((512/224)^2), batch 48 per GPU fits where 256 did at 224.
    t512 = 48 * (512 / 224) ** 2 / 2470
    rows = table("resnet50 224, batch 256/GPU", t224, 256, nccl, s, bucket_mbs=(1.0, 25.0, 100.0), accums=(1, 4))
    rows += table("resnet50 512, batch 48/GPU", t512, 48, nccl, s, bucket_mbs=(1.0, 25.0, 100.0), accums=(1, 4))
    rows += table("resnet50 224, no calibration (communication only)", t224, 256, nccl, 0.0)
    if args.allreduce:
        measured = fit_network(args.allreduce)
        step = args.cpu_step_s or 1.0
        rows += table(f"resnet50 224 CPU ranks over {measured.name}, step {step:.2f} s at batch {args.cpu_batch}",
                      step, args.cpu_batch, measured, 0.0, gpus=(1, 2, 8, 16, 64), bucket_mbs=(1.0, 25.0, 100.0),
                      accums=(1, 4))
        rows += table(f"resnet50 224 A100 step (batch 256) over {measured.name}", t224, 256, measured, 0.0,
                      gpus=(2, 8, 64), bucket_mbs=(25.0,), accums=(1, 4))
        print(f"measured network: alpha {measured.alpha_s * 1e6:.0f} us per hop, bus bandwidth "
              f"{measured.busbw_intra / 1e9:.3f} GB/s")
    print(f"calibrated non-communication slowdown s = {s:.4f} per doubling of GPUs (84 % at 8 A100s)")
    print(f"{'case':58s} {'GPUs':>4s} {'bucket':>6s} {'accum':>5s} {'img/s':>9s} {'eff':>6s} {'comm ms':>8s}")
    for r in rows:
        print(f"{r['case'][:58]:58s} {r['gpus']:4d} {r['bucket_mb']:6.0f} {r['grad_accum']:5d} "
              f"{r['images_per_s']:9.0f} {r['efficiency']:6.1%} {r['exposed_comm_ms']:8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"slowdown_per_doubling": s, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
