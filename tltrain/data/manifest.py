"""The one reader of a shard folder's manifest.json: every value checked before anything is built from it.

A shard folder travels between users, so its manifest is someone else's file (docs/architecture.md, "What is
trusted"). load_manifest reads it bounded (tltrain.safe_io.load_json: a regular file, size and depth capped),
checks its `format` tag, and validates every value the loaders, verify, export and report use:
- shard `tar`/`index` entries are names that stay inside the shard folder (safe_io.inside: no `..`, no absolute
  path, no symlink out); shard and fraction names are plain names;
- counts, sizes and num_classes are whole numbers within the caps below, class names strings of bounded length,
  per-split class counts one per class.
Cross-checks that have a better message elsewhere (the head of a checkpoint against num_classes in export, the
shards' contents against the counts in verify) stay with those readers.
"""
from __future__ import annotations

import re
from pathlib import Path

from tltrain import safe_io
from tltrain.errors import DataError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "tltrain-shards/1"  # what `tltrain prepare` writes (tltrain.data.prepare)
#: Caps. A manifest of 88,702 images with 1000 per shard is ~0.1 MB; 64 MiB also holds a problem list of 100k+.
MANIFEST_BYTES = 64 * safe_io.MiB
MAX_CLASSES = 10_000  # a classifier head of num_classes outputs is built from this value
MAX_NAME_CHARS = 256  # a class name, split name, shard name or member file name
MAX_SHARDS = 1_000_000
MAX_SAMPLES = 1_000_000_000  # samples in a shard, split or fraction: counts, never allocations
MAX_SHARD_BYTES = 1 << 40  # 1 TiB: compared with the file's size, never allocated
SHA256 = re.compile(r"[0-9a-f]{64}")
SPLIT_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")


class Manifest(dict):
    """A validated manifest.json: still the dict every reader indexes, with the fields a run uses by name.

    A run reads it once (tltrain.runner) and hands it to the loaders and the checksum check, which otherwise read
    it themselves; treat it as read-only."""

    @property
    def num_classes(self) -> int:
        return int(self["num_classes"])

    @property
    def classes(self) -> list:
        return self["classes"]

    @property
    def shards(self) -> list[dict]:
        return self["shards"]

    @property
    def splits(self) -> dict:
        return self["splits"]

    @property
    def fractions(self) -> dict:
        return self.get("fractions", {})


def manifest_path(shard_dir: str | Path) -> Path:
    return Path(shard_dir) / MANIFEST_NAME


def load_manifest(shard_dir: str | Path, *, missing_hint: str = "run `tltrain prepare` first") -> Manifest:
    """The validated manifest of `shard_dir`; DataError naming the file and the first bad value otherwise."""
    path = manifest_path(shard_dir)
    if not path.exists() and not path.is_symlink():
        raise DataError(f"{path}: not found ({missing_hint})")
    manifest = safe_io.load_json(path, MANIFEST_BYTES, "manifest")
    validate_manifest(manifest, Path(shard_dir), str(path))
    return Manifest(manifest)


def validate_manifest(manifest, shard_dir: Path, where: str) -> None:
    """Check every value a tltrain reader uses (see the module docstring); raises DataError naming the key."""
    if not isinstance(manifest, dict):
        raise DataError(f"{where}: expected a JSON object")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{where}: format {safe_io.printable(repr(manifest.get('format')), 100)} is not "
                        f"{MANIFEST_FORMAT!r} (not a folder written by `tltrain prepare`, or by another version)")
    num_classes = _whole(manifest.get("num_classes"), f"{where}: num_classes", 1, MAX_CLASSES)
    classes = _names(manifest.get("classes"), f"{where}: classes", MAX_CLASSES)
    if len(classes) != num_classes:
        raise DataError(f"{where}: num_classes={num_classes} but {len(classes)} classes are listed")
    if "class_names" in manifest:  # their count against num_classes is export's check (it names the head too)
        _names(manifest["class_names"], f"{where}: class_names", MAX_CLASSES)
    shards = _shards(manifest.get("shards"), shard_dir, where)
    _splits(manifest.get("splits"), num_classes, where)
    _fractions(manifest.get("fractions", {}), {s["name"] for s in shards}, num_classes, where)
    for key in ("source", "options", "counts", "members", "tool", "split_origin", "ungradable", "sources", "left_out",
                "duplicates", "disc_near_threshold"):
        if key in manifest and not isinstance(manifest[key], dict):
            raise DataError(f"{where}: {key} must be a JSON object")
    if not isinstance(manifest.get("problems", []), list):
        raise DataError(f"{where}: problems must be a list")


def _whole(value, where: str, low: int = 0, high: int = MAX_SAMPLES) -> int:
    return safe_io.finite_number(value, where, low, high, integer=True)


def _text(value, where: str, pattern: re.Pattern | None = None) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS or "\x00" in value \
            or (pattern is not None and not pattern.fullmatch(value)):
        raise DataError(f"{where} must be a non-empty name of at most {MAX_NAME_CHARS} characters, "
                        f"not {safe_io.printable(repr(value), 100)}")
    return value


def _names(value, where: str, limit: int) -> list[str]:
    if not isinstance(value, list) or len(value) > limit:
        raise DataError(f"{where} must be a list of at most {limit:,} names")
    return [_text(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _counts(value, where: str, length: int) -> list[int]:
    """Per-class counts: bounded whole numbers. A list of another length than num_classes is left to verify
    (which names both) and export (which names the checkpoint's head)."""
    if not isinstance(value, list) or len(value) > MAX_CLASSES:
        raise DataError(f"{where} must be a list of at most {MAX_CLASSES:,} counts (one per class)")
    return [_whole(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _shards(value, shard_dir: Path, where: str) -> list[dict]:
    if not isinstance(value, list) or not value or len(value) > MAX_SHARDS:
        raise DataError(f"{where}: shards must be a non-empty list of at most {MAX_SHARDS:,} entries")
    names = set()
    for number, shard in enumerate(value):
        at = f"{where}: shards[{number}]"
        if not isinstance(shard, dict):
            raise DataError(f"{at} must be a JSON object")
        name = safe_io.plain_name(shard.get("name"), where=at, what="shard name")
        if len(name) > MAX_NAME_CHARS or name in names:
            raise DataError(f"{at}: shard name {safe_io.printable(repr(name), 100)} is too long or listed twice")
        names.add(name)
        for part in ("tar", "index"):
            _text(shard.get(part), f"{at}.{part}")
            safe_io.inside(shard_dir, shard[part], f"{where}: shard {part} entry")
        _text(shard.get("split"), f"{at}.split", SPLIT_NAME)
        if "tier" in shard:
            _text(shard["tier"], f"{at}.tier", SPLIT_NAME)
        _whole(shard.get("count"), f"{at}.count")
        _whole(shard.get("bytes"), f"{at}.bytes", 0, MAX_SHARD_BYTES)
        if not isinstance(shard.get("sha256"), str) or not SHA256.fullmatch(shard["sha256"]):
            raise DataError(f"{at}.sha256 must be 64 lowercase hex digits")
    return value


def _splits(value, num_classes: int, where: str) -> None:
    if not isinstance(value, dict) or len(value) > 64:
        raise DataError(f"{where}: splits must be a JSON object of at most 64 splits")
    for split, info in value.items():
        at = f"{where}: splits.{_text(split, f'{where}: split name', SPLIT_NAME)}"
        if not isinstance(info, dict):
            raise DataError(f"{at} must be a JSON object")
        _whole(info.get("count"), f"{at}.count")
        _counts(info.get("class_counts"), f"{at}.class_counts", num_classes)
        if "patients" in info:
            _whole(info["patients"], f"{at}.patients")


def _fractions(value, shard_names: set[str], num_classes: int, where: str) -> None:
    if not isinstance(value, dict) or len(value) > 1000:
        raise DataError(f"{where}: fractions must be a JSON object of at most 1000 fractions")
    for key, info in value.items():
        at = f"{where}: fractions.{safe_io.printable(key, 40)}"
        try:
            fraction = float(key)
        except ValueError:
            fraction = float("nan")
        if not 0 < fraction <= 1 or len(key) > 32:
            raise DataError(f"{at}: a fraction must be a number in (0, 1]")
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            raise DataError(f"{at} must be a JSON object with a list of shards")
        unknown = [s for s in info["shards"] if not isinstance(s, str) or s not in shard_names]
        if unknown:
            raise DataError(f"{at}: shard {safe_io.printable(repr(unknown[0]), 100)} is not in the shard list")
        if "count" in info:
            _whole(info["count"], f"{at}.count")
        if "class_counts" in info:
            _counts(info["class_counts"], f"{at}.class_counts", num_classes)
