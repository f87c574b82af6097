"""Error of the Triton Ben Graham kernels against the exact float64 definition, across sigmas and methods.

The issue's bound is at most 1 grey level before normalisation (after the x4 gain). Both kernels accumulate in
float32, so a pixel whose exact value lies within ~1e-5 of a .5 rounding boundary may round the other way; this
counts how often that happens on random uint8 images (the worst case for cancellation: full-range noise).
On the CPU it runs under TRITON_INTERPRET=1, where tl.dot multiplies in float32 (not fp16 tensor cores), so the
dot kernel's hi/lo split is only truly exercised on a GPU run.

  GPU:  python benchmarks/kernel_errors.py --out benchmarks/results/kernel_errors_h100.json
  CPU:  TRITON_INTERPRET=1 python benchmarks/kernel_errors.py --device cpu --size 128 --out /tmp/e.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math

import torch

from tltrain import preprocess as P

SIGMAS = (0.3, 2.0, 8.53, 10.0, 17.0)  # the window's extremes, the default at 512 px (256/30), the issue's ~10


def grey_error(images: torch.Tensor, sigma: float, cfg: P.PreprocessConfig, **kernel_args) -> dict:
    """Max |kernel - float64 reference| in grey levels before normalisation, and how many pixels differ.

    images: (N, 3, H, W) uint8 on the kernel's device; the disc is centred with radius H/2. method=
    "torch_float32" measures the float32 torch reference (tltrain.preprocess) the same way."""
    from tltrain.kernels.ben_graham import ben_graham_triton

    h, w = images.shape[-2:]
    cfg = dataclasses.replace(cfg, sigma_ratio=sigma / (h / 2))
    if kernel_args.get("method") == "torch_float32":  # the torch reference itself, for comparison
        got = P.ben_graham_filter(images.float(), cfg).double().cpu()
    else:
        got = ben_graham_triton(images, (w / 2, h / 2), h / 2, sigma, cfg.gain, cfg.offset, cfg.mask_ratio,
                                out_dtype=torch.uint8, **kernel_args).double().cpu()
    want = P.ben_graham_filter(images.double().cpu(), cfg)
    diff = (got - want).abs()
    return {"max_grey_error": diff.max().item(), "pixels_off": int((diff > 0).sum()), "pixels": diff.numel()}


def run(device: str, batch: int, size: int, sigmas: tuple[float, ...], methods: tuple[str, ...]) -> dict:
    cfg = P.PreprocessConfig()
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (batch, 3, size, size), generator=gen, dtype=torch.uint8).to(device)
    rows = []
    for sigma in sigmas:
        if 2 * math.ceil(3 * sigma) + 1 > size:
            continue  # reflect-101 needs the window inside the image
        for method in methods:
            try:
                stats = grey_error(images, sigma, cfg, method=method)
            except Exception as error:  # e.g. the dot tile cannot hold this window: recorded, not fatal
                stats = {"error": f"{type(error).__name__}: {error}"[:300]}
            rows.append({"sigma": sigma, "taps": 2 * math.ceil(3 * sigma) + 1, "method": method, **stats})
            print(rows[-1], flush=True)
    return {"device": device, "batch": batch, "size": size, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--sigmas", type=float, nargs="+", default=SIGMAS)
    parser.add_argument("--methods", nargs="+", default=["direct", "dot", "torch_float32"],
                        choices=["direct", "dot", "torch_float32"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU (use --device cpu with TRITON_INTERPRET=1)")
    result = run(args.device, args.batch, args.size, tuple(args.sigmas), tuple(args.methods))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
