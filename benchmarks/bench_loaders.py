"""Images per second of the loader backends over evaluation epochs, per source size, against two baselines run
in the same process with the same DataLoader workers and batch size:
- `handwritten`: what users write by hand today for Ben Graham preprocessing (the issue-13 reference): PIL
  decode, OpenCV crop to the retina's bounding box (grey > 7), cv2.resize to the model size, cv2.GaussianBlur
  + cv2.addWeighted(4, -4, 128), circle mask at 0.9 R, normalise. Ratios `*_vs_handwritten` are against it.
- `pil`: PIL decode + resize only (no crop, no filter): a lower bound on work.
The tltrain backends run their defaults, i.e. the exact shared definition (full-size decode, no draft).
Needs OpenCV for the handwritten baseline: `pip install -e .[bench]` (opencv-python-headless).

  CPU:  python benchmarks/bench_loaders.py --images 32 --sizes 2592 --model-size 512 --out results/loaders_cpu.json
  GPU:  python benchmarks/bench_loaders.py --device cuda --images 2048 --batch 256 --workers 16 --out ...
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import quiet

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tltrain.data.loaders import LoaderConfig, build_loader
from tltrain.data.loaders.plan import sample_refs, select_shards
from tltrain.data.prepare import PrepareConfig, run_prepare
from tltrain.data.sources import SourceConfig
from tltrain.data.synth import generate_eyepacs


def _read_image(ref) -> bytes:
    ext = "jpg" if "jpg" in ref.members else "png"
    offset, size, _ = ref.members[ext]
    with open(ref.tar, "rb") as f:
        f.seek(offset)
        return f.read(size)


class _PilBaseline(Dataset):
    """Decode with PIL and resize to the model size: no disc crop, no filter (a lower bound on work)."""

    def __init__(self, refs, size):
        self.refs, self.size = refs, size

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, i):
        img = Image.open(io.BytesIO(_read_image(self.refs[i]))).convert("RGB").resize((self.size, self.size),
                                                                                      Image.BILINEAR)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


class HandwrittenBenGraham(Dataset):
    """Ben Graham's recipe as users write it with OpenCV (Kaggle DR 2015 and the APTOS kernels that copied it):
    crop to the bounding box of grey > 7, resize to size x size (INTER_AREA), 4*img - 4*GaussianBlur(sigma =
    radius / 30) + 128 with cv2.addWeighted (saturating uint8), grey outside 0.9 R, then mean/std normalise."""

    def __init__(self, refs, size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        import cv2

        self.cv2, self.refs, self.size = cv2, refs, size
        self.mean = torch.tensor(mean).view(3, 1, 1) * 255
        self.std = torch.tensor(std).view(3, 1, 1) * 255
        self.mask = np.zeros((size, size, 3), np.uint8)
        cv2.circle(self.mask, (size // 2, size // 2), int(size / 2 * 0.9), (1, 1, 1), -1, 8, 0)

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, i):
        cv2 = self.cv2
        img = np.asarray(Image.open(io.BytesIO(_read_image(self.refs[i]))).convert("RGB"))
        grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        inside = grey > 7
        rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
        if rows.size and cols.size:
            img = img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        img = cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA)
        img = cv2.addWeighted(img, 4, cv2.GaussianBlur(img, (0, 0), self.size / 2 / 30), -4, 128)
        img = img * self.mask + 128 * (1 - self.mask)
        x = torch.from_numpy(img).permute(2, 0, 1).float()
        return (x - self.mean) / self.std


def _ms(fn, repeat: int = 5) -> float:
    """Fastest of `repeat` calls in ms: on a shared machine the minimum is the least disturbed figure."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def stage_profile(refs, size: int) -> dict:
    """Milliseconds per image of each stage, one thread, on the first sample: where the time goes.
    DALI's stages are cumulative pipelines (decode; + crop/resize; + blur; whole graph) on 2 threads, per image."""
    import cv2

    from tltrain import preprocess as P
    from tltrain.data.decode import decode_rgb

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    data = _read_image(refs[0])
    pixels = decode_rgb(data)
    with open(refs[0].tar, "rb") as f:
        offset, length, _ = refs[0].members["disc"]
        f.seek(offset)
        disc = np.frombuffer(f.read(length), "<f4").tolist()
    cfg = P.PreprocessConfig()
    image = torch.from_numpy(pixels)
    x0, y0, side = P.disc_box(disc, image.shape[1], image.shape[0])
    square = P.crop_square(image, x0, y0, side)
    crop = P.crop_resize_box(image, x0, y0, side, size)
    grey = P.grey_levels(crop[None], cfg)
    decode_ms = _ms(lambda: decode_rgb(data))
    out = {"decode (PIL, tltrain.data.decode)": decode_ms,
           "kernel: crop + antialiased resize (tltrain.preprocess_cpu)": _ms(
               lambda: P.crop_resize_box(image, x0, y0, side, size)),
           "kernel: filter + mask (uint8 grey levels)": _ms(lambda: P.grey_levels(crop[None], cfg)),
           "kernel: normalise (table)": _ms(lambda: P.normalise(grey, cfg)),
           "torch code: crop disc square": _ms(lambda: P.crop_square(image, x0, y0, side)),
           "torch code: antialiased resize (float)": _ms(lambda: P.resize_square(square, size)),
           "torch code: filter + mask + normalise": _ms(lambda: P.finish(crop[None], cfg, kernel="torch"))}
    after_decode = sum(v for k, v in out.items() if k.startswith("kernel"))
    out["kernel: all after decode, as a share of decode"] = after_decode / decode_ms
    hand = HandwrittenBenGraham(refs[:1], size)
    grey_box = None

    def bbox():
        nonlocal grey_box
        inside = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY) > 7
        rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
        grey_box = pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]

    out["handwritten: bounding-box crop"] = _ms(bbox)
    out["handwritten: cv2.resize INTER_AREA"] = _ms(lambda: cv2.resize(grey_box, (size, size),
                                                                        interpolation=cv2.INTER_AREA))
    small = cv2.resize(grey_box, (size, size), interpolation=cv2.INTER_AREA)
    out["handwritten: GaussianBlur + addWeighted"] = _ms(
        lambda: cv2.addWeighted(small, 4, cv2.GaussianBlur(small, (0, 0), size / 60), -4, 128))
    out["handwritten: whole __getitem__"] = _ms(lambda: hand[0])
    out.update(_dali_stages(data, disc, size, cfg))
    return {k: round(v, 2) for k, v in out.items()}


def _dali_stages(data: bytes, disc, size: int, cfg) -> dict:
    """DALI CPU graphs cut after each stage, batch 8 of one image, 2 threads: cumulative ms per image."""
    import math

    import nvidia.dali.math as dmath
    from nvidia.dali import fn, pipeline_def, types

    from tltrain import preprocess as P

    blobs, discs = [np.frombuffer(data, np.uint8)] * 8, [np.asarray(disc, np.float32)] * 8
    out = {}
    for stage in ("decode", "+ crop + resize", "+ blur", "+ 4x-4blur+128, mask, normalise"):
        @pipeline_def(batch_size=8, num_threads=2, device_id=None, prefetch_queue_depth=1)
        def pipe():
            images = fn.decoders.image(fn.external_source(source=lambda: blobs, batch=True), device="cpu",
                                       output_type=types.RGB)
            if stage == "decode":
                return images
            d = fn.external_source(source=lambda: discs, batch=True)
            side = dmath.max(dmath.floor(2.0 * d[2] + 0.5), 2.0)
            anchor = fn.stack(dmath.floor(d[1] - side / 2.0 + 0.5), dmath.floor(d[0] - side / 2.0 + 0.5))
            images = fn.slice(images, anchor, fn.stack(side, side), axis_names="HW", normalized_anchor=False,
                              normalized_shape=False, out_of_bounds_policy="pad", fill_values=0)
            images = fn.resize(images, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)
            if stage == "+ crop + resize":
                return images
            x = fn.cast(images, dtype=types.FLOAT)
            sigma = size / 2 * cfg.sigma_ratio
            blurred = fn.gaussian_blur(x, sigma=sigma, window_size=2 * math.ceil(3 * sigma) + 1)
            if stage == "+ blur":
                return blurred
            x = dmath.floor(dmath.clamp(4.0 * x - 4.0 * blurred + 128.0, 0.0, 255.0) + 0.5)
            mask = types.Constant(P.circle_mask(size, cfg.mask_ratio).numpy().astype(np.float32)[..., None],
                                  device="cpu")
            x = x * mask + 128.0 * (1.0 - mask)
            return fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", mean=[124.0] * 3,
                                            std=[58.0] * 3)

        pipeline = pipe()
        pipeline.build()
        out[f"dali cpu: {stage}"] = _ms(pipeline.run, repeat=3) / 8
    return out


def _rate(loader, device) -> float:
    count, t = 0, time.perf_counter()
    for batch in loader:
        images = batch.images if hasattr(batch, "images") else batch
        if device == "cuda":
            torch.cuda.synchronize()
        count += images.shape[0]
    return count / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2592], help="source widths (4:3)")
    parser.add_argument("--model-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", nargs="+", default=["torch", "dali"])
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per loader, in turns; medians count")
    parser.add_argument("--resize", default="none", help="prepare's resize for the shards (none, radius:300, ...)")
    quiet.add_arguments(parser)
    parser.add_argument("--stages", action="store_true", help="also time each stage per image (where time goes)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_loaders_"))
    watch = quiet.Watch().start(args.quiet_wait)
    report = {"benchmark": "loaders", "device": args.device, "machine": platform.machine(),
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "results": []}
    try:
        for width in args.sizes:
            raw, shards = work / f"raw{width}", work / f"shards{width}"
            generate_eyepacs(raw, n_patients=args.images // 2, width=width, seed=0, min_per_class=2, progress=False)
            run_prepare(PrepareConfig(source=SourceConfig(kind="eyepacs", root=str(raw)), out=str(shards),
                                      val_fraction=0.0, test_fraction=0.0, progress=False, resize=args.resize))
            _, shard_list = select_shards(shards, "train")
            refs = sample_refs(shards, shard_list)
            row = {"source_width": width, "resize": args.resize, "images": len(refs),
                   "model_size": args.model_size, "workers": args.workers, "batch": args.batch}
            loaders = {name: (DataLoader(dataset, batch_size=args.batch, num_workers=args.workers), "cpu")
                       for name, dataset in (("pil", _PilBaseline(refs, args.model_size)),
                                             ("handwritten", HandwrittenBenGraham(refs, args.model_size)))}
            for backend in args.backends:
                cfg = LoaderConfig(backend=backend, batch_size=args.batch, size=args.model_size, workers=args.workers,
                                   dtype="fp16" if args.device == "cuda" else "fp32")
                loaders[backend] = (build_loader(cfg, shards, "train", train=False, device=args.device), args.device)
            for loader, device in loaders.values():
                _rate(loader, device)  # warm-up (page cache, worker start)
            # every loader in turns, args.repeats epochs each (benchmarks/quiet.py): a slow moment hits them alike
            runs = quiet.interleaved({name: (lambda pair=pair: _rate(*pair)) for name, pair in loaders.items()},
                                     args.repeats)
            base = runs["handwritten"]["median"]
            for name, run in runs.items():
                row[f"{name}_img_s"] = round(run["median"], 1)
                row[f"{name}_spread"] = run["spread"]
            for backend in args.backends:
                row[f"{backend}_wait_fraction"] = round(loaders[backend][0].stats()["wait_fraction"], 3)
                row[f"{backend}_vs_handwritten"] = round(runs[backend]["median"] / base, 2)
                # the ratio within each round (epochs taken back to back): steadier than the ratio of medians when
                # the machine's speed drifts between rounds (this VM: 20 % between runs with nothing else on it)
                per_round = [b / h for b, h in zip(runs[backend]["values"], runs["handwritten"]["values"])]
                row[f"{backend}_vs_handwritten_per_round"] = [round(v, 2) for v in per_round]
                row[f"{backend}_vs_handwritten_round_median"] = round(statistics.median(per_round), 2)
            if args.stages:
                row["stages_ms_per_image"] = stage_profile(refs, args.model_size)
            report["results"].append(row)
            print(json.dumps(row), flush=True)
        report.update(watch.verdict())
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
