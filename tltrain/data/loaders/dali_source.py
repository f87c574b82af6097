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

import numpy as np

from tltrain.data.loaders.members import MemberReader
from tltrain.data.loaders.plan import SampleIndex


class EpochSource:
    """The external source of one rank's epoch: `positions` (sample numbers of the index, in order), then
    StopIteration. Returns (image bytes, label int32 (1,), disc float32 (3,), key as bytes) per sample."""

    def __init__(self, index: SampleIndex, positions: np.ndarray):
        self.index, self.positions = index, np.asarray(positions, np.int64)
        self.reader = MemberReader(index)

    def __len__(self) -> int:
        return len(self.positions)

    def __call__(self, info):
        if info.idx_in_epoch >= len(self.positions):
            raise StopIteration
        sample = int(self.positions[info.idx_in_epoch])
        index = self.index
        key = str(index.keys[sample]).encode()
        return (np.frombuffer(self.reader.image(sample), np.uint8), np.array([index.labels[sample]], np.int32),
                self.reader.disc(sample), np.frombuffer(key, np.uint8))

    def close(self) -> None:
        self.reader.close()
