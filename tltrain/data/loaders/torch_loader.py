"""The `torch` backend: PIL decoding in DataLoader workers, the Ben Graham filter on the GPU when there is one.

Samples are read by offset through the DALI index files rather than streamed, because exact-once evaluation
per rank, equal batch counts and class-balanced draws all need to address individual samples (plan.py); the
tar layout stays plain WebDataset, readable by the webdataset library (the tests read it back that way).
Workers decode, crop to the disc, resize and augment (uint8); the filter and normalisation run on the batch in
the main process on CUDA (Triton kernel or torch), or in the workers when the device is the CPU.
"""
from __future__ import annotations

import io
import logging
import math
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tltrain import preprocess as P
from tltrain.data.disc import estimate_disc
from tltrain.data.loaders.batch import Batch
from tltrain.data.loaders.config import LoaderConfig
from tltrain.data.loaders.plan import eval_slots, read_labels, sample_refs, select_shards, train_slots
from tltrain.errors import DataError

log = logging.getLogger(__name__)


def _decode(data: bytes, disc, size: int, draft: bool) -> tuple[np.ndarray, tuple]:
    """Decode to RGB; with draft, libjpeg scales down by 2/4/8 while the disc square stays >= size px."""
    img = Image.open(io.BytesIO(data))
    factor = 1.0
    if draft and img.format == "JPEG" and disc is not None:
        w, h = img.size
        keep = max(size / max(2 * disc[2], 1.0), 1e-3)
        img.draft("RGB", (max(1, int(math.ceil(w * keep))), max(1, int(math.ceil(h * keep)))))
        factor = img.size[0] / w
    img = img.convert("RGB")
    array = np.array(img)  # writable: torch warns on read-only buffers
    if disc is None:
        disc = estimate_disc(array)
        factor = 1.0
    return array, tuple(v * factor for v in disc)


class _ShardSamples(Dataset):
    """Index-addressed samples of one rank's epoch: slot i -> (uint8 crop, label, key, valid, error)."""

    def __init__(self, refs, slots, valid, cfg: LoaderConfig, train: bool, seed: int, epoch: int):
        self.refs, self.slots, self.valid = refs, slots, valid
        self.cfg, self.train, self.seed, self.epoch = cfg, train, seed, epoch
        self._files: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.slots)

    def _read(self, ref, ext: str) -> bytes:
        f = self._files.get(ref.tar)
        if f is None:
            f = self._files[ref.tar] = open(ref.tar, "rb")
        offset, size, _ = ref.members[ext]
        f.seek(offset)
        return f.read(size)

    def _geometry(self, rng: np.random.Generator):
        a = self.cfg.augment
        scale = rng.uniform(*a.crop_scale)
        room = 1 - scale
        return scale, (rng.uniform(-room, room), rng.uniform(-room, room))

    def __getitem__(self, slot: int):
        ref = self.refs[self.slots[slot]]
        label = int.from_bytes(self._read(ref, "lbl"), "little", signed=True)
        valid = bool(self.valid[slot])
        try:
            disc = np.frombuffer(self._read(ref, "disc"), "<f4").tolist() if "disc" in ref.members else None
            image, disc = _decode(self._read(ref, "jpg"), disc, self.cfg.size, self.cfg.draft_decode)
        except Exception as exc:  # a corrupt member: never silently shift labels, never crash the epoch unasked
            message = f"{ref.tar}:{ref.key}: cannot decode ({type(exc).__name__}: {exc})"
            if self.cfg.on_decode_error == "fail":
                raise DataError(message) from None
            crop = torch.zeros((3, self.cfg.size, self.cfg.size), dtype=torch.uint8)
            return crop, label, ref.key, False, message
        image = torch.from_numpy(image)
        pre = self.cfg.preprocess
        if self.train:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, slot, 0xA06]))
            scale, shift = self._geometry(rng)
            x0, y0, side = P.disc_box(disc, image.shape[1], image.shape[0], pre.crop_to_disc, scale, shift)
            crop = P.resize_square(P.crop_square(image, x0, y0, side), self.cfg.size)
            crop = _augment(crop, self.cfg.augment, rng)
        else:
            crop = P.crop_resize(image, disc, self.cfg.size, pre)
        return crop, label, ref.key, valid, None


def _augment(crop: torch.Tensor, a, rng: np.random.Generator) -> torch.Tensor:
    """Flips, rotation about the disc centre, brightness/contrast/saturation jitter on a (3, S, S) uint8 crop."""
    from torchvision.transforms.v2 import functional as TF

    if rng.uniform() < a.hflip:
        crop = crop.flip(-1)
    if rng.uniform() < a.vflip:
        crop = crop.flip(-2)
    if a.rotate_deg:
        crop = TF.rotate(crop, float(rng.uniform(-a.rotate_deg, a.rotate_deg)), fill=0)
    if a.brightness:
        crop = TF.adjust_brightness(crop, float(rng.uniform(1 - a.brightness, 1 + a.brightness)))
    if a.contrast:
        crop = TF.adjust_contrast(crop, float(rng.uniform(1 - a.contrast, 1 + a.contrast)))
    if a.saturation:
        crop = TF.adjust_saturation(crop, float(rng.uniform(1 - a.saturation, 1 + a.saturation)))
    return crop


def finish_on_device(crops: torch.Tensor, cfg: LoaderConfig) -> torch.Tensor:
    """Filter + normalise a uint8 (N, 3, S, S) batch where it lies: the Triton kernel on CUDA, torch otherwise."""
    if cfg.preprocess.filter_on and cfg.filter_kernel in ("auto", "triton") and crops.is_cuda:
        from tltrain.kernels.ben_graham import ben_graham_batch

        return ben_graham_batch(crops, cfg.preprocess, cfg.dtype, cfg.channels_last)
    return P.finish(crops, cfg.preprocess, cfg.dtype, cfg.channels_last)


class _Collate:
    """Stack a batch in the worker; on a CPU run also filter and normalise there, in parallel."""

    def __init__(self, cfg: LoaderConfig, finish_here: bool):
        self.cfg, self.finish_here = cfg, finish_here

    def __call__(self, items):
        crops = torch.stack([i[0] for i in items])
        if self.finish_here:
            crops = P.finish(crops, self.cfg.preprocess, self.cfg.dtype, self.cfg.channels_last)
        return {"images": crops, "labels": torch.tensor([i[1] for i in items], dtype=torch.int64),
                "keys": [i[2] for i in items], "valid": torch.tensor([i[3] for i in items], dtype=torch.bool),
                "errors": [i[4] for i in items if i[4]]}


class TorchLoader:
    """Iterable over Batch for one rank; same batch count on every rank; set_epoch() reshuffles training."""

    def __init__(self, cfg: LoaderConfig, shard_dir, split: str, *, train: bool, rank: int = 0, world_size: int = 1,
                 device: str = "cpu", seed: int = 0, fraction: float | None = None):
        self.cfg, self.train, self.rank, self.world_size, self.seed = cfg, train, rank, world_size, seed
        self.device = torch.device(device)
        self.manifest, shards = select_shards(shard_dir, split, fraction)
        self.refs = sample_refs(shard_dir, shards)
        self.num_classes = int(self.manifest["num_classes"])
        self.batch_size = cfg.batch_size
        self.labels = read_labels(self.refs) if (train and cfg.balanced) else None
        self.class_counts = np.bincount(read_labels(self.refs), minlength=self.num_classes).tolist()
        self.epoch = 0
        self.decode_errors: list[str] = []
        self._images, self._seconds, self._wait = 0, 0.0, 0.0
        self._finish_on_device = self.device.type == "cuda"
        self._plan()

    def _plan(self):
        n = len(self.refs)
        if self.train:
            self.slots, self.n_batches = train_slots(n, self.world_size, self.rank, self.batch_size, self.epoch,
                                                     self.seed, self.labels)
            self.valid = np.ones(len(self.slots), bool)
        else:
            self.slots, self.valid, self.n_batches = eval_slots(n, self.world_size, self.rank, self.batch_size)

    def __len__(self) -> int:
        return self.n_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._plan()

    def stats(self) -> dict:
        return {"images_per_s": self._images / self._seconds if self._seconds else 0.0,
                "wait_fraction": self._wait / self._seconds if self._seconds else 0.0,
                "decode_errors": len(self.decode_errors)}

    def __iter__(self):
        dataset = _ShardSamples(self.refs, self.slots, self.valid, self.cfg, self.train, self.seed, self.epoch)
        workers = self.cfg.workers
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=workers,
                            collate_fn=_Collate(self.cfg, not self._finish_on_device),
                            pin_memory=self.cfg.pin_memory and self.device.type == "cuda",
                            prefetch_factor=self.cfg.prefetch_factor if workers else None,
                            persistent_workers=False)
        started = time.perf_counter()
        last = started
        for item in loader:
            now = time.perf_counter()
            self._wait += now - last
            for message in item["errors"]:
                self.decode_errors.append(message)
                log.warning("skipped sample: %s", message)
            images = finish_on_device(item["images"].to(self.device, non_blocking=True), self.cfg) \
                if self._finish_on_device else item["images"]
            yield Batch(images, item["labels"].to(self.device), item["keys"], item["valid"].to(self.device))
            self._images += int(item["valid"].sum())
            last = time.perf_counter()
        self._seconds += time.perf_counter() - started

