"""Ben Graham preprocessing throughput: the Triton kernels vs the torch reference vs DALI's blur chain, all in one
process on the same batch, with the device's copy bandwidth measured in the same run as the yardstick.

Minimal traffic per pixel is 3 B in (uint8 RGB) + 6 B out (fp16 RGB); achieved bandwidth = that / time, so the
ratio to copy bandwidth says how far a variant is from memory-bound.

Quiet rule (benchmarks/quiet.py): it waits up to --quiet-wait s for a quiet machine, times every variant and the copy
in turns (--rounds >= 3 rounds of --repeats calls each; images/s and bandwidth are the medians, `spread` beside
them), records the load and foreign CPU use in the JSON and exits 3 when the figure is refused, unless --smoke
(--small implies it: batch 2 of 48x48 is never a figure).

  GPU:   python benchmarks/bench_kernels.py --sweep --out benchmarks/results/kernels_h100.json
  smoke: TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --device cpu --small --out /tmp/k.json
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch

import quiet
from tltrain import preprocess as P

from kernel_errors import grey_error  # benchmarks/ is on sys.path when run as a script

BYTES_PER_PIXEL = 3 + 6  # uint8 RGB in, fp16 RGB out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _seconds_per_call(fn, device: str, repeats: int, warmup: int) -> float:
    for _ in range(warmup):  # first calls compile (Triton, DALI graph build, cuDNN algorithm choice)
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def copy_bandwidth(device: str, mib: int):
    """A measurement of the bytes read + written per second by a plain device-to-device copy (the practical memory
    ceiling): a function that times 10 copies, called once here as the warm-up."""
    src = torch.empty(mib * 2 ** 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    _seconds_per_call(lambda: dst.copy_(src), device, repeats=1, warmup=2)
    return lambda: 2 * src.numel() / _seconds_per_call(lambda: dst.copy_(src), device, repeats=10, warmup=0)


def dali_chain(batch_nhwc: torch.Tensor, cfg: P.PreprocessConfig, device: str):
    """The DALI loader's filter chain (tltrain/data/loaders/dali.py) fed one resident batch; None without DALI."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        return None
    from tltrain.data.loaders.dali import normalised_filter

    n, size = batch_nhwc.shape[0], batch_nhwc.shape[1]
    gpu = device == "cuda"
    feed = batch_nhwc if gpu else batch_nhwc.numpy()

    @pipeline_def(batch_size=n, num_threads=4, device_id=0 if gpu else None, prefetch_queue_depth=1)
    def pipe():
        images = fn.external_source(source=lambda: feed, batch=True, layout="HWC", device="gpu" if gpu else "cpu")
        x = fn.cast(images, dtype=types.FLOAT)
        # every pixel photo (uncut crops): profiles of ones
        x = normalised_filter(x, x[:, 0:1, 0:1] * 0.0 + 1.0, x[0:1, :, 0:1] * 0.0 + 1.0, cfg, size, gpu)
        return fn.crop_mirror_normalize(x, dtype=types.FLOAT16, output_layout="CHW",
                                        mean=[m * 255 for m in cfg.mean], std=[s * 255 for s in cfg.std])

    p = pipe()
    p.build()
    return p.run


def dot_tiles(half: int, sweep: bool, device: str) -> list[tuple[int, int, int]]:
    """(BLOCK, SPAN, num_warps) for the tensor-core kernel: the planner's choice, or every fitting one (--sweep)
    that this Triton can compile for this GPU."""
    from tltrain.kernels import blur_dot

    capability = torch.cuda.get_device_capability() if device == "cuda" else None
    chosen = blur_dot.choose_tile(half)
    if chosen is None:
        return []
    if not sweep:
        return [(*chosen, blur_dot.default_num_warps(chosen, capability))]
    return [(b, s, w) for s in blur_dot.SPANS for b in blur_dot.BLOCKS if b + 2 * half <= s for w in (4, 8)
            if not blur_dot.unsupported((b, s), w, capability)]


def run(device: str, batch: int, size: int, repeats: int, warmup: int, copy_mib: int, sweep: bool,
        rounds: int = quiet.MIN_REPEATS) -> dict:
    from tltrain.kernels.ben_graham import ben_graham_batch, ben_graham_triton

    cfg = P.PreprocessConfig()
    gen = torch.Generator().manual_seed(0)
    nhwc = torch.randint(0, 256, (batch, size, size, 3), generator=gen, dtype=torch.uint8).to(device)
    crops = nhwc.permute(0, 3, 1, 2).contiguous()
    side = size
    sigma = side / 2 * cfg.sigma_ratio
    half = math.ceil(3 * sigma)

    def nhwc_to_channels_last(method, **kw):
        return lambda: ben_graham_triton(nhwc, (side / 2, side / 2), side / 2, sigma, cfg.gain, cfg.offset,
                                         cfg.mask_ratio, cfg.mean, cfg.std, torch.float16, True, layout="NHWC",
                                         method=method, **kw)

    variants = {  # name -> (callable, kernel arguments for the error check; None = not a Triton kernel)
        "triton_direct": (lambda: ben_graham_batch(crops, cfg, "fp16", method="direct"), {"method": "direct"}),
        "triton_direct_nhwc_in_channels_last_out": (nhwc_to_channels_last("direct"), None),
    }
    for block, span, warps in dot_tiles(half, sweep, device):
        tuning = {"method": "dot", "tile": (block, span), "num_warps": warps}
        name = f"triton_dot_b{block}_s{span}_w{warps}"
        variants[name] = (lambda t=tuning: ben_graham_triton(
            crops, (side / 2, side / 2), side / 2, sigma, cfg.gain, cfg.offset, cfg.mask_ratio, cfg.mean, cfg.std,
            torch.float16, **t), tuning)
        variants[name + "_nhwc_in_channels_last_out"] = (nhwc_to_channels_last(**tuning), None)
    variants["torch_reference"] = (lambda: P.finish(crops, cfg, "fp16"), None)
    dali_run = dali_chain(nhwc.cpu() if device == "cpu" else nhwc, cfg, device)
    if dali_run is not None:
        variants["dali_" + ("gpu" if device == "cuda" else "cpu")] = (dali_run, None)

    copy = copy_bandwidth(device, copy_mib)
    results, timed = {}, {}
    for name, (fn, _) in variants.items():
        try:  # the warm-up: first calls compile (Triton, DALI graph build, cuDNN algorithm choice)
            _seconds_per_call(fn, device, repeats=1, warmup=max(warmup - 1, 0))
        except Exception as error:  # a tile that does not fit this GPU is a result too, not the end of the run
            results[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
            continue
        timed[name] = lambda fn=fn: batch / _seconds_per_call(fn, device, repeats, warmup=0)
    # the copy and every variant in turns, `rounds` times each (benchmarks/quiet.py): medians and spreads
    runs = quiet.interleaved({"copy": copy, **timed}, rounds)
    copy_bw = runs["copy"]["median"]
    for name in timed:
        images_per_s = runs[name]["median"]
        bandwidth = images_per_s * size * size * BYTES_PER_PIXEL
        results[name] = {"seconds_per_batch": batch / images_per_s, "images_per_s": images_per_s,
                         "spread": runs[name]["spread"], "images_per_s_values": runs[name]["values"],
                         "minimal_traffic_GB_per_s": bandwidth / 1e9, "fraction_of_copy_bandwidth": bandwidth / copy_bw}
        kernel_args = variants[name][1]
        if kernel_args is not None:
            stats = grey_error(crops[:2], sigma, cfg, **kernel_args)
            results[name].update(max_grey_error_vs_reference=stats["max_grey_error"],
                                 off_by_one_fraction=stats["pixels_off"] / stats["pixels"])
    results = {name: results[name] for name in variants}  # the variants' order, failed ones included
    reference = results["torch_reference"]["images_per_s"]
    for r in results.values():
        if "images_per_s" in r:
            r["speedup_vs_torch_reference"] = r["images_per_s"] / reference
    return {
        "device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "batch": batch, "size": size, "sigma": sigma, "taps": 2 * half + 1,
        "out_dtype": "fp16", "bytes_per_pixel": BYTES_PER_PIXEL, "copy_bandwidth_GB_per_s": copy_bw / 1e9,
        "copy_bandwidth_spread": runs["copy"]["spread"], "calls_per_timing": repeats,
        "rounds": len(runs["copy"]["values"]), "torch": torch.__version__, "triton": _triton_version(),
        "variants": results,
    }


def _triton_version() -> str:
    import triton

    return triton.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10, help="calls per timing")
    parser.add_argument("--rounds", type=int, default=quiet.MIN_REPEATS,
                        help="timings of each variant (and of the copy), in turns; the medians count")
    parser.add_argument("--small", action="store_true", help="batch 2 of 48x48, one call per timing: a seconds-long "
                        "smoke run (implies --smoke, and --quiet-wait 5 unless given)")
    parser.add_argument("--quiet-wait", type=float, default=None, help="seconds to wait for a quiet machine (300)")
    parser.add_argument("--smoke", action="store_true", help="a loaded machine does not fail the run (the JSON "
                        "still says the figure is not to be recorded): gpu_all's dry run, CI")
    parser.add_argument("--sweep", action="store_true", help="time every tensor-core tile that fits the window")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU (use --device cpu --small with TRITON_INTERPRET=1)")
    if args.small:
        args.batch, args.size, args.repeats, args.smoke = 2, 48, 1, True
    if args.quiet_wait is None:
        args.quiet_wait = 5 if args.small else 300
    watch = quiet.Watch().start(args.quiet_wait)
    result = run(args.device, args.batch, args.size, args.repeats, warmup=1 if args.small else 3,
                 copy_mib=16 if args.small else 1024, sweep=args.sweep, rounds=args.rounds)
    result.update(watch.verdict())
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"copy bandwidth {result['copy_bandwidth_GB_per_s']:.0f} GB/s, {result['taps']} taps")
    for name, r in result["variants"].items():
        if "error" in r:
            print(f"{name:48s} failed: {r['error']}")
            continue
        print(f"{name:48s} {r['images_per_s']:12,.0f} img/s  {r['minimal_traffic_GB_per_s']:8.1f} GB/s  "
              f"{100 * r['fraction_of_copy_bandwidth']:5.1f} % of copy  x{r['speedup_vs_torch_reference']:.1f}  "
              f"max err {r.get('max_grey_error_vs_reference', '-')}  spread {r['spread']}")
    if not result["recorded"]:
        print(f"not to be recorded: {result['refused']}")
        if not args.smoke:
            raise SystemExit(quiet.REFUSED_EXIT)


if __name__ == "__main__":
    main()
