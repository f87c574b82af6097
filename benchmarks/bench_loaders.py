"""Images per second of the loader backends over evaluation epochs, per source size, against a baseline in the
same process: plain PIL decode + resize in a torch DataLoader (what most training scripts do).

  CPU:  python benchmarks/bench_loaders.py --images 64 --sizes 512 2592 --out results/loaders_cpu.json
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

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tltrain.data.loaders import LoaderConfig, build_loader
from tltrain.data.loaders.plan import sample_refs, select_shards
from tltrain.data.prepare import PrepareConfig, run_prepare
from tltrain.data.sources import SourceConfig
from tltrain.data.synth import generate_eyepacs


class _PilBaseline(Dataset):
    """Decode with PIL and resize to the model size: no disc crop, no filter (a lower bound on work)."""

    def __init__(self, refs, size):
        self.refs, self.size = refs, size

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, i):
        ref = self.refs[i]
        offset, size, _ = ref.members["jpg"]
        with open(ref.tar, "rb") as f:
            f.seek(offset)
            img = Image.open(io.BytesIO(f.read(size))).convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        return torch.from_numpy(__import__("numpy").asarray(img).copy()).permute(2, 0, 1)


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
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2592], help="source widths (4:3)")
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
            baseline = DataLoader(_PilBaseline(refs, args.model_size), batch_size=args.batch, num_workers=args.workers)
            _rate(baseline, "cpu")  # warm-up (page cache)
            base = _rate(baseline, "cpu")
            row = {"source_width": width, "images": len(refs), "pil_dataloader_img_s": round(base, 1)}
            for backend in args.backends:
                cfg = LoaderConfig(backend=backend, batch_size=args.batch, size=args.model_size, workers=args.workers,
                                   dtype="fp16" if args.device == "cuda" else "fp32")
                loader = build_loader(cfg, shards, "train", train=False, device=args.device)
                _rate(loader, args.device)
                rate = _rate(loader, args.device)
                row[f"{backend}_img_s"] = round(rate, 1)
                row[f"{backend}_wait_fraction"] = round(loader.stats()["wait_fraction"], 3)
                row[f"{backend}_vs_pil"] = round(rate / base, 2)
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
