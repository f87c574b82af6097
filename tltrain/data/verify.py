"""`tltrain verify SHARDS`: re-read every shard and prove it matches its manifest.

Checks, per shard: sha256 and size against the manifest, the DALI index against the tar's real member offsets,
every sample complete (all members present), its key safe for every reader, its image decodes, its two label
encodings agree, and the counts per shard, split and class add up to the manifest's. Returns a report; raises
DataError listing every problem.

Shards are checked in parallel, one shard per job across a process pool (`workers`, 0 = every core this process
may use); results are gathered in manifest order, so the report and the problem list are the same as a serial
run's whatever the worker count.
"""
from __future__ import annotations

import json
import struct
import tarfile
from pathlib import Path

from tltrain.data.decode import decode_rgb
from tltrain.data.keys import is_safe_key
from tltrain.data.pool import pool_map
from tltrain import safe_io
from tltrain.data.manifest import load_manifest, manifest_path as manifest_path_of
from tltrain.data.shards import MEMBER_ORDER, image_ext, member_problem, read_index
from tltrain.safe_io import sha256_file
from tltrain.errors import DataError


def _check_shard_job(job: tuple[Path, dict]) -> tuple[int, list[int], list[str]]:
    """One pool job: (shard folder, manifest entry) -> (sample count, labels, problems) of that shard."""
    problems: list[str] = []
    count, labels = _check_shard(*job, problems)
    return count, labels, problems


def _check_shard(shard_dir: Path, entry: dict, problems: list[str]) -> tuple[int, list[int]]:
    tar_path, idx_path = shard_dir / entry["tar"], shard_dir / entry["index"]
    if not tar_path.is_file():
        problems.append(f"{tar_path}: missing")
        return 0, []
    if tar_path.stat().st_size != entry["bytes"] or sha256_file(tar_path) != entry["sha256"]:
        problems.append(f"{tar_path}: sha256/size differ from manifest.json (file changed or corrupt)")
    try:
        index = read_index(idx_path)
    except (OSError, ValueError, DataError) as exc:
        problems.append(f"{idx_path}: unreadable index ({exc})")
        index = None
    indexed = None if index is None else \
        {name: (off, size) for sample in index for off, size, name in sample.values()}
    samples: dict[str, dict[str, bytes]] = {}
    try:
        samples = _read_members(tar_path, idx_path, indexed, problems)
    except (tarfile.TarError, OSError) as exc:
        problems.append(f"{tar_path}: unreadable tar ({exc})")
        return 0, []
    labels = []
    for key, members in samples.items():
        if not is_safe_key(key):
            problems.append(f"{tar_path}:{key}: sample key is not readable by every loader (dots, spaces, "
                            "non-ASCII or too long; re-run `tltrain prepare`)")
        missing = [m for m in MEMBER_ORDER if m not in members and not (m == "jpg" and image_ext(members))]
        if missing:
            problems.append(f"{tar_path}:{key}: missing members {missing}")
            continue
        try:
            label_text, label_bin = int(members["cls"]), struct.unpack("<i", members["lbl"])[0]
            label_meta = json.loads(members["json"])["label"]
        except (ValueError, struct.error, TypeError, KeyError) as exc:
            problems.append(f"{tar_path}:{key}: unreadable label members ({type(exc).__name__}: "
                            f"{safe_io.printable(exc, 200)})")
            continue
        if label_text != label_bin or label_meta != label_text:
            problems.append(f"{tar_path}:{key}: label encodings disagree ({label_text}, {label_bin})")
        try:
            decode_rgb(members[image_ext(members)], f"{tar_path}:{key}")
        except Exception as exc:
            problems.append(f"{tar_path}:{key}: image does not decode ({type(exc).__name__}: {exc})")
        labels.append(label_text)
    if len(samples) != entry["count"]:
        problems.append(f"{tar_path}: {len(samples)} samples, manifest says {entry['count']}")
    return len(samples), labels


def _read_members(tar_path: Path, idx_path: Path, indexed: dict | None, problems: list[str]) -> dict:
    """key -> {extension: bytes} of the tar's members. Each member is checked from its header first (regular
    file, at most MEMBER_BYTES, where the index says): one that fails is a problem and is never read, so a small
    tar declaring a huge member costs no memory."""
    samples: dict[str, dict[str, bytes]] = {}
    found: dict[str, tuple[int, int]] = {}
    with safe_io.open_regular(tar_path, "shard") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        for member in tar:
            found[member.name] = (member.offset_data, member.size)
            problem = member_problem(member)
            if problem:
                problems.append(f"{tar_path}: {problem}")
                continue
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    if indexed is not None and indexed != found:
        problems.append(f"{idx_path}: offsets do not match {tar_path.name}")
    return samples


def verify_shards(shard_dir: str | Path, workers: int = 0) -> dict:
    """Check every shard of `shard_dir` against its manifest.json (see the module docstring); workers: processes
    (0: every core this process may use; 1: in this process)."""
    shard_dir = Path(shard_dir)
    manifest_path = manifest_path_of(shard_dir)
    manifest = load_manifest(shard_dir, missing_hint="is this a folder written by `tltrain prepare`?")
    problems: list[str] = []
    per_split: dict[str, list[int]] = {}
    jobs = [(shard_dir, entry) for entry in manifest["shards"]]
    for entry, (count, labels, shard_problems) in zip(manifest["shards"], pool_map(_check_shard_job, jobs, workers,
                                                                                  chunksize=1)):
        problems += shard_problems
        counts = per_split.setdefault(entry["split"], [0] * manifest["num_classes"])
        for label in labels:
            if 0 <= label < len(counts):
                counts[label] += 1
            else:
                problems.append(f"{shard_dir / entry['tar']}: label {label} outside 0..{len(counts) - 1}")
    for split, info in manifest["splits"].items():
        if per_split.get(split) != info["class_counts"]:
            problems.append(f"{manifest_path}: split {split!r} class counts {info['class_counts']} "
                            f"but shards hold {per_split.get(split)}")
    report = {"shards": len(manifest["shards"]), "samples": sum(sum(c) for c in per_split.values()),
              "per_split": per_split, "problems": problems, "ok": not problems}
    if problems:
        raise DataError(f"{shard_dir}: verification failed with {len(problems)} problem(s):\n"
                        + "\n".join(f"  - {p}" for p in problems), problems)
    return report
