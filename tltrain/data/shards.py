"""WebDataset shard writing: deterministic tar files, DALI index files, atomic replace, resumable by plan hash.

Written with tarfile rather than webdataset.TarWriter because the DALI index needs each member's byte offset
as it is written, and because fixed tar metadata (mtime, owner) makes the same inputs give identical bytes.
Sample members follow docs/architecture.md: the image (.jpg, or .png for files re-encoded by
tltrain.data.decode), .cls (ASCII label), .lbl (int32 LE), .disc (3 x float32 LE), .json (metadata).
Keys come from tltrain.data.keys (no dots, no spaces, short, distinct ignoring case).
"""
from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tltrain import safe_io
from tltrain.safe_io import sha256_file
from tltrain.errors import DataError

INDEX_VERSION = "v1.2"  # DALI's webdataset index format (as written by its wds2idx tool)
MEMBER_ORDER = ("jpg", "cls", "lbl", "disc", "json")  # "jpg" stands for the image member, .jpg or .png
IMAGE_EXTS = ("jpg", "png")
#: Largest tar member any reader takes in (verify, both loaders): 256 MiB holds a lossless PNG of the largest image
#: decode.MAX_PIXELS allows (50 MP x 3 bytes = 150 MB uncompressed, a PNG of noise is about that) with room to spare,
#: and is refused from the tar header or the index entry before a byte is read.
MEMBER_BYTES = 256 * safe_io.MiB
INDEX_BYTES = 64 * safe_io.MiB  # ~200 bytes per sample: over 300k samples in one shard


def image_ext(members) -> str | None:
    """Which image member a sample has ('jpg' or 'png'), None when it has neither."""
    return next((ext for ext in IMAGE_EXTS if ext in members), None)


@dataclass
class ShardSample:
    key: str
    label: int
    image: bytes
    disc: tuple[float, float, float]  # cx, cy, r in pixels of the stored image
    meta: dict
    image_ext: str = "jpg"  # "png" where prepare re-encoded the file (tltrain.data.decode.shard_image)


def sample_members(sample: ShardSample) -> list[tuple[str, bytes]]:
    """(extension, payload) of every member of one sample, in a fixed order."""
    return [
        (sample.image_ext, sample.image),
        ("cls", str(sample.label).encode()),
        ("lbl", struct.pack("<i", sample.label)),
        ("disc", struct.pack("<3f", *sample.disc)),
        ("json", json.dumps(sample.meta, sort_keys=True).encode()),
    ]


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = "tltrain"
    return info


def write_tar(samples: list[ShardSample], raw) -> tuple[str, int]:
    """Write samples into the binary file `raw` (plain ustar, fixed metadata); return the DALI index text and the
    sample count. `raw` is safe_io.atomic_open's temporary (write_shard): never a file at the shard's final name."""
    lines = []
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            parts = []
            for ext, payload in sample_members(sample):
                name = f"{sample.key}.{ext}"
                header_at = raw.tell()
                tar.addfile(_tarinfo(name, len(payload)), io.BytesIO(payload))
                parts.append(f"{ext} {header_at + tarfile.BLOCKSIZE} {len(payload)} {name}")
            lines.append(" ".join(parts))
    return f"{INDEX_VERSION} {len(samples)}\n" + "\n".join(lines) + "\n", len(samples)


def done_record_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}.done.json"


def finished(out_dir: Path, name: str, plan_hash: str) -> dict | None:
    """The done-record of a shard written earlier from the same plan, if its files are all still there."""
    record_path = done_record_path(out_dir, name)
    try:
        record = safe_io.load_json(record_path, safe_io.MiB, "shard done-record")
    except (OSError, DataError):
        return None
    if not isinstance(record, dict) or record.get("plan_hash") != plan_hash:
        return None
    tar, idx = out_dir / f"{name}.tar", out_dir / f"{name}.idx"
    if (record.get("tar"), record.get("index")) != (tar.name, idx.name):  # the manifest takes its names from here
        return None
    if not (tar.is_file() and idx.is_file()) or tar.stat().st_size != record.get("bytes"):
        return None
    return record


def write_shard(out_dir: Path, name: str, samples: list[ShardSample], plan_hash: str) -> dict:
    """tar, then index, then done-record, each via a temporary name and rename: a crash never leaves a
    half-written file under a final name, and a shard counts as finished only once its done-record exists."""
    tar_path, idx_path = out_dir / f"{name}.tar", out_dir / f"{name}.idx"
    with safe_io.atomic_open(tar_path) as raw:  # a temporary renamed into place: no link or half file at the name
        index_text, count = write_tar(samples, raw)
    safe_io.atomic_write_text(idx_path, index_text)
    record = {"name": name, "tar": tar_path.name, "index": idx_path.name, "count": count,
              "bytes": tar_path.stat().st_size, "sha256": sha256_file(tar_path), "plan_hash": plan_hash,
              "keys_sha256": hashlib.sha256("\n".join(s.key for s in samples).encode()).hexdigest()}
    safe_io.atomic_write_text(done_record_path(out_dir, name), json.dumps(record, indent=1))
    return record


def read_index(idx_path: Path) -> list[dict[str, tuple[int, int, str]]]:
    """Parse a DALI index file: one dict per sample, extension -> (offset, size, member name).

    Read bounded (a regular file of at most INDEX_BYTES), and every member's size at most MEMBER_BYTES: DALI
    allocates what the index says. DataError (a ValueError too) naming the file and line otherwise."""
    lines = safe_io.read_text(idx_path, INDEX_BYTES, "shard index").splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 2 or not header[1].isdigit():
        raise IndexFileError(f"{idx_path}: not a DALI index file (first line should be '{INDEX_VERSION} COUNT')")
    version, count = header
    if version != INDEX_VERSION:
        raise IndexFileError(f"{idx_path}: index version {version}, expected {INDEX_VERSION}")
    if int(count) > len(lines) - 1:
        raise IndexFileError(f"{idx_path}: header says {count} samples, found {len(lines) - 1} lines")
    samples = []
    for number, line in enumerate(lines[1:int(count) + 1], start=2):
        fields = line.split(" ")
        if len(fields) % 4 or not all(f.isdigit() for f in fields[1::4] + fields[2::4]):
            raise IndexFileError(f"{idx_path}:{number}: malformed line (a member name with a space? "
                              "re-run `tltrain prepare`, which writes space-free keys)")
        sample = {fields[i]: (int(fields[i + 1]), int(fields[i + 2]), fields[i + 3]) for i in range(0, len(fields), 4)}
        too_big = [name for _, size, name in sample.values() if size > MEMBER_BYTES]
        if too_big:
            raise IndexFileError(f"{idx_path}:{number}: member {safe_io.printable(too_big[0], 200)} is over the "
                              f"{MEMBER_BYTES:,}-byte limit for one member; refused")
        samples.append(sample)
    return samples


class IndexFileError(DataError, ValueError):
    """A malformed or oversized shard index: a DataError for the CLI, a ValueError for older callers."""


def iter_tar_samples(tar_path: str | Path) -> Iterator[dict]:
    """The samples of one shard, streamed, as webdataset-style dicts {"__key__", "__url__", ext: bytes}.

    Replaces webdataset's tar reader, which reads any member whole, whatever size its header declares, and
    whose error handler silently drops a shard that cannot be opened: here every member is checked from its
    header (member_problem) before it is read, and a missing, unreadable or damaged shard is a DataError naming
    it, so no sample is lost without a word."""
    current: dict | None = None
    try:
        with safe_io.open_regular(tar_path, "shard") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                problem = member_problem(member)
                if problem:
                    raise DataError(f"{tar_path}: {problem} (damaged shard: run `tltrain verify`)")
                key, _, ext = member.name.partition(".")
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": str(tar_path)}
                current[ext] = tar.extractfile(member).read()
                tar.members = []  # streaming: keep no list of every member seen
    except (OSError, tarfile.TarError) as exc:
        raise shard_read_error(tar_path, exc) from None
    if current is not None:
        yield current


def shard_read_error(tar_path, exc: Exception) -> DataError:
    """The one-line error of a shard that cannot be read while a run reads it (streamed or by offset)."""
    if isinstance(exc, FileNotFoundError):
        return DataError(f"{tar_path}: shard missing (deleted or moved while the run was reading its data?); "
                         "restore it or re-run `tltrain prepare`, then `tltrain verify`")
    return DataError(f"{tar_path}: unreadable shard ({type(exc).__name__}: {safe_io.printable(exc, 200)}); "
                     "run `tltrain verify`")


def member_problem(member: tarfile.TarInfo, indexed: tuple[int, int] | None = None) -> str | None:
    """Why a tar member must not be read (None: it may): not a regular file, over MEMBER_BYTES, or (with its
    index entry) not at the offset and size the index gives. Checked before a single byte of it is read."""
    if member.isreg() and member.size <= MEMBER_BYTES and (indexed is None or
                                                          indexed == (member.offset_data, member.size)):
        return None  # the per-sample path: no text is built for a good member
    name = safe_io.printable(member.name, 200)
    if not member.isreg():
        return f"member {name} is not a regular file (type {member.type!r}); refused"
    if member.size > MEMBER_BYTES:
        return f"member {name} declares {member.size:,} bytes, over the {MEMBER_BYTES:,}-byte limit for one member"
    return f"member {name} is at {(member.offset_data, member.size)} but the index says {indexed}"
