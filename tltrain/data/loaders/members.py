"""Reading single samples straight from their shards at the offsets of the shard index files: what the torch
backend's workers and the DALI backend's weighted sampler read, instead of parsing every tar header in turn.

The index files were checked when the loader read them (tltrain.data.loaders.plan.sample_index: every member
inside its tar, none over MEMBER_BYTES), so a read is bounded. Each read also takes the 512-byte tar header
just before the member (the member's own header, whatever long-name or pax blocks precede it) and checks it as
the streaming reader does (tltrain.data.shards.member_problem: a valid header of a regular file of the size and
at the offset the index gives): a tar replaced or rewritten after `prepare`, gone or shorter than its index,
stops the run with a DataError naming it rather than decoding whatever bytes now sit at those offsets.
"""
from __future__ import annotations

import os
import tarfile

import numpy as np

from tltrain.data.loaders.plan import NO_MEMBER, SampleIndex
from tltrain.data.shards import member_problem, shard_read_error
from tltrain.errors import DataError

#: a FIFO put where a tar was fails its read at once instead of blocking (no effect on a regular file)
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


class MemberReader:
    """Reads samples' image and disc members (at SampleIndex.image and .disc) with one pread each, keeping one
    open descriptor per tar it has read from. Made in the process that reads (a DataLoader worker, DALI's
    source), closed by close()."""

    def __init__(self, index: SampleIndex):
        self.index = index
        self._files: dict[int, int] = {}

    def url(self, sample: int) -> str:
        return self.index.tars[int(self.index.shard[sample])]

    def image(self, sample: int) -> bytes:
        return self._read(sample, *self.index.image[sample])

    def disc(self, sample: int) -> np.ndarray | None:
        """The sample's disc (cx, cy, r) as float32, None when its shard has no .disc member for it."""
        offset, size = self.index.disc[sample]
        if offset == NO_MEMBER:
            return None
        if size != 12:
            raise DataError(f"{self.url(sample)}: a .disc member of {size:,} bytes, expected 12 (damaged shard: "
                            "run `tltrain verify`)")
        return np.frombuffer(self._read(sample, offset, size), "<f4").astype(np.float32)

    def _read(self, sample: int, offset: int, size: int) -> bytes:
        tar = int(self.index.shard[sample])
        handle = self._files.get(tar)
        path = self.index.tars[tar]
        start = offset - tarfile.BLOCKSIZE  # the member's own header
        try:
            if handle is None:
                handle = self._files[tar] = os.open(path, _READ_FLAGS)
            data = os.pread(handle, int(size) + tarfile.BLOCKSIZE, int(start)) if start >= 0 else b""
        except OSError as exc:
            raise shard_read_error(path, exc) from None
        if len(data) != size + tarfile.BLOCKSIZE:
            raise DataError(f"{path}: {size} bytes at {offset} listed in its index, "
                            f"{max(len(data) - tarfile.BLOCKSIZE, 0)} there (damaged or changed shard: run "
                            "`tltrain verify`)")
        try:
            header = tarfile.TarInfo.frombuf(data[:tarfile.BLOCKSIZE], tarfile.ENCODING, "surrogateescape")
        except tarfile.HeaderError as exc:
            raise DataError(f"{path}: no tar header before the member at byte {offset:,} that its index lists "
                            f"({exc}): the shard changed after `prepare` (damaged shard: run `tltrain verify`)"
                            ) from None
        header.offset_data = offset
        problem = member_problem(header, (offset, size))
        if problem:
            raise DataError(f"{path}: {problem} (damaged shard: run `tltrain verify`)")
        return data[tarfile.BLOCKSIZE:]

    def close(self) -> None:
        for handle in self._files.values():
            os.close(handle)
        self._files.clear()
