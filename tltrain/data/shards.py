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
import os
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path

INDEX_VERSION = "v1.2"  # DALI's webdataset index format (as written by its wds2idx tool)
MEMBER_ORDER = ("jpg", "cls", "lbl", "disc", "json")  # "jpg" stands for the image member, .jpg or .png
IMAGE_EXTS = ("jpg", "png")


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


def write_tar(samples: list[ShardSample], tar_path: Path) -> tuple[str, int]:
    """Write samples to tar_path (plain ustar, fixed metadata); return the DALI index text and the sample count."""
    lines = []
    with open(tar_path, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            parts = []
            for ext, payload in sample_members(sample):
                name = f"{sample.key}.{ext}"
                header_at = raw.tell()
                tar.addfile(_tarinfo(name, len(payload)), io.BytesIO(payload))
                parts.append(f"{ext} {header_at + tarfile.BLOCKSIZE} {len(payload)} {name}")
            lines.append(" ".join(parts))
    return f"{INDEX_VERSION} {len(samples)}\n" + "\n".join(lines) + "\n", len(samples)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _replace_atomically(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def done_record_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}.done.json"


def finished(out_dir: Path, name: str, plan_hash: str) -> dict | None:
    """The done-record of a shard written earlier from the same plan, if its files are all still there."""
    record_path = done_record_path(out_dir, name)
    try:
        record = json.loads(record_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if record.get("plan_hash") != plan_hash:
        return None
    tar, idx = out_dir / f"{name}.tar", out_dir / f"{name}.idx"
    if not (tar.is_file() and idx.is_file()) or tar.stat().st_size != record.get("bytes"):
        return None
    return record


def write_shard(out_dir: Path, name: str, samples: list[ShardSample], plan_hash: str) -> dict:
    """tar, then index, then done-record, each via a temporary name and rename: a crash never leaves a
    half-written file under a final name, and a shard counts as finished only once its done-record exists."""
    tar_path, idx_path = out_dir / f"{name}.tar", out_dir / f"{name}.idx"
    tmp_tar, tmp_idx = out_dir / f".{name}.tar.tmp", out_dir / f".{name}.idx.tmp"
    index_text, count = write_tar(samples, tmp_tar)
    _replace_atomically(tmp_tar, tar_path)
    tmp_idx.write_text(index_text)
    _replace_atomically(tmp_idx, idx_path)
    record = {"name": name, "tar": tar_path.name, "index": idx_path.name, "count": count,
              "bytes": tar_path.stat().st_size, "sha256": sha256_file(tar_path), "plan_hash": plan_hash,
              "keys_sha256": hashlib.sha256("\n".join(s.key for s in samples).encode()).hexdigest()}
    tmp_record = out_dir / f".{name}.done.json.tmp"
    tmp_record.write_text(json.dumps(record, indent=1))
    _replace_atomically(tmp_record, done_record_path(out_dir, name))
    return record


def read_index(idx_path: Path) -> list[dict[str, tuple[int, int, str]]]:
    """Parse a DALI index file: one dict per sample, extension -> (offset, size, member name)."""
    lines = Path(idx_path).read_text().splitlines()
    version, count = lines[0].split()
    if version != INDEX_VERSION:
        raise ValueError(f"{idx_path}: index version {version}, expected {INDEX_VERSION}")
    samples = []
    for number, line in enumerate(lines[1:int(count) + 1], start=2):
        fields = line.split(" ")
        if len(fields) % 4 or not all(f.isdigit() for f in fields[1::4] + fields[2::4]):
            raise ValueError(f"{idx_path}:{number}: malformed line (a member name with a space? "
                             "re-run `tltrain prepare`, which writes space-free keys)")
        samples.append({fields[i]: (int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                        for i in range(0, len(fields), 4)})
    if len(samples) != int(count):
        raise ValueError(f"{idx_path}: header says {count} samples, found {len(samples)} lines")
    return samples
