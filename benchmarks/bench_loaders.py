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
import tempfile
import time
from pathlib import Path

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
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_loaders_"))
    report = {"benchmark": "loaders", "device": args.device, "machine": platform.machine(),
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "results": []}
    try:
        for width in args.sizes:
            raw, shards = work / f"raw{width}", work / f"shards{width}"
            generate_eyepacs(raw, n_patients=args.images // 2, width=width, seed=0, min_per_class=2, progress=False)
            run_prepare(PrepareConfig(source=SourceConfig(kind="eyepacs", root=str(raw)), out=str(shards),
                                      val_fraction=0.0, test_fraction=0.0, progress=False))
            _, shard_list = select_shards(shards, "train")
            refs = sample_refs(shards, shard_list)
            row = {"source_width": width, "images": len(refs), "model_size": args.model_size,
                   "workers": args.workers, "batch": args.batch}
            for name, dataset in (("pil", _PilBaseline(refs, args.model_size)),
                                  ("handwritten", HandwrittenBenGraham(refs, args.model_size))):
                baseline = DataLoader(dataset, batch_size=args.batch, num_workers=args.workers)
                _rate(baseline, "cpu")  # warm-up (page cache, worker start)
                row[f"{name}_img_s"] = round(_rate(baseline, "cpu"), 1)
            base = row["handwritten_img_s"]
            for backend in args.backends:
                cfg = LoaderConfig(backend=backend, batch_size=args.batch, size=args.model_size, workers=args.workers,
                                   dtype="fp16" if args.device == "cuda" else "fp32")
                loader = build_loader(cfg, shards, "train", train=False, device=args.device)
                _rate(loader, args.device)
                rate = _rate(loader, args.device)
                row[f"{backend}_img_s"] = round(rate, 1)
                row[f"{backend}_wait_fraction"] = round(loader.stats()["wait_fraction"], 3)
                row[f"{backend}_vs_handwritten"] = round(rate / base, 2)
            report["results"].append(row)
            print(json.dumps(row), flush=True)
        print(json.dumps(report, indent=1))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
