"""Before training: every shard a run will read has the size and sha256 that `tltrain prepare` wrote in
manifest.json. This is what catches damage the decoders cannot see: a JPEG with bytes flipped inside its
entropy-coded data decodes without an error in DALI (and often in PIL), and a changed `.lbl` is a valid label.

Cost: one sha256 pass over the run's shards at each run start (and each resume). Measured: 0.7 CPU-seconds per GB
(OpenSSL SHA-NI, ~1.4 GB/s per core; streamed in 4 MiB reads from the page cache), so storage bandwidth usually
sets the time. Shards are hashed on a thread pool (hashlib releases the GIL), up to 8 threads per rank. With several
ranks each hashes its own slice (every world_size-th shard) and the verdicts are gathered, so the I/O is shared
and every rank stops with the same error (this assumes every rank sees the same files, as with shared storage).
`data.verify_checksums=false` skips the check (huge datasets on storage trusted by other means).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tltrain.data.loaders.plan import select_shards
from tltrain.safe_io import sha256_file

READ_BYTES = 4 << 20


def run_shards(shard_dir: str | Path, splits: list[str], fraction: float | None, manifest=None) -> list[dict]:
    """The manifest entries of the shards a run reads: the training fraction and the evaluation splits."""
    chosen: dict[str, dict] = {}
    for split in splits:
        _, shards = select_shards(shard_dir, split, fraction if split == "train" else None, manifest)
        chosen.update((s["name"], s) for s in shards)
    return [chosen[name] for name in sorted(chosen)]


def shard_problem(shard_dir: Path, entry: dict) -> str | None:
    """None when the shard's size and sha256 match its manifest entry, else a short reason naming the file."""
    path = shard_dir / entry["tar"]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path}: missing"
    if size != entry["bytes"]:
        return f"{path}: {size} bytes, manifest.json says {entry['bytes']}"
    if sha256_file(path, "shard", READ_BYTES) != entry["sha256"]:
        return f"{path}: sha256 differs from manifest.json"
    return None


def check_checksums(shard_dir: str | Path, shards: list[dict], rank: int = 0, world_size: int = 1,
                    threads: int | None = None) -> list[str]:
    """This rank's share of the check: problems of shards[rank::world_size], hashed in parallel."""
    shard_dir = Path(shard_dir)
    mine = shards[rank::world_size]
    if not mine:
        return []
    threads = threads or max(1, min(8, (os.cpu_count() or 1)))
    with ThreadPoolExecutor(min(threads, len(mine))) as pool:
        return [p for p in pool.map(lambda entry: shard_problem(shard_dir, entry), mine) if p]


def checksum_error(problems: list[str]) -> str:
    """One line: the first damaged shard, how many more, and the two ways out."""
    listed = "; ".join(problems[1:4]) + ("; ..." if len(problems) > 4 else "")
    more = f" (and {len(problems) - 1} more shard(s): {listed})" if len(problems) > 1 else ""
    return (f"{problems[0]}{more}: shard changed or damaged since `tltrain prepare`; re-run prepare (or "
            "`tltrain verify` to see each sample), or set data.verify_checksums=false to skip this check")
