"""The `dali` backend: webdataset reader -> JPEG decode (nvJPEG 'mixed' on a GPU, CPU otherwise) -> disc crop
-> resize -> Ben Graham filter -> normalise, all inside one DALI pipeline; the same numbers as tltrain.preprocess.

Ranks read disjoint contiguous parts of the sample list (DALI's shard_id/num_shards split per sample, not per
tar: part i is samples [floor(N i / K), floor(N (i + 1) / K)), so uneven tars do not matter). pad_last_batch
repeats a part's last sample to fill its last batch; evaluation flags those rows valid=False and pads every rank to
the same batch count, training drops the last partial batch (LastBatchPolicy.DROP) and uses min(part) // batch
batches on every rank (tests/test_rank_split.py checks both backends at world sizes 2, 3 and 4). Training rebuilds
the pipeline per epoch (set_epoch), seeded from (seed, epoch, rank), with ranks rotating over the parts, so an
epoch's order and augmentation do not depend on whether the run was resumed (DALI's own reshuffling continues from
its state and cannot be positioned). filter_kernel=triton/torch, and auto on the CPU: DALI stops after decode + crop +
resize and the filter runs on the torch batch (the Triton kernel on CUDA, the fused CPU kernel of
tltrain.preprocess_cpu on the CPU); filter_kernel=dali keeps DALI's own filter on the CPU too. CPU evaluation goes
further: DALI only decodes, and the loader runs the pipeline itself and crops, resizes, filters and normalises each
photo on the host from a view of DALI's buffer, a photo at a time per thread (_host_batches), as DALI's CPU slice +
resize cost 5x the host kernel's.
Labels come from the `.lbl` member (int32), the same member the torch backend reads.
Limits, stated rather than faked: a sample that fails to decode stops the pipeline whatever on_decode_error says
(DALI's decoders cannot skip one); the error names the shards and points at `tltrain verify`, which finds the
damaged sample. Bytes flipped inside a JPEG's coded data decode without any error (measured), so such damage is
found only by the shard checksum check before training (tltrain/data/integrity.py) or `tltrain verify`.
Weighted training (loader.balanced, loader.class_weights, weighted shard folders): the reader cannot weight
samples, so an external source (dali_source.EpochSource) feeds the same graph an epoch of samples drawn with the
torch backend's expected frequencies (plan.draw_rates, plan.weighted_epoch_positions), read from the tars at their
index offsets; the rank takes its contiguous part of the epoch's draw.
"""
from __future__ import annotations

import gc
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tltrain.data.loaders.batch import Batch
from tltrain.data.loaders.config import LoaderConfig
from tltrain.data.loaders.dali_source import EpochSource
from tltrain.data.loaders.filtering import finish_batch, use_triton
from tltrain.data.loaders.plan import (NO_MEMBER, draw_rates, sample_index, select_shards, source_of_keys,
                                      weighted_epoch_positions)
from tltrain.engine.reproducibility import derive_seed
from tltrain.errors import DataError
from tltrain.preprocess import DTYPES, circle_mask, crop_resize_box, disc_box, finish, for_each_image, square_valid


_INHERITED_PIPELINES: list = []


def _disown_inherited_dali_pipelines() -> None:
    """A forked child (a DataLoader worker, a prepare pool process) inherits every object of its parent, DALI
    pipelines included (a process that also ran the DALI backend, e.g. evaluate after training). If the child frees
    one, the pipeline's C++ destructor waits for pipeline threads that exist only in the parent, and the child hangs
    for ever. Those pipelines belong to the parent: right after fork, before any Python code of the child can free
    one, the child takes a reference to every Pipeline object it holds, so none is ever freed there."""
    dali_pipeline = sys.modules.get("nvidia.dali.pipeline")
    if dali_pipeline is not None:
        pipeline_type = dali_pipeline.Pipeline  # type(), not isinstance: no object's __class__ hook runs (torch's
        # deprecated reduce_op warns on it in every child)
        _INHERITED_PIPELINES.extend(o for o in gc.get_objects() if issubclass(type(o), pipeline_type))


os.register_at_fork(after_in_child=_disown_inherited_dali_pipelines)


def fundus_pipeline(tars, indexes, cfg: LoaderConfig, *, train: bool, shard_id: int, num_shards: int, seed: int,
                    gpu: bool, filter_in_dali: bool, source=None, decode_only: bool = False):
    """The graph of one DALI pipeline (call inside a pipeline_def); returns (images, labels, source_info, valid,
    angles): valid (2, 2R) profiles and the rotation in degrees when the filter runs in torch, else None.
    source: an external source of drawn samples (dali_source.EpochSource) instead of the webdataset reader.
    decode_only: (decoded photos, labels, source_info, discs, None): the crop, resize and filter run on the host
    (CPU evaluation: DaliLoader._host_batches)."""
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    pre, aug, size = cfg.preprocess, cfg.augment, cfg.size
    if source is None:
        jpegs, labels, discs = fn.readers.webdataset(
            paths=tars, index_paths=indexes, ext=["jpg;png", "lbl", "disc"],
            dtypes=[types.UINT8, types.INT32, types.FLOAT], shard_id=shard_id, num_shards=num_shards,
            random_shuffle=train, initial_fill=cfg.shuffle_buffer, pad_last_batch=True, seed=seed, name="reader")
        source_info = fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0)
    else:  # the key stands where the reader's "shard.tar:offset:key.jpg" would: _keys() reads both
        jpegs, labels, discs, keys = fn.external_source(source=source, num_outputs=4, batch=False,
                                                        dtype=[types.UINT8, types.INT32, types.FLOAT, types.UINT8])
        source_info = fn.pad(keys, fill_value=0)
    # One decoder for both image members: prepare stores only images whose bytes give the shared decoding
    # rule's pixels here (tltrain.data.decode); DALI applies EXIF orientation as the rule does.
    decode_args = {"hw_decoder_load": cfg.hw_decoder_load} if gpu else {}
    images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB, **decode_args)
    if decode_only:
        return images, labels, source_info, discs, None

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
    work = pre.work_size(size)  # 2R: the filter runs at the configured disc radius, then resizes to the model size
    valid_y, valid_x = _valid_profiles(fn, types, images, x0, y0, side, work)
    if gpu:
        valid_y, valid_x = valid_y.gpu(), valid_x.gpu()
    images = fn.slice(images, fn.stack(y0, x0), fn.stack(side, side), axis_names="HW", normalized_anchor=False,
                      normalized_shape=False, out_of_bounds_policy="pad", fill_values=0)
    images = fn.resize(images, size=[work, work], interp_type=types.INTERP_LINEAR, antialias=True)

    mirror, angle = 0, None
    if train:  # the rotation is applied after the filter (rotation invariant): the filter needs vy (x) vx
        if aug.rotate_deg:
            angle = fn.random.uniform(range=[-aug.rotate_deg, aug.rotate_deg])
        if aug.vflip:
            vflip = fn.random.coin_flip(probability=aug.vflip)
            images = fn.flip(images, horizontal=0, vertical=vflip)
            valid_y = fn.flip(valid_y, horizontal=0, vertical=vflip)
        images = fn.brightness_contrast(
            images, brightness=fn.random.uniform(range=[1 - aug.brightness, 1 + aug.brightness]),
            contrast=fn.random.uniform(range=[1 - aug.contrast, 1 + aug.contrast]))
        if aug.saturation:
            images = fn.saturation(images, saturation=fn.random.uniform(range=[1 - aug.saturation, 1 + aug.saturation]))
        images = images * fn.cast(dmath.min(valid_y * valid_x * 1e30, 1.0), dtype=types.UINT8)  # re-black outside
        mirror = fn.random.coin_flip(probability=aug.hflip)

    if not filter_in_dali:  # uint8 CHW crops at 2R + valid profiles; filter, resize, normalise in torch (Triton)
        if train:
            images = fn.flip(images, horizontal=mirror)
            valid_x = fn.flip(valid_x, horizontal=mirror)
        valid = fn.cat(fn.reshape(valid_y, shape=[1, work]), fn.reshape(valid_x, shape=[1, work]), axis=0)
        angles = fn.cast(angle if angle is not None else discs[0] * 0.0, dtype=types.FLOAT)
        return fn.transpose(images, perm=[2, 0, 1]), labels, source_info, valid, angles

    x = fn.cast(images, dtype=types.FLOAT)
    if pre.filter_on:  # tltrain.preprocess: B = gauss0(P) / gauss0(V); round(clamp(4 (P - V B) + 128)); mask
        x = normalised_filter(x, valid_y, valid_x, pre, work, gpu)
    if angle is not None:
        x = fn.rotate(x, angle=angle, keep_size=True, fill_value=pre.offset if pre.filter_on else 0.0)
    if work != size:
        x = fn.resize(x, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)
    images = fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", mirror=mirror,
                                      mean=[m * 255 for m in pre.mean], std=[s * 255 for s in pre.std])
    return images, labels, source_info, None, None


def _valid_profiles(fn, types, images, x0, y0, side, work):
    """(work, 1, 1) vy and (1, work, 1) vx: the photo's share of each row/column of the disc square, as the same
    slice (zero outside the photo) + resize of 1-D rows of ones as the image gets (tltrain.preprocess.square_valid)."""
    shape = images.shape(dtype=types.INT32)
    one = shape[0] * 0 + 1
    ones_y = fn.reshape(fn.ones(shape=fn.stack(shape[0], one, one), dtype=types.FLOAT), layout="HWC")
    ones_x = fn.reshape(fn.ones(shape=fn.stack(one, shape[1], one), dtype=types.FLOAT), layout="HWC")
    zero = x0 * 0.0
    column = fn.slice(ones_y, fn.stack(y0, zero), fn.stack(side, zero + 1.0), axis_names="HW",
                      normalized_anchor=False, normalized_shape=False, out_of_bounds_policy="pad", fill_values=0)
    row = fn.slice(ones_x, fn.stack(zero, x0), fn.stack(zero + 1.0, side), axis_names="HW", normalized_anchor=False,
                   normalized_shape=False, out_of_bounds_policy="pad", fill_values=0)
    valid_y = fn.resize(column, size=[work, 1], interp_type=types.INTERP_LINEAR, antialias=True)
    valid_x = fn.resize(row, size=[1, work], interp_type=types.INTERP_LINEAR, antialias=True)
    return valid_y, valid_x


def normalised_filter(x, valid_y, valid_x, pre, work: int, gpu: bool):
    """Ben Graham (definition version 2) inside a DALI graph, on float HWC x (the uint8 crop P, work x work) with
    the valid profiles vy (work, 1, 1) and vx (1, work, 1): B = gauss0(P) / (gauss0(vy) gauss0(vx)). DALI's blur
    mirrors at its border, so each blur runs on a zero halo (which makes it zero padding); the normaliser's blurs
    are 1-D, on the profiles."""
    from nvidia.dali import fn
    from nvidia.dali import math as dmath
    from nvidia.dali import types as T

    sigma = work / 2 * pre.sigma_ratio
    half = math.ceil(3 * sigma)

    def gauss0(node, extent_h: int, extent_w: int):
        pad_h, pad_w = (half if extent_h > 1 else 0), (half if extent_w > 1 else 0)
        padded = fn.slice(node, start=[-pad_h, -pad_w], shape=[extent_h + 2 * pad_h, extent_w + 2 * pad_w],
                          axis_names="HW", out_of_bounds_policy="pad", fill_values=0)
        blurred = fn.gaussian_blur(padded, sigma=[sigma if pad_h else 1.0, sigma if pad_w else 1.0],
                                   window_size=[2 * pad_h + 1, 2 * pad_w + 1])
        return fn.slice(blurred, start=[pad_h, pad_w], shape=[extent_h, extent_w], axis_names="HW")

    den = gauss0(valid_y, work, 1) * gauss0(valid_x, 1, work)
    mean_blur = gauss0(x, work, work) / dmath.max(den, 1e-30)  # where den is 0 so is gauss0(P): B = 0
    x = dmath.floor(dmath.clamp(pre.gain * (x - valid_y * valid_x * mean_blur) + pre.offset, 0.0, 255.0) + 0.5)
    if pre.mask_ratio > 0:
        inside = circle_mask(work, pre.mask_ratio).numpy().astype(np.float32)[..., None]
        mask = T.Constant(inside, device="gpu" if gpu else "cpu")
        x = x * mask + pre.offset * (1.0 - mask)
    return x


def _rank_counts(n_total: int, world: int) -> list[int]:
    """DALI's contiguous split: shard i holds samples [floor(N*i/K), floor(N*(i+1)/K))."""
    return [n_total * (i + 1) // world - n_total * i // world for i in range(world)]


class DaliLoader:
    def __init__(self, cfg: LoaderConfig, shard_dir, split: str, *, train: bool, rank: int = 0, world_size: int = 1,
                 device: str = "cpu", seed: int = 0, fraction: float | None = None, manifest=None):
        from nvidia.dali import pipeline_def
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.cfg, self.train, self.rank, self.world_size = cfg, train, rank, world_size
        self.device = torch.device(device)
        gpu = cfg.dali_device == "gpu" or (cfg.dali_device == "auto" and self.device.type == "cuda")
        self.manifest, shards = select_shards(shard_dir, split, fraction, manifest)
        index = sample_index(shard_dir, shards)  # size, labels, member spans (weighted); the reader does the rest
        self.num_classes = int(self.manifest["num_classes"])
        self.class_counts = np.bincount(index.labels, minlength=self.num_classes).tolist()
        self.source_of = source_of_keys(self.manifest, shard_dir, shards, index) if not train else None
        rates = draw_rates(index, shards, self.manifest, self.num_classes, cfg.balanced,
                           cfg.checked_class_weights(self.num_classes)) if train else None
        if rates is not None and (index.disc[:, 0] == NO_MEMBER).any():
            raise DataError(f"{shard_dir}: a sample without its .disc member (written by an older `tltrain "
                            "prepare`?): weighted DALI sampling reads the disc from the shards; re-run prepare")
        self.batch_size = cfg.batch_size
        counts = _rank_counts(len(index), world_size)
        if train:
            self.n_batches = min(counts) // cfg.batch_size
            if self.n_batches < 1:
                raise DataError(f"{shard_dir}: {len(index)} training samples cannot fill one batch of "
                                f"{cfg.batch_size} on each of {world_size} ranks; lower loader.batch_size")
        else:
            self.n_batches = max(1, math.ceil(max(counts) / cfg.batch_size))
        # auto: DALI's own filter on a GPU; on the CPU the fused kernel of tltrain.preprocess_cpu on DALI's crops
        # (DALI's CPU blur and arithmetic ran at a fifth of its speed: benchmarks/RESULTS.md)
        self.filter_in_dali = not cfg.preprocess.filter_on or cfg.filter_kernel == "dali" or \
            (cfg.filter_kernel == "auto" and gpu)
        # CPU evaluation with the filter outside DALI: DALI decodes, the host kernels crop, resize and filter
        # straight from DALI's buffers (DALI's own slice + resize of a 5 MP photo cost ~20 ms of CPU per image,
        # the kernel's crop + resize ~4: benchmarks/RESULTS.md). Training keeps DALI's crop: its jitter and flips.
        self.host_crop = not gpu and not train and not self.filter_in_dali
        self._counts, self._passes = counts, 0
        all_tars = [str(Path(shard_dir) / s["tar"]) for s in shards]
        self.shard_names = [s["tar"] for s in shards]
        self.seed, self.epoch, self._started = seed, 0, False

        def build(epoch: int):
            """The pipeline and iterator of one epoch. Training: the reader's shuffle and every random op are
            seeded from (seed, epoch, rank) and ranks rotate over the contiguous parts per epoch, so the data of
            epoch e is the same whether the run got there straight or resumed into it."""
            shard_id = (rank + epoch) % world_size if train else rank
            tars = all_tars
            indexes = [t[:-4] + ".idx" for t in tars]
            source = None
            if rates is not None:  # weighted: this rank's part of the epoch's draw, whole batches only
                drawn = weighted_epoch_positions(index, shards, rates, epoch, seed)
                start = len(drawn) * rank // world_size
                source = EpochSource(index, drawn[start:start + self.n_batches * cfg.batch_size])

            @pipeline_def(batch_size=cfg.batch_size, num_threads=max(1, cfg.workers),
                          device_id=(self.device.index or 0) if gpu else None,
                          seed=derive_seed(seed, epoch, rank, 0xDA11), prefetch_queue_depth=2)
            def pipeline():
                outputs = fundus_pipeline(tars, indexes, cfg, train=train, shard_id=shard_id, num_shards=world_size,
                                          seed=derive_seed(seed, epoch, shard_id, 0x5EED), gpu=gpu,
                                          filter_in_dali=self.filter_in_dali, source=source,
                                          decode_only=self.host_crop)
                return tuple(output for output in outputs if output is not None)

            pipe = pipeline()
            policy = LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL
            try:
                pipe.build()
                if self.host_crop:
                    return pipe, None
                names = ["images", "labels", "info"] + ([] if self.filter_in_dali else ["valid", "angles"])
                ends = {"reader_name": "reader"} if source is None else {}  # a source ends by StopIteration
                return pipe, DALIGenericIterator([pipe], names, last_batch_policy=policy, auto_reset=True, **ends)
            except RuntimeError as exc:
                raise DataError(f"DALI pipeline over {', '.join(self.shard_names)} failed ({dali_reason(exc)}); run "
                                "`tltrain verify` on the shard folder to find a damaged sample") from None

        self._build = build
        self.pipe, self.iterator = build(0)
        self._images, self._seconds, self._wait = 0, 0.0, 0.0

    def __len__(self) -> int:
        return self.n_batches

    def set_epoch(self, epoch: int) -> None:
        """Training: a pipeline seeded for this epoch (rebuilt unless the current one is this epoch's and unread),
        so a resumed run sees the same order and augmentation as an uninterrupted one."""
        if not self.train or (epoch == self.epoch and not self._started):
            return
        del self.iterator, self.pipe  # free the old pipeline's threads and buffers before building the next
        self.pipe, self.iterator = self._build(epoch)
        self.epoch, self._started = epoch, False

    def stats(self) -> dict:
        return {"images_per_s": self._images / self._seconds if self._seconds else 0.0,
                "wait_fraction": self._wait / self._seconds if self._seconds else 0.0}

    @staticmethod
    def _keys(info: torch.Tensor) -> list[str]:
        """source_info is 'shard.tar:offset:key.jpg' as padded bytes -> the sample keys."""
        rows = info.cpu().numpy().astype(np.uint8)
        return [bytes(row).rstrip(b"\0").decode().rsplit(":", 1)[-1].rsplit(".", 1)[0] for row in rows]

    def _to_batch(self, data: dict) -> Batch:
        images = data.get("finished", data.get("images"))  # finished: the host recipe's model input
        if "finished" not in data and not self.filter_in_dali:
            profiles = data.get("valid")
            images = finish_batch(images.to(self.device), self.cfg.preprocess, size=self.cfg.size,
                                  dtype=self.cfg.dtype, channels_last=self.cfg.channels_last,
                                  filter_kernel=self.cfg.filter_kernel,
                                  valid=None if profiles is None else profiles.float(),
                                  angles=data["angles"].reshape(-1) if self.train and "angles" in data else None)
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

    def _host_batches(self):
        """One evaluation pass of the decode-only pipeline, as DALIGenericIterator would give it: the reader's
        shard for this pass (it moves to the next shard after each pass, stick_to_shard being off, as the
        iterator assumes), its padded last batch cut to the shard's samples. Each photo is cropped, resized and
        its valid profiles made on the host from a view of DALI's buffer (valid until the next run()), and, for a
        CPU batch, filtered and normalised in the same go: the images side by side on torch's threads with no
        batch-wide step between (8 % more images per second on 2 cores than cropping the batch, then filtering
        it, then normalising it; the same numbers: benchmarks/RESULTS.md). A CUDA batch is filtered there."""
        shard = (self.rank + self._passes) % self.world_size
        self._passes += 1
        remaining = self._counts[shard]
        pre, size = self.cfg.preprocess, self.cfg.size
        work = pre.work_size(size)
        on_host = self.device.type == "cpu"
        use_triton(self.cfg.filter_kernel, pre, self.device)  # warns when a Triton kernel was asked for on the CPU
        while remaining > 0:
            images, labels, info, discs = self.pipe.run()
            keep = min(remaining, len(images))
            remaining -= keep
            if on_host:
                finished = torch.empty((keep, 3, size, size), dtype=DTYPES[self.cfg.dtype])
            else:
                crops = torch.empty((keep, 3, work, work), dtype=torch.uint8)
                valid = torch.empty((keep, 2, work), dtype=torch.float32)
            disc_rows = discs.as_array()

            def one(index: int) -> None:
                photo = np.asarray(images[index])  # HWC uint8, no copy
                h, w = photo.shape[:2]
                x0, y0, side = disc_box(disc_rows[index], w, h, pre.crop_to_disc)
                crop = crop_resize_box(torch.from_numpy(photo), x0, y0, side, work)
                profiles = square_valid(x0, y0, side, w, h, work)
                if on_host:
                    finished[index] = finish(crop[None], pre, self.cfg.dtype, size=size, valid=profiles[None])[0]
                else:
                    crops[index], valid[index] = crop, profiles

            for_each_image(one, keep)
            data = {"finished": finished} if on_host else {"images": crops, "valid": valid}
            yield [{**data, "labels": torch.from_numpy(labels.as_array().reshape(-1)[:keep].astype(np.int64)),
                    "info": torch.from_numpy(info.as_array()[:keep])}]

    def __iter__(self):
        started = last = time.perf_counter()
        produced = 0
        self._started = True
        try:
            for data in (self._host_batches() if self.host_crop else self.iterator):
                now = time.perf_counter()
                self._wait += now - last
                if produced < self.n_batches:
                    batch = self._to_batch(data[0])
                    yield batch
                    produced += 1
                    self._images += sum(1 for key in batch.keys if key)  # host count: no device read
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
        if not line.startswith(("Critical error", "Error in ", "which was used", "File ", "C++ context",
                                "Current pipeline")):
            return re.sub(r'^Assert on ".*?" failed: ', "", line)
    return lines[0] if lines else type(exc).__name__
