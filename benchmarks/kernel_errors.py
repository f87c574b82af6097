"""Error of the Triton Ben Graham kernels against the exact float64 definition, across sigmas and methods.

The issue's bound is at most 1 grey level before normalisation (after the x4 gain). Both kernels accumulate in
float32, so a pixel whose exact value lies within ~1e-5 of a .5 rounding boundary may round the other way; this
counts how often that happens on random uint8 images (the worst case for cancellation: full-range noise).
Each sigma is measured on the whole square (every pixel photo) and on a square cut at the top and bottom
(rows farther than 0.8 R from the centre are outside the photo, the edge rows partly photo): the normalised masked
blur of definition version 2 (tltrain.preprocess), with the valid profiles the loaders pass.
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


def cut_profiles(n: int, size: int) -> torch.Tensor:
    """(n, 2, size) valid profiles of a square whose photo is cut at |y - c| > 0.8 R, the cut rows' edge pixels
    partly photo (what a resize of the photo's indicator gives)."""
    centre = torch.arange(size, dtype=torch.float64) + 0.5 - size / 2
    vy = (0.8 * size / 2 + 0.5 - centre.abs()).clamp(0, 1)  # 1 inside, a fractional pixel at each edge, 0 beyond
    return torch.stack([vy, torch.ones(size, dtype=torch.float64)]).float().expand(n, 2, size).contiguous()


def grey_error(images: torch.Tensor, sigma: float, cfg: P.PreprocessConfig, valid=None, **kernel_args) -> dict:
    """Max |kernel - float64 reference| in grey levels before normalisation, and how many pixels differ.

    images: (N, 3, H, W) uint8 on the kernel's device; the disc is centred with radius H/2; valid: (N, 2, H)
    profiles or None. method="torch_float32" measures the float32 torch reference (tltrain.preprocess)."""
    from tltrain.kernels.ben_graham import ben_graham_triton

    h, w = images.shape[-2:]
    cfg = dataclasses.replace(cfg, sigma_ratio=sigma / (h / 2))
    if kernel_args.get("method") == "torch_float32":  # the torch reference itself, for comparison
        got = P.ben_graham_filter(images.float(), cfg, valid).double().cpu()
    else:
        pair = None if valid is None else (valid[:, 0].to(images.device), valid[:, 1].to(images.device))
        got = ben_graham_triton(images, (w / 2, h / 2), h / 2, sigma, cfg.gain, cfg.offset, cfg.mask_ratio,
                                out_dtype=torch.uint8, valid=pair, **kernel_args).double().cpu()
    want = P.ben_graham_filter(images.double().cpu(), cfg, None if valid is None else valid.cpu())
    diff = (got - want).abs()
    return {"max_grey_error": diff.max().item(), "pixels_off": int((diff > 0).sum()), "pixels": diff.numel()}


def run(device: str, batch: int, size: int, sigmas: tuple[float, ...], methods: tuple[str, ...]) -> dict:
    cfg = P.PreprocessConfig()
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (batch, 3, size, size), generator=gen, dtype=torch.uint8)
    valid = cut_profiles(batch, size)
    weight = (valid[:, 0, :, None] * valid[:, 1, None, :]).unsqueeze(1)
    cut_images = (images * weight).round().to(torch.uint8).to(device)  # black outside the photo, like a crop
    images = images.to(device)
    rows = []
    for sigma in sigmas:
        if 2 * math.ceil(3 * sigma) + 1 > size:
            continue  # the window must fit the image
        for photo, pixels, profiles in (("whole", images, None), ("cut_top_bottom", cut_images, valid)):
            for method in methods:
                try:
                    stats = grey_error(pixels, sigma, cfg, profiles, method=method)
                except Exception as error:  # e.g. the dot tile cannot hold this window: recorded, not fatal
                    stats = {"error": f"{type(error).__name__}: {error}"[:300]}
                rows.append({"sigma": sigma, "taps": 2 * math.ceil(3 * sigma) + 1, "photo": photo,
                             "method": method, **stats})
                print(rows[-1], flush=True)
    return {"device": device, "batch": batch, "size": size, "filter_version": P.FILTER_VERSION, "rows": rows}


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
