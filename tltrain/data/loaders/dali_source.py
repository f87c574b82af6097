"""The DALI backend's weighted sampler: an external source that hands the pipeline the samples of an epoch drawn
with per-sample probabilities (class-balanced, class-weighted, weighted shard folders), which DALI's own
webdataset reader cannot do (it reads every sample once). The rest of the graph (nvJPEG or CPU decode, crop,
filter) is the same as with the reader.

Each sample is read straight from its tar at the offsets of the shard's index file (one seek and read for the
image, one for the disc; the label is the one sample_index read from the .lbl member, the same one the reader
gives), so the draw costs no decoding. The epoch's list is a pure function of (seed, epoch) and the rank takes
its contiguous part: deterministic on every rank, and a resumed run that reads its epoch's first batches again
gets them again, bit for bit.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tltrain.data.loaders.plan import SampleIndex
from tltrain.data.shards import image_ext, read_index
from tltrain.errors import DataError


class MemberTable:
    """Per sample (in SampleIndex order): its tar, the image member's (offset, size) and the disc's."""

    def __init__(self, shard_dir, shards: list[dict], index: SampleIndex):
        tars, image, disc = [], [], []
        for shard in shards:
            tars.append(str(Path(shard_dir) / shard["tar"]))
            for members in read_index(Path(shard_dir) / shard["index"]):
                ext = image_ext(members)
                if ext is None or "disc" not in members:
                    raise DataError(f"{tars[-1]}: a sample without its image or .disc member (not a tltrain shard?)")
                image.append(members[ext][:2])
                disc.append(members["disc"][:2])
        if len(image) != len(index):
            raise DataError(f"{shard_dir}: the index files list {len(image)} samples, the shards' labels "
                            f"{len(index)} (damaged shard: run `tltrain verify`)")
        self.tars, self.index = tars, index
        self.image = np.asarray(image, np.int64).reshape(-1, 2)
        self.disc = np.asarray(disc, np.int64).reshape(-1, 2)


class EpochSource:
    """The external source of one rank's epoch: `positions` (sample numbers of the table, in order), then
    StopIteration. Returns (image bytes, label int32 (1,), disc float32 (3,), key as bytes) per sample."""

    def __init__(self, table: MemberTable, positions: np.ndarray):
        self.table, self.positions = table, np.asarray(positions, np.int64)
        self._files: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.positions)

    def _read(self, tar: int, offset: int, size: int) -> bytes:
        handle = self._files.get(tar)
        if handle is None:
            handle = self._files[tar] = os.open(self.table.tars[tar], os.O_RDONLY)
        data = os.pread(handle, int(size), int(offset))
        if len(data) != size:
            raise DataError(f"{self.table.tars[tar]}: {size} bytes at {offset} listed in its index, {len(data)} "
                            "there (damaged shard: run `tltrain verify`)")
        return data

    def __call__(self, info):
        if info.idx_in_epoch >= len(self.positions):
            raise StopIteration
        sample = int(self.positions[info.idx_in_epoch])
        table = self.table
        tar = int(table.index.shard[sample])
        image = self._read(tar, *table.image[sample])
        disc = np.frombuffer(self._read(tar, *table.disc[sample]), "<f4")
        key = str(table.index.keys[sample]).encode()
        return (np.frombuffer(image, np.uint8), np.array([table.index.labels[sample]], np.int32),
                disc.astype(np.float32), np.frombuffer(key, np.uint8))

    def close(self) -> None:
        for handle in self._files.values():
            os.close(handle)
        self._files.clear()
