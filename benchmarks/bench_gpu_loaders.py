"""Part c of gpu_all.sh: the DALI backend with the full Ben Graham preprocessing against a plain DALI
decode + resize chain and a PIL DataLoader, in the same process, on 512 px and 2592x1944 JPEG shards.

Goal: the full preprocessing at >= 1.0x the plain chain (the disc crop, blur and mask ride along for free).
Quiet rule (benchmarks/quiet.py): it waits up to --quiet-wait s for a quiet machine, times the three loaders in turns
(--repeats >= 3 rounds; a round is one untimed pass, which also spends what a DALI pipeline prefetched while the
others ran, then --epochs timed passes), reports the medians with *_spread beside them, records the load in the JSON
and exits 3 when the figures are refused, unless --smoke.
  GPU:  python benchmarks/bench_gpu_loaders.py --device cuda --images 1024 --batch 256 --workers 16 --out X.json
  CPU:  python benchmarks/bench_gpu_loaders.py --device cpu --images 16 --sources 256 --model-size 64 --batch 8
"""
from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import quiet
from gpu_common import provenance, synthetic_shards, write_json
from tltrain.data.loaders import LoaderConfig, build_loader
from tltrain.data.loaders.plan import sample_refs, select_shards


class PilResize(Dataset):
    """What most training scripts do: PIL decode, resize to the model size, no disc crop or filter."""

    def __init__(self, refs, size):
        self.refs, self.size = refs, size

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, i):
        ref = self.refs[i]
        offset, length, _ = ref.members["jpg"]
        with open(ref.tar, "rb") as f:
            f.seek(offset)
            img = Image.open(io.BytesIO(f.read(length))).convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def plain_dali_chain(shards: Path, size: int, batch: int, workers: int, gpu: bool):
    """webdataset reader -> decode -> resize -> normalize to fp16 CHW: the plain DALI chain, nothing fundus-specific."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    _, shard_list = select_shards(shards, "train")
    tars = [str(shards / s["tar"]) for s in shard_list]
    indexes = [str(shards / s["index"]) for s in shard_list]

    @pipeline_def(batch_size=batch, num_threads=workers, device_id=0 if gpu else None, prefetch_queue_depth=2)
    def pipe():
        jpegs, labels = fn.readers.webdataset(paths=tars, index_paths=indexes, ext=["jpg", "lbl"],
                                              dtypes=[types.UINT8, types.INT32], pad_last_batch=True, name="reader")
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        images = fn.resize(images, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT16, output_layout="CHW",
                                          mean=[0.485 * 255, 0.456 * 255, 0.406 * 255],
                                          std=[0.229 * 255, 0.224 * 255, 0.225 * 255])
        return images, labels

    p = pipe()
    p.build()
    return DALIGenericIterator([p], ["images", "labels"], reader_name="reader",
                               last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)


def rate(loader, device: str, epochs: int = 1) -> float:
    """Images/s over `epochs` full passes after one warm-up pass (page cache, decoder start-up, and the batches a
    pipeline prefetched while another loader was timed)."""
    def one_pass():
        count = 0
        for item in loader:
            images = item.images if hasattr(item, "images") else (item[0]["images"] if isinstance(item, list) else item)
            count += images.shape[0]
        if device == "cuda":
            torch.cuda.synchronize()
        return count

    one_pass()
    start, count = time.perf_counter(), 0
    for _ in range(epochs):
        count += one_pass()
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--sources", type=int, nargs="+", default=[512, 2592], help="source widths (4:3)")
    parser.add_argument("--model-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1, help="timed passes per round (after one untimed pass)")
    parser.add_argument("--repeats", type=int, default=quiet.MIN_REPEATS, help="rounds of each loader, in turns")
    quiet.add_arguments(parser)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_loaders_"))
    report = {"benchmark": "gpu_loaders", **provenance(args.device), "goal": "dali_full_vs_plain >= 1.0",
              "model_size": args.model_size, "batch": args.batch, "workers": args.workers,
              "repeats": max(args.repeats, quiet.MIN_REPEATS), "epochs_per_round": args.epochs, "results": []}
    watch = quiet.Watch().start(args.quiet_wait)
    try:
        for width in args.sources:
            shards = synthetic_shards(work, args.images, width)
            _, shard_list = select_shards(shards, "train")
            refs = sample_refs(shards, shard_list)
            row = {"source": f"{width}x{width * 3 // 4}", "images": len(refs)}
            cfg = LoaderConfig(backend="dali", batch_size=args.batch, size=args.model_size, workers=args.workers,
                               dtype="fp16" if gpu else "fp32")
            loaders = {
                "pil_dataloader": (DataLoader(PilResize(refs, args.model_size), batch_size=args.batch,
                                              num_workers=args.workers), "cpu"),
                "dali_plain": (plain_dali_chain(shards, args.model_size, args.batch, args.workers, gpu), args.device),
                "dali_full": (build_loader(cfg, shards, "train", train=False, device=args.device), args.device)}
            # the three loaders in turns, args.repeats rounds each (benchmarks/quiet.py): medians and spreads
            runs = quiet.interleaved({name: (lambda pair=pair: rate(*pair, args.epochs))
                                      for name, pair in loaders.items()}, args.repeats)
            for name, run in runs.items():
                row[f"{name}_img_s"] = round(run["median"], 1)
                row[f"{name}_spread"] = run["spread"]
            row["dali_full_vs_plain"] = round(row["dali_full_img_s"] / row["dali_plain_img_s"], 3)
            row["dali_full_vs_pil"] = round(row["dali_full_img_s"] / row["pil_dataloader_img_s"], 3)
            report["results"].append(row)
            write_json(args.out, {**report, "status": "partial"}, echo=False)
            print(row, flush=True)
        report["status"] = "ok"
        report.update(watch.verdict())
        write_json(args.out, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not report["recorded"] and not args.smoke:
        raise SystemExit(quiet.REFUSED_EXIT)


if __name__ == "__main__":
    main()
