"""The `dali` backend: webdataset reader -> JPEG decode (nvJPEG 'mixed' on a GPU, CPU otherwise) -> disc crop
-> resize -> Ben Graham filter -> normalise, all inside one DALI pipeline; the same numbers as tltrain.preprocess.

Ranks read disjoint contiguous parts of the sample list (DALI's shard_id/num_shards, pad_last_batch); evaluation
pads each rank to the same batch count with valid=False rows, training drops the few samples that would make
counts differ (LastBatchPolicy.DROP). filter_kernel=triton/torch: DALI stops after decode + crop + resize and the
filter runs on the torch batch (the Triton kernel on CUDA, the torch reference on the CPU).
Limits, stated rather than faked: a sample that fails to decode stops the pipeline whatever on_decode_error says
(DALI's decoders cannot skip one); the error names the shards and points at `tltrain verify`, which finds the
damaged sample. Class-balanced sampling is not offered (the reader cannot weight samples; config rejects it).
"""
from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import torch

from tltrain.data.loaders.batch import Batch
from tltrain.data.loaders.config import LoaderConfig
from tltrain.data.loaders.filtering import finish_batch
from tltrain.data.loaders.plan import read_labels, sample_refs, select_shards
from tltrain.errors import DataError
from tltrain.preprocess import DTYPES, circle_mask


def fundus_pipeline(tars, indexes, cfg: LoaderConfig, *, train: bool, shard_id: int, num_shards: int, seed: int,
                    gpu: bool, filter_in_dali: bool):
    """The graph of one DALI pipeline (call inside a pipeline_def); returns (images, labels, source_info)."""
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    pre, aug, size = cfg.preprocess, cfg.augment, cfg.size
    jpegs, labels, discs = fn.readers.webdataset(
        paths=tars, index_paths=indexes, ext=["jpg;png", "lbl", "disc"], dtypes=[types.UINT8, types.INT32, types.FLOAT],
        shard_id=shard_id, num_shards=num_shards, random_shuffle=train, initial_fill=cfg.shuffle_buffer,
        pad_last_batch=True, seed=seed, name="reader")
    # One decoder for both image members: prepare stores only images whose bytes give the shared decoding
    # rule's pixels here (tltrain.data.decode); DALI applies EXIF orientation as the rule does.
    source_info = fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0)
    decode_args = {"hw_decoder_load": cfg.hw_decoder_load} if gpu else {}
    images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB, **decode_args)

    # The disc square (black outside the photo); training jitters its scale and centre.
    scale, shift_x, shift_y = 1.0, 0.0, 0.0
    if train:
        scale = fn.random.uniform(range=list(aug.crop_scale))
        shift_x = fn.random.uniform(range=[-1.0, 1.0]) * (1.0 - scale)
        shift_y = fn.random.uniform(range=[-1.0, 1.0]) * (1.0 - scale)
    cx, cy, r = discs[0], discs[1], discs[2]
    side = dmath.max(dmath.floor(2.0 * r * scale + 0.5), 2.0)
    x0 = dmath.floor(cx + shift_x * r - side / 2.0 + 0.5)
    y0 = dmath.floor(cy + shift_y * r - side / 2.0 + 0.5)
    images = fn.slice(images, fn.stack(y0, x0), fn.stack(side, side), axis_names="HW", normalized_anchor=False,
                      normalized_shape=False, out_of_bounds_policy="pad", fill_values=0)
    work = pre.work_size(size)  # 2R: the filter runs at the configured disc radius, then resizes to the model size
    images = fn.resize(images, size=[work, work], interp_type=types.INTERP_LINEAR, antialias=True)

    mirror = 0
    if train:
        if aug.rotate_deg:
            images = fn.rotate(images, angle=fn.random.uniform(range=[-aug.rotate_deg, aug.rotate_deg]),
                               keep_size=True, fill_value=0)
        if aug.vflip:
            images = fn.flip(images, horizontal=0, vertical=fn.random.coin_flip(probability=aug.vflip))
        images = fn.brightness_contrast(images, brightness=fn.random.uniform(range=[1 - aug.brightness, 1 + aug.brightness]),
                                        contrast=fn.random.uniform(range=[1 - aug.contrast, 1 + aug.contrast]))
        if aug.saturation:
            images = fn.saturation(images, saturation=fn.random.uniform(range=[1 - aug.saturation, 1 + aug.saturation]))
        mirror = fn.random.coin_flip(probability=aug.hflip)

    if not filter_in_dali:  # uint8 CHW crops at 2R; filter, resize, normalise in torch (Triton on CUDA)
        images = fn.flip(images, horizontal=mirror) if train else images
        return fn.transpose(images, perm=[2, 0, 1]), labels, source_info

    x = fn.cast(images, dtype=types.FLOAT)
    if pre.filter_on:  # out = round(clamp(4 img - 4 blur + 128)), then grey outside 0.9 R: tltrain.preprocess
        sigma = work / 2 * pre.sigma_ratio
        window = 2 * math.ceil(3 * sigma) + 1
        blurred = fn.gaussian_blur(x, sigma=sigma, window_size=window)
        x = dmath.floor(dmath.clamp(pre.gain * x - pre.gain * blurred + pre.offset, 0.0, 255.0) + 0.5)
        if pre.mask_ratio > 0:
            inside = circle_mask(work, pre.mask_ratio).numpy().astype(np.float32)[..., None]
            mask = types.Constant(inside, device="gpu" if gpu else "cpu")
            x = x * mask + pre.offset * (1.0 - mask)
    if work != size:
        x = fn.resize(x, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)
    images = fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", mirror=mirror,
                                      mean=[m * 255 for m in pre.mean], std=[s * 255 for s in pre.std])
    return images, labels, source_info


def _rank_counts(n_total: int, world: int) -> list[int]:
    """DALI's contiguous split: shard i holds samples [floor(N*i/K), floor(N*(i+1)/K))."""
    return [n_total * (i + 1) // world - n_total * i // world for i in range(world)]


class DaliLoader:
    def __init__(self, cfg: LoaderConfig, shard_dir, split: str, *, train: bool, rank: int = 0, world_size: int = 1,
                 device: str = "cpu", seed: int = 0, fraction: float | None = None):
        from nvidia.dali import pipeline_def
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.cfg, self.train, self.rank, self.world_size = cfg, train, rank, world_size
        self.device = torch.device(device)
        gpu = cfg.dali_device == "gpu" or (cfg.dali_device == "auto" and self.device.type == "cuda")
        self.manifest, shards = select_shards(shard_dir, split, fraction)
        refs = sample_refs(shard_dir, shards)
        self.num_classes = int(self.manifest["num_classes"])
        self.class_counts = np.bincount(read_labels(refs), minlength=self.num_classes).tolist()
        self.batch_size = cfg.batch_size
        counts = _rank_counts(len(refs), world_size)
        if train:
            self.n_batches = min(counts) // cfg.batch_size
            if self.n_batches < 1:
                raise DataError(f"{shard_dir}: {len(refs)} training samples cannot fill one batch of "
                                f"{cfg.batch_size} on each of {world_size} ranks; lower loader.batch_size")
        else:
            self.n_batches = max(1, math.ceil(max(counts) / cfg.batch_size))
        self.filter_in_dali = cfg.filter_kernel in ("auto", "dali") or not cfg.preprocess.filter_on
        tars = [str(Path(shard_dir) / s["tar"]) for s in shards]
        indexes = [t[:-4] + ".idx" for t in tars]
        self.shard_names = [s["tar"] for s in shards]

        @pipeline_def(batch_size=cfg.batch_size, num_threads=max(1, cfg.workers),
                      device_id=(self.device.index or 0) if gpu else None, seed=seed + 7919 * rank,
                      prefetch_queue_depth=2)
        def pipeline():
            return fundus_pipeline(tars, indexes, cfg, train=train, shard_id=rank, num_shards=world_size,
                                   seed=seed, gpu=gpu, filter_in_dali=self.filter_in_dali)

        self.pipe = pipeline()
        policy = LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL
        try:
            self.pipe.build()
            self.iterator = DALIGenericIterator([self.pipe], ["images", "labels", "info"], reader_name="reader",
                                                last_batch_policy=policy, auto_reset=True)
        except RuntimeError as exc:
            raise DataError(f"DALI pipeline over {', '.join(self.shard_names)} failed ({dali_reason(exc)}); run `tltrain verify` "
                            "on the shard folder to find a damaged sample") from None
        self._images, self._seconds, self._wait = 0, 0.0, 0.0

    def __len__(self) -> int:
        return self.n_batches

    def set_epoch(self, epoch: int) -> None:
        """DALI reshuffles by itself from epoch to epoch (seeded); nothing to do."""

    def stats(self) -> dict:
        return {"images_per_s": self._images / self._seconds if self._seconds else 0.0,
                "wait_fraction": self._wait / self._seconds if self._seconds else 0.0}

    @staticmethod
    def _keys(info: torch.Tensor) -> list[str]:
        """source_info is 'shard.tar:offset:key.jpg' as padded bytes -> the sample keys."""
        rows = info.cpu().numpy().astype(np.uint8)
        return [bytes(row).rstrip(b"\0").decode().rsplit(":", 1)[-1].rsplit(".", 1)[0] for row in rows]

    def _to_batch(self, data: dict) -> Batch:
        images = data["images"]
        if not self.filter_in_dali:
            images = finish_batch(images.to(self.device), self.cfg.preprocess, size=self.cfg.size,
                                  dtype=self.cfg.dtype, channels_last=self.cfg.channels_last,
                                  filter_kernel=self.cfg.filter_kernel)
        images = images.to(self.device, DTYPES[self.cfg.dtype], non_blocking=True)
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = data["labels"].reshape(-1).to(self.device, torch.int64)
        keys = self._keys(data["info"])
        valid = torch.ones(len(keys), dtype=torch.bool, device=self.device)
        missing = self.batch_size - len(keys)
        if missing > 0:  # the last, partial batch of an evaluation epoch: pad to full size, flagged invalid
            images = torch.cat([images, images[-1:].expand(missing, *images.shape[1:])]) if len(keys) else \
                torch.zeros((missing, 3, self.cfg.size, self.cfg.size), dtype=images.dtype, device=self.device)
            labels = torch.cat([labels, torch.zeros(missing, dtype=torch.int64, device=self.device)])
            valid = torch.cat([valid, torch.zeros(missing, dtype=torch.bool, device=self.device)])
            keys = keys + [""] * missing
        return Batch(images, labels, keys, valid)

    def __iter__(self):
        started = last = time.perf_counter()
        produced = 0
        try:
            for data in self.iterator:
                now = time.perf_counter()
                self._wait += now - last
                if produced < self.n_batches:
                    batch = self._to_batch(data[0])
                    yield batch
                    produced += 1
                    self._images += int(batch.valid.sum())
                last = time.perf_counter()
        except RuntimeError as exc:
            raise DataError(f"DALI could not read or decode a sample in {', '.join(self.shard_names)} "
                            f"({dali_reason(exc)}); "
                            "run `tltrain verify` on the shard folder to find it") from None
        while produced < self.n_batches:  # a rank with fewer samples: all-padding batches keep ranks in step
            empty = {"images": torch.zeros((0, 3, self.cfg.size, self.cfg.size)), "labels": torch.zeros(0),
                     "info": torch.zeros((0, 1), dtype=torch.uint8)}
            yield self._to_batch(empty)
            produced += 1
        self._seconds += time.perf_counter() - started


def dali_reason(exc: BaseException) -> str:
    """The one informative line of a DALI error (its text carries a Python traceback and C++ context)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "encountered:" in lines:
        lines = lines[lines.index("encountered:") + 1:]
    for line in lines:
        if not line.startswith(("Critical error", "Error in ", "which was used", "File ", "C++ context", "Current pipeline")):
            return re.sub(r'^Assert on ".*?" failed: ', "", line)
    return lines[0] if lines else type(exc).__name__
