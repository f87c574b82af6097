"""The `torch` backend: DataLoader workers read each sample's image and disc straight from its shard at the
offsets of the shard's index file (tltrain.data.loaders.members: one pread each, bounded by the index checks;
a missing or shortened shard stops the run naming it) and run the webdataset library's pipeline stages on them
(oversampling, shuffle buffer, map, batching); PIL decodes, the disc is cropped and resized in the workers; the
Ben Graham filter runs on the GPU batch (Triton) when there is one, in the workers (tltrain.preprocess_cpu)
otherwise. Reading by offset rather than parsing every tar header in turn costs 0.06 instead of 0.20 ms a sample
(benchmarks/RESULTS.md), and lets each worker read exactly its own samples.

Which samples a rank reads (plan.py):
- evaluation: the sample list, in shard order, is cut into equal contiguous blocks, one per rank; a rank reads
  only its block's samples, so every sample is seen exactly once in all;
  the last batches are padded with valid=False rows so every rank runs ceil(N / world / batch) batches.
- training: per sample, not per shard: the shards in an epoch-seeded order, their samples cut into equal contiguous
  blocks of N // world, one per rank (plan.training_block); a rank reads its block's samples in that order, so
  every rank has the same count and only the last partial batch is dropped. Samples are
  shuffled in a buffer (loader.shuffle_buffer); a rank loops its stream if skipped samples leave it short.
- balanced training (Sallam et al.): each sample read is repeated Poisson(N / (C * count[label])) times, the
  streaming form of drawing with replacement at inverse class frequency, so every class is drawn equally often.
- weighted folders (data.weights, several shard folders): the same draw with rate share_f * N / count_f (per class
  within the folder when balanced too), so folder f makes up share_f = weight_f / sum(weights) of an epoch
  (plan.draw_rates).
The DataLoader workers split a rank's samples the same way, into contiguous parts of whole batches, as equal
as they can be (plan.worker_part), so they finish together whatever the shard sizes (wds.split_by_worker deals
out whole shards: 7 shards of 14 to 53 samples left one of 2 workers with 56 % of them). The ranks are given
explicitly (build_loader's rank), not read from the environment. Labels are each sample's own `.lbl` member
(read once by plan.sample_index; the same member DALI reads), so a skipped sample never shifts labels and both
backends see the same label.
"""
from __future__ import annotations

import ctypes
import logging
import math
import random
import time

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tltrain import preprocess as P
from tltrain import preprocess_cpu
from tltrain.data.decode import decode_image, open_image, warn_draft_decode
from tltrain.data.disc import locate_disc
from tltrain.data.loaders.batch import Batch
from tltrain.data.loaders.config import LoaderConfig
from tltrain.data.loaders.filtering import finish_batch
from tltrain.data.loaders.members import MemberReader
from tltrain.data.loaders.plan import draw_rates, sample_index, select_shards, source_of_keys, training_block, \
    worker_part
from tltrain.engine.reproducibility import derive_seed
from tltrain.errors import ConfigError, DataError

log = logging.getLogger(__name__)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def decode_fundus(data: bytes, disc, work_size: int, draft: bool, name: str = "image") -> tuple[torch.Tensor, tuple]:
    """RGB (H, W, 3) uint8 by the shared decoding rule (tltrain.data.decode) and the disc in its pixels (located
    like `prepare` does when the shard has no .disc). draft (loader.draft_decode, off by default) lets libjpeg
    decode at 1/2, 1/4 or 1/8 scale while the disc square keeps at least work_size pixels: faster, but these
    pixels are no longer the definition's (the loader warns once)."""
    draft_size = None
    if draft and disc is not None:
        with open_image(data) as header:
            full = header.size
        keep = max(work_size / max(2 * disc[2], 1.0), 1e-3)
        draft_size = (max(1, math.ceil(full[0] * keep)), max(1, math.ceil(full[1] * keep)))
    image = decode_image(data, name, draft_size)
    array = torch.from_numpy(np.array(image))
    if disc is None:
        return array, locate_disc(image)
    if draft_size is None:
        return array, tuple(disc)
    factor = sum(image.size) / sum(full)  # width + height: the same before and after an EXIF rotation
    return array, tuple(v * factor for v in disc)


def augment_crop(crop: torch.Tensor, valid: torch.Tensor, a: P.AugmentConfig, rng: np.random.Generator):
    """Flips and brightness/contrast/saturation jitter of a (3, S, S) uint8 crop and its (2, S) valid profiles;
    returns (crop, valid, rotation in degrees). The rotation about the disc centre is applied after the filter
    (finish_batch), which is rotation invariant: the filter needs the crop's separable valid map."""
    from torchvision.transforms.v2 import functional as TF

    if rng.uniform() < a.hflip:
        crop, valid = crop.flip(-1), torch.stack([valid[0], valid[1].flip(0)])
    if rng.uniform() < a.vflip:
        crop, valid = crop.flip(-2), torch.stack([valid[0].flip(0), valid[1]])
    angle = float(rng.uniform(-a.rotate_deg, a.rotate_deg)) if a.rotate_deg else 0.0
    if a.brightness:
        crop = TF.adjust_brightness(crop, float(rng.uniform(1 - a.brightness, 1 + a.brightness)))
    if a.contrast:
        crop = TF.adjust_contrast(crop, float(rng.uniform(1 - a.contrast, 1 + a.contrast)))
    if a.saturation:
        crop = TF.adjust_saturation(crop, float(rng.uniform(1 - a.saturation, 1 + a.saturation)))
    photo = (valid[0, :, None] > 0) & (valid[1, None, :] > 0)
    return torch.where(photo, crop, 0), valid, angle  # contrast lifts the black outside the photo: zero it again


def worker_error(exc: DataError) -> DataError:
    """A DataError raised in a DataLoader worker arrives wrapped ("Caught DataError in DataLoader worker ...",
    then the worker's traceback): back to its own one-line message."""
    text = str(exc)
    if not text.startswith("Caught DataError") or "DataError: " not in text:
        return exc
    return DataError(text.rsplit("DataError: ", 1)[1].strip())


class _RankStream(IterableDataset):
    """One rank's samples as worker-side batches: dicts of uint8 crops (or finished images), labels, keys, errors."""

    def __init__(self, loader: "TorchWdsLoader", block: np.ndarray, finish_in_worker: bool):
        self.cfg, self.train, self.seed, self.epoch, self.rank = loader.cfg, loader.train, loader.seed, loader.epoch, \
            loader.rank
        self.index, self.block, self.finish_in_worker = loader.index, block, finish_in_worker
        self.rates = loader.draw_rates  # (folder, class) -> expected draws per sample, None: each once
        self.folder_of_shard = np.array([s.get("folder", 0) for s in loader.shards] or [0], np.int64)
        self.work_size = loader.cfg.preprocess.work_size(loader.cfg.size)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, self.rank, worker, 0xDA7A]))
        part = worker_part(self.block, worker, workers, self.cfg.batch_size)
        if not len(part):  # fewer samples than workers
            return
        reader = MemberReader(self.index)  # opened here: descriptors are not shared with other workers
        try:
            while True:  # training loops its stream: the loader stops after its batch count
                produced = 0
                for batch in self._pipeline(part, reader, rng):
                    produced += len(batch["keys"])
                    yield batch
                if not self.train or produced == 0:  # a pass without one good sample would loop for ever
                    return
        finally:
            reader.close()

    def _samples(self, part: np.ndarray, reader: MemberReader):
        """The part's samples in order, read by offset: {"__key__", "__url__", "image", "disc", "label"}."""
        index = self.index
        for sample in part.tolist():
            yield {"__key__": str(index.keys[sample]), "__url__": reader.url(sample), "image": reader.image(sample),
                   "disc": reader.disc(sample), "label": int(index.labels[sample]),
                   "folder": int(self.folder_of_shard[index.shard[sample]])}

    def _pipeline(self, part: np.ndarray, reader: MemberReader, rng: np.random.Generator):
        stages = [lambda: self._samples(part, reader)]
        if self.train and self.rates is not None:
            stages.append(lambda src: self._oversample(src, rng))
        if self.train:
            stages.append(wds.shuffle(self.cfg.shuffle_buffer, initial=min(100, self.cfg.shuffle_buffer),
                                      rng=random.Random(int(rng.integers(1 << 62)))))
        stages += [wds.map(lambda sample: self._prepare(sample, rng)),
                   wds.batched(self.cfg.batch_size, collation_fn=self._collate, partial=True)]
        return iter(wds.DataPipeline(*stages))

    def _oversample(self, src, rng: np.random.Generator):
        for sample in src:
            for _ in range(rng.poisson(self.rates[sample["folder"], sample["label"]])):
                yield sample

    def _prepare(self, sample: dict, rng: np.random.Generator):
        """One sample -> (uint8 crop or None, valid profiles, rotation, label, key, error message or None)."""
        key, url, label = sample["__key__"], sample["__url__"], sample["label"]
        try:
            disc = None if sample["disc"] is None else sample["disc"].tolist()
            image, disc = decode_fundus(sample["image"], disc, self.work_size, self.cfg.draft_decode, f"{url}:{key}")
        except Exception as exc:  # a corrupt member: skip it loudly (counted by the loader) or stop, by config
            message = f"{url}:{key}: cannot decode ({type(exc).__name__}: {exc})"
            if self.cfg.on_decode_error == "fail":
                raise DataError(message) from None
            return None, None, 0.0, label, key, message
        pre = self.cfg.preprocess
        if self.train:
            scale = rng.uniform(*self.cfg.augment.crop_scale)
            shift = tuple(rng.uniform(-(1 - scale), 1 - scale, size=2))
            h, w = image.shape[:2]
            x0, y0, side = P.disc_box(disc, w, h, pre.crop_to_disc, scale, shift)
            crop = P.crop_resize_box(image, x0, y0, side, self.work_size)
            valid = P.square_valid(x0, y0, side, w, h, self.work_size)
            return *augment_crop(crop, valid, self.cfg.augment, rng), label, key, None
        crop, valid = P.crop_resize(image, disc, self.work_size, pre)
        return crop, valid, 0.0, label, key, None

    def _collate(self, rows) -> dict:
        good = [r for r in rows if r[0] is not None]
        n = self.work_size
        crops = torch.stack([r[0] for r in good]) if good else torch.zeros((0, 3, n, n), dtype=torch.uint8)
        valid = torch.stack([r[1] for r in good]) if good else torch.zeros((0, 2, n))
        angles = torch.tensor([r[2] for r in good], dtype=torch.float32)
        if self.finish_in_worker and self.train:  # the rotation follows the filter: normalised here
            crops = finish_batch(crops, self.cfg.preprocess, size=self.cfg.size, dtype=self.cfg.dtype,
                                 channels_last=self.cfg.channels_last, filter_kernel="torch", valid=valid,
                                 angles=angles)
        elif self.finish_in_worker:  # filtered grey levels, uint8 where exact: normalised by the loader (_to_batch)
            crops = P.grey_levels(crops, self.cfg.preprocess, self.cfg.size, valid)
        return {"images": crops, "valid": valid, "angles": angles,
                "labels": torch.tensor([r[3] for r in good], dtype=torch.int64),
                "keys": [r[4] for r in good], "errors": [r[5] for r in rows if r[5]]}


def keep_freed_memory(_worker_id: int = 0) -> None:
    """A DataLoader worker allocates and frees the same large buffers for every image (a 5 MP photo is 15 MB of
    pixels): by default glibc hands each back to the kernel and the next one is faulted in again page by page,
    ~6 ms of a 24 ms decode (measured, benchmarks/RESULTS.md). Raising its mmap and trim thresholds keeps freed
    memory in the worker for the next image. Only in the loader's own worker processes; a no-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):
        pass


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat, without copying a lone part (the usual case: the workers' batches are loader batches)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class TorchWdsLoader:
    """Iterable over Batch for one rank; the same batch count on every rank; set_epoch() reshuffles training."""

    def __init__(self, cfg: LoaderConfig, shard_dir, split: str, *, train: bool, rank: int = 0, world_size: int = 1,
                 device: str = "cpu", seed: int = 0, fraction: float | None = None, manifest=None):
        self.cfg, self.train, self.rank, self.world_size, self.seed = cfg, train, rank, world_size, seed
        self.device = torch.device(device)
        if cfg.draft_decode:
            warn_draft_decode()
        self.manifest, self.shards = select_shards(shard_dir, split, fraction, manifest)
        self.index = sample_index(shard_dir, self.shards)
        self.num_classes = int(self.manifest["num_classes"])
        self.class_counts = np.bincount(self.index.labels, minlength=self.num_classes).tolist()
        self.draw_rates = draw_rates(self.index, self.shards, self.manifest, self.num_classes, cfg.balanced,
                                     cfg.checked_class_weights(self.num_classes)) if train else None
        self.source_of = source_of_keys(self.manifest, shard_dir, self.shards, self.index) if not train else None
        self.batch_size, self.epoch = cfg.batch_size, 0
        self.decode_errors: list[str] = []
        self._images, self._seconds, self._wait = 0, 0.0, 0.0
        self._finish_on_device = self.device.type == "cuda"
        self._persistent: DataLoader | None = None  # evaluation with persistent_workers: built on the first pass
        self._plan()

    def _plan(self) -> None:
        """This epoch's samples of the rank (block: positions in the index, in reading order), their shards (urls)
        and the batch count."""
        index, world, batch = self.index, self.world_size, self.batch_size
        n = len(index)
        if not self.train:
            per_rank = math.ceil(n / world)
            block = np.arange(min(n, self.rank * per_rank), min(n, (self.rank + 1) * per_rank))
            self.n_batches = max(1, math.ceil(per_rank / batch))
        else:
            block = training_block(index, world, self.rank, self.epoch, self.seed)
            self.n_batches = len(block) // batch
        self.expected, self.block = len(block), block
        self.urls = index.tars_of(block)  # evaluation: in shard order; training: in the epoch's shard order
        if self.train and self.n_batches < 1:
            raise ConfigError(f"{n} training samples cannot fill one batch of {batch} on each of {world} ranks; "
                              "lower loader.batch_size")

    def __len__(self) -> int:
        return self.n_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._plan()

    def stats(self) -> dict:
        return {"images_per_s": self._images / self._seconds if self._seconds else 0.0,
                "wait_fraction": self._wait / self._seconds if self._seconds else 0.0,
                "decode_errors": len(self.decode_errors)}

    def _worker_batches(self):
        workers = self.cfg.workers
        if not self.urls:
            return iter(())
        # Evaluation reads the same samples every pass: its workers may stay (a training epoch has a new plan)
        persistent = bool(workers) and self.cfg.persistent_workers and not self.train
        if persistent and self._persistent is not None:
            return iter(self._persistent)
        stream = _RankStream(self, self.block, finish_in_worker=not self._finish_on_device)
        if workers:
            preprocess_cpu.warm()  # compiled here, inherited by the forked workers (not loaded again in each)
        # A generator of its own: the workers' base seed comes from (seed, epoch, rank), and starting an iterator
        # never draws from the global torch RNG (which a resumed run restores from its checkpoint).
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, self.rank, 0xD1))
        loader = DataLoader(stream, batch_size=None, num_workers=workers, generator=generator,
                            pin_memory=self.cfg.pin_memory and self.device.type == "cuda",
                            prefetch_factor=self.cfg.prefetch_factor if workers else None,
                            worker_init_fn=keep_freed_memory if workers else None, persistent_workers=persistent)
        if persistent:
            self._persistent = loader
        return iter(loader)

    def _rebatch(self, source):
        """The workers' partial batches re-cut into chunks of exactly batch_size rows (the last one may be short):
        (images, labels, keys, valid profiles, rotations)."""
        size = self.batch_size
        parts, keys = {"images": [], "labels": [], "valid": [], "angles": []}, []
        for item in source:
            for message in item["errors"]:
                self.decode_errors.append(message)
                log.warning("skipped sample: %s", message)
            if not item["keys"]:
                continue
            for name in parts:
                parts[name].append(item[name])
            keys += item["keys"]
            while len(keys) >= size:
                whole = {name: _joined(values) for name, values in parts.items()}
                yield whole["images"][:size], whole["labels"][:size], keys[:size], whole["valid"][:size], \
                    whole["angles"][:size]
                keys = keys[size:]  # what is left of the last part, if anything (no empty part: no copy)
                parts = {name: [value[size:]] if keys else [] for name, value in whole.items()}
        if keys:
            whole = {name: _joined(values) for name, values in parts.items()}
            yield whole["images"], whole["labels"], keys, whole["valid"], whole["angles"]

    def _to_batch(self, chunk) -> Batch:
        """Move to the device, filter there if not done in the workers, pad to a full batch with valid=False."""
        out_dtype = P.DTYPES[self.cfg.dtype]
        if chunk is None:
            images = torch.zeros((0, 3, self.cfg.size, self.cfg.size), dtype=out_dtype, device=self.device)
            labels, keys = torch.zeros(0, dtype=torch.int64), []
        else:
            images, labels, keys, valid, angles = chunk
            images = images.to(self.device, non_blocking=True)
            if self._finish_on_device:
                images = finish_batch(images, self.cfg.preprocess, size=self.cfg.size, dtype=self.cfg.dtype,
                                      channels_last=self.cfg.channels_last, filter_kernel=self.cfg.filter_kernel,
                                      valid=valid, angles=angles)
            elif not self.train:  # the workers' grey levels (_RankStream._collate)
                images = P.normalise(images, self.cfg.preprocess, self.cfg.dtype, self.cfg.channels_last)
        valid = torch.ones(len(keys), dtype=torch.bool)
        missing = self.batch_size - len(keys)
        if missing:
            pad = torch.zeros((missing, 3, self.cfg.size, self.cfg.size), dtype=out_dtype, device=self.device)
            images = torch.cat([images, pad])
            labels = torch.cat([labels, torch.zeros(missing, dtype=torch.int64)])
            valid = torch.cat([valid, torch.zeros(missing, dtype=torch.bool)])
            keys = keys + [""] * missing
        layout = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        return Batch(images.contiguous(memory_format=layout), labels.to(self.device), keys, valid.to(self.device))

    def __iter__(self):
        """Exactly n_batches batches; ranks whose stream ends early pad with valid=False rows."""
        started = last = time.perf_counter()
        chunks = self._rebatch(self._worker_batches())
        seen, errors_before = 0, len(self.decode_errors)
        for _ in range(self.n_batches):
            try:
                chunk = next(chunks, None)
            except DataError as exc:
                raise worker_error(exc) from None
            if chunk is None and self.train:
                raise DataError(f"no sample of this epoch's shards could be read ({self._lost_text()}); "
                                "run `tltrain verify`")
            batch = self._to_batch(chunk)
            self._wait += time.perf_counter() - last
            yield batch
            real = sum(1 for key in batch.keys if key)  # padding rows have no key: counted on the host, so no
            seen += real  # read of batch.valid (a device tensor) makes the step wait for the device
            self._images += real
            last = time.perf_counter()
        chunks.close()  # a looping training stream: stops its DataLoader workers
        self._seconds += time.perf_counter() - started
        if not self.train:
            self._check_all_seen(seen + len(self.decode_errors) - errors_before)

    def _lost_text(self) -> str:
        errors = f"{len(self.decode_errors)} decode error(s), e.g. {self.decode_errors[-1]}" \
            if self.decode_errors else "no decode errors"
        return f"{len(self.urls)} shard(s) from {self.urls[0] if self.urls else '?'}; {errors}"

    def _check_all_seen(self, accounted: int) -> None:
        """Evaluation: every sample of the rank's block was either evaluated or counted as skipped; samples the
        shards no longer hold would otherwise vanish into padding rows."""
        if accounted < self.expected:
            raise DataError(f"{self.expected - accounted} of the {self.expected} samples listed in the index "
                            f"files were not found in their shards ({self._lost_text()}); the shards changed "
                            "after `tltrain prepare`: run `tltrain verify`")
