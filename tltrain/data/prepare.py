"""`tltrain prepare`: a raw dataset -> checked records -> patient-level splits and nested fractions -> shards.

The order matters: every image is opened and fully decoded (and its disc located) before a single shard is
written, so by default a dataset with problems stops with the complete list and nothing on disk changes. With
`on_problem=skip` the good samples are written and the problems land in problems.json/.csv beside the manifest.
The plan (which sample goes into which shard) is a pure function of the inputs and options, so an interrupted
run that is started again keeps its finished shards and writes only the missing ones.
"""
from __future__ import annotations

import csv
import datetime as dt
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from omegaconf import MISSING
from PIL import Image

import tltrain
from tltrain import safe_io
from tltrain.safe_io import is_number
from tltrain.data.decode import (DECODE_RULE, JPEG_FORMATS, MAX_PIXELS, decode_image, encode_png, open_image,
                                 passes_through)
from tltrain.data.manifest import MANIFEST_FORMAT, MANIFEST_NAME
from tltrain.data.pool import pool_map
from tltrain.data.shards import ShardSample, finished, write_shard
from tltrain.data.datasets import Dataset, find_duplicates, read_dataset, source_config
from tltrain.data.sources import Problem, Record, SourceConfig
from tltrain.data.splits import assign_splits, nested_fractions, tier_name
from tltrain.errors import ConfigError, DataError, choices_error

OWNER_FILE = ".tltrain-prepare.json"  # which source an `out` folder's shards come from (written before any shard)
MAX_RESIZE = 16_384  # longest:N only shrinks; radius:N scales the disc square to 2N: kept under decode.MAX_PIXELS
MAX_SHARD_SAMPLES = 1_000_000
MAX_WORKERS = 1024
ON_PROBLEM = ("fail", "skip")
DUPLICATES = ("drop", "keep")
PHASES = ("all", "check", "write", "finish")
WORK_DIR = ".prepare"  # per-task inspection results of a split prepare (removed by the finish phase)
SHARD_NAME = re.compile(r"^(train|val|test)-(f\d{3}|all)-\d{6}$")


@dataclass
class PrepareConfig:
    source: SourceConfig | None = field(default_factory=SourceConfig)  # one source (None when `sources` is given)
    #: Several sources in one dataset, by name (`'sources=[eyepacs,aptos2019]'`, configs/sources/): the name
    #: starts every key of the source and is each sample's `dataset` (tltrain.data.datasets).
    sources: dict[str, Any] = field(default_factory=dict)  # name -> SourceConfig (a mapping is converted)
    classes: list[str] | None = None  # the dataset's label set; None: the (first) source's; others map onto it
    duplicates: str = "drop"  # drop: a byte-identical copy of an image already in the set is left out (listed) | keep
    out: str = MISSING  # output folder for shards, index files and manifest.json
    val_fraction: float = 0.1  # share of patients in the validation split
    test_fraction: float = 0.1  # share of patients in the test split
    fractions: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.25, 0.4, 0.6, 0.8, 1.0])  # nested train subsets
    seed: int = 0
    shard_samples: int = 1000  # samples per shard at most
    shard_mb: float = 0.0  # >0: also cap a shard's size (MB of source files)
    resize: str = "none"  # none (original bytes) | longest:N | radius:N (Ben Graham radius scaling + disc crop)
    jpeg_quality: int = 90  # re-encoding quality when resizing
    on_problem: str = "fail"  # fail: stop before writing, listing every problem | skip: write good samples + report
    workers: int = 0  # processes; 0 = every core this process may use (a SLURM task: its --cpus-per-task)
    progress: bool = True
    phase: str = "all"  # all | check | write | finish: the steps of a prepare split across cluster tasks
    task: str = "0/1"  # i/K: this process is task i of K (check and write phases); see run_prepare
    replace: bool = False  # true: `out` may hold another dataset's shards and manifest, which are replaced
    follow_links_outside: bool = False  # true: images reached through symlinks leading outside source.root are read

    def __post_init__(self) -> None:
        # typed as Any in the schema so that `+sources.mine.kind=csv` and `+sources.mine={kind: csv, ...}` compose
        # (Hydra cannot add a key to a dict of structured configs); each entry becomes a SourceConfig here
        self.sources = {name: source_config(entry, f"prepare.sources.{name}")
                        for name, entry in (self.sources or {}).items()}

    def validate(self) -> None:
        """Every value checked before anything is read or written: one ConfigError naming the key."""
        if (self.source is None) == (not self.sources):
            raise ConfigError("prepare: give one source (source=eyepacs source.root=...) or several "
                              "('sources=[eyepacs,aptos2019]' sources.eyepacs.root=...), not both")
        for source in [self.source] if self.source is not None else self.sources.values():
            source.validate()
        if self.classes is not None and (not self.classes or len(set(map(str, self.classes))) != len(self.classes)):
            raise ConfigError(f"prepare.classes={list(self.classes)} must be a non-empty list of distinct values")
        if self.duplicates not in DUPLICATES:
            raise choices_error("prepare.duplicates", self.duplicates, DUPLICATES)
        if self.on_problem not in ON_PROBLEM:
            raise choices_error("prepare.on_problem", self.on_problem, ON_PROBLEM)
        _number("val_fraction", self.val_fraction, 0, 1)
        _number("test_fraction", self.test_fraction, 0, 1)
        if not (self.val_fraction < 1 and self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ConfigError("prepare.val_fraction and test_fraction must be in [0, 1) and leave room for training")
        if not self.fractions or any(not is_number(f) or not 0 < f <= 1 for f in self.fractions):
            raise ConfigError(f"prepare.fractions={list(self.fractions)} must be a non-empty list of numbers in (0, 1]")
        _number("shard_samples", self.shard_samples, 1, MAX_SHARD_SAMPLES, integer=True)
        _number("shard_mb", self.shard_mb, 0, 1e7)
        _number("jpeg_quality", self.jpeg_quality, 1, 100, integer=True)
        _number("workers", self.workers, 0, MAX_WORKERS, integer=True)
        _number("seed", self.seed, 0, 2**63 - 1, integer=True)
        parse_resize(self.resize)
        if self.phase not in PHASES:
            raise choices_error("prepare.phase", self.phase, PHASES)
        parse_task(self.task)


def _number(key: str, value, low: float, high: float, integer: bool = False) -> None:
    """prepare.<key> within [low, high] (a whole number when integer), else one ConfigError naming it."""
    ok = is_number(value) and (not integer or float(value).is_integer()) and low <= value <= high
    if not ok:
        kind = "a whole number" if integer else "a number"
        raise ConfigError(f"prepare.{key}={value!r} must be {kind} in [{low:g}, {high:g}]")


def parse_resize(spec: str) -> tuple[str, int]:
    """'none' | 'longest:N' | 'radius:N' -> (mode, N). radius:N writes a square of side 2N, so N is kept at most
    sqrt(decode.MAX_PIXELS) / 2 (3535): larger would give shards no reader may decode."""
    if spec == "none":
        return "none", 0
    mode, _, size = str(spec).partition(":")
    limit = {"longest": MAX_RESIZE, "radius": int(math.sqrt(MAX_PIXELS) / 2)}.get(mode)
    if limit and re.fullmatch(r"[0-9]{1,6}", size) and 0 < int(size) <= limit:
        return mode, int(size)
    raise ConfigError(f"prepare.resize={spec!r} is not valid; choose one of: none, longest:N (1 <= N <= "
                      f"{MAX_RESIZE}), radius:N (1 <= N <= {int(math.sqrt(MAX_PIXELS) / 2)})")


def parse_task(spec: str) -> tuple[int, int]:
    """'i/K' -> (i, K) with 0 <= i < K."""
    index, _, count = str(spec).partition("/")
    if index.isdigit() and count.isdigit() and 0 <= int(index) < int(count):
        return int(index), int(count)
    raise ConfigError(f"prepare.task={spec!r} is not valid; expected i/K with 0 <= i < K, e.g. task=0/4")


class PlanEntry(NamedTuple):
    """One sample of the plan. A tuple, not a dict: tens of thousands are held until the shards are written, and
    its strings are the Record's own objects."""
    key: str
    name: str
    file: str
    patient: str
    label: int
    path: str
    grade_name: str
    width: int
    height: int
    disc: tuple
    keep_as: str | None
    bytes: int
    mtime_ns: int
    split: str
    extra: dict | None = None  # the source's other fields for this sample (sample .json)


class Inspection(NamedTuple):
    """inspect_image's result for a usable image, held compactly until planning (a problem is held as its text)."""
    width: int
    height: int
    disc: tuple
    keep_as: str | None
    sha256: str = ""  # of the file's bytes: byte-identical copies (within and across sources) are found by it
    fill: float = 0.0  # the region's IoU with its disc circle (tltrain.data.disc: accepted at MIN_FILL and above)


def _compact(result: dict) -> "Inspection | str":
    return result["problem"] if "problem" in result else Inspection(
        result["width"], result["height"], tuple(result["disc"]), result["keep_as"], result.get("sha256", ""),
        result.get("fill", 0.0))


# -- per-image work (runs in worker processes) ------------------------------------------------------------------
def inspect_image(path: str) -> dict:
    """Decode fully by the shared rule (tltrain.data.decode: EXIF orientation, 16-bit, alpha, ...) and locate the
    disc in those oriented pixels; {'width','height','disc','keep_as'} or {'problem'}. keep_as names the member
    ('jpg'/'png') when the file's own bytes can go into the shard, None when it must be re-encoded."""
    from tltrain.data.disc import locate_disc_fit  # here, not at the top: scipy.ndimage would slow every config
    # composition (`tltrain submit` checks a run through the config schemas, which import this module)

    try:
        with open_image(path) as img:  # over the pixel limit, or several frames: refused here, from the header
            keep_as = ("jpg" if img.format in JPEG_FORMATS else "png") if passes_through(img) else None
        img = decode_image(path, path)  # truncated or corrupt files fail here, not in the middle of training
    except DataError as exc:  # the rule's own refusals name the file: the problem line names it once
        return {"problem": str(exc).removeprefix(f"{path}: ")}
    except Exception as exc:  # PIL raises several types for bad files; the reason text names the cause
        return {"problem": f"cannot decode image ({type(exc).__name__}: {exc})"}
    fit = locate_disc_fit(img)
    if fit.problem:
        return {"problem": f"no fundus disc found ({fit.problem})"}
    return {"width": img.size[0], "height": img.size[1], "disc": fit.disc, "keep_as": keep_as,
            "sha256": safe_io.sha256_file(path), "fill": round(float(fit.fill), 4)}


def _resized_sample(path: str, disc, mode: str, size: int, quality: int):
    """Re-encoded image bytes and the disc in the new pixel grid (decoded by the shared rule first)."""
    from tltrain.data.disc import disc_square

    img = decode_image(path, path)
    cx, cy, r = disc
    if mode == "longest":
        scale = min(1.0, size / max(img.size))
        if scale < 1.0:
            img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.BICUBIC, reducing_gap=2.0)
        new_disc = (cx * scale, cy * scale, r * scale)
    else:  # radius: scale the disc radius to `size` and keep the part of the disc square inside the photo: the
        # loaders' crop then knows where the photo ends (zero weight beyond, tltrain.preprocess), as with originals
        x0, y0, side = disc_square(disc)
        left, top = max(0, x0), max(0, y0)
        right, bottom = min(img.size[0], x0 + side), min(img.size[1], y0 + side)
        scale = 2 * size / side
        width, height = max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale))
        img = img.crop((left, top, right, bottom)).resize((width, height), Image.BICUBIC, reducing_gap=2.0)
        sx, sy = width / (right - left), height / (bottom - top)
        new_disc = ((x0 - left) * sx + size, (y0 - top) * sy + size, float(size))
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue(), new_disc, img.size


def _encode_image(job):
    """One stored image (bytes, disc, size): the original bytes, or decoded, resized and re-encoded."""
    path, disc, width, height, keep_as, resize, quality = job
    mode, size = parse_resize(resize)
    if mode == "none" and keep_as:  # bytes every decoder turns into the rule's pixels: kept as they are
        return Path(path).read_bytes(), disc, (width, height), keep_as
    if mode == "none":  # 16-bit, alpha, palette, CMYK, TIFF, oriented PNG: the rule's pixels, lossless PNG
        return encode_png(decode_image(path, path)), disc, (width, height), "png"
    image, new_disc, new_size = _resized_sample(path, disc, mode, size, quality)
    return image, new_disc, new_size, "jpg"


def _shard_sample(e: PlanEntry, encoded) -> ShardSample:
    image, disc, (w, h), ext = encoded
    meta = {"key": e.key, "name": e.name, "file": e.file, "patient": e.patient, "label": e.label,
            "grade_name": e.grade_name, "source": e.path, "width": w, "height": h,
            "disc": [round(v, 3) for v in disc], **(e.extra or {})}
    return ShardSample(e.key, e.label, image, tuple(disc), meta, image_ext=ext)


def _parallel(fn, jobs, workers: int, progress: bool, desc: str, convert=lambda result: result) -> list:
    from tqdm import tqdm

    results = []
    with tqdm(total=len(jobs), desc=desc, disable=None if progress else True) as bar:
        for result in pool_map(fn, jobs, workers):
            results.append(convert(result))
            bar.update()
    return results


def _write_shards(out: Path, todo: list[tuple[str, str, list[PlanEntry]]], cfg: "PrepareConfig") -> list[dict]:
    """Write the shards of `todo` [(name, plan_hash, entries)]: images are decoded/resized/encoded per image
    across the pool, and each tar is written here in plan order once its samples are in, so one shard's images
    are in memory at a time whatever the worker count."""
    from tqdm import tqdm

    mode, _ = parse_resize(cfg.resize)
    count = sum(len(entries) for _, _, entries in todo)
    jobs = ((e.path, e.disc, e.width, e.height, e.keep_as, cfg.resize, cfg.jpeg_quality)
            for _, _, entries in todo for e in entries)  # drawn as the pool goes: never all held at once
    copy_only = mode == "none" and all(e.keep_as for _, _, entries in todo for e in entries)  # byte copies: no pool
    encoded = map(_encode_image, jobs) if copy_only else pool_map(_encode_image, jobs, cfg.workers, count=count)
    records = []
    with tqdm(total=count, desc="writing shards", disable=None if cfg.progress else True) as bar:
        for name, plan_hash, entries in todo:
            samples = []
            for entry in entries:
                samples.append(_shard_sample(entry, next(encoded)))
                bar.update()
            records.append(write_shard(out, name, samples, plan_hash))
    return records


# -- planning -----------------------------------------------------------------------------------------------------
def _plan_shards(groups: dict[str, list[PlanEntry]], cfg: PrepareConfig) -> list[tuple[str, list[PlanEntry]]]:
    """Shuffle each (split, tier) group once with the seed, then cut it into shards."""
    plan = []
    for group_name in sorted(groups):
        entries = sorted(groups[group_name], key=lambda e: e.key)
        digest = int(hashlib.sha256(group_name.encode()).hexdigest()[:8], 16)
        order = np.random.default_rng(np.random.SeedSequence([cfg.seed, digest])).permutation(len(entries))
        limit_bytes = cfg.shard_mb * 1e6 if cfg.shard_mb > 0 else float("inf")
        shards, current, current_bytes = [], [], 0
        for index in order:
            entry = entries[index]
            if current and (len(current) >= cfg.shard_samples or current_bytes + entry.bytes > limit_bytes):
                shards.append(current)
                current, current_bytes = [], 0
            current.append(entry)
            current_bytes += entry.bytes
        if current:
            shards.append(current)
        plan += [(f"{group_name}-{number:06d}", shard) for number, shard in enumerate(shards)]
    return plan


def _plan_hash(entries: list[PlanEntry], cfg: PrepareConfig) -> str:
    """Changes when anything that shapes the shard's bytes changes: inputs (path, size, mtime) or options."""
    spec = {"resize": cfg.resize, "decode": DECODE_RULE, "quality": cfg.jpeg_quality if cfg.resize != "none" else None,
            "entries": [(e.key, e.label, e.path, e.bytes, e.mtime_ns) for e in entries]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _write_problems(out: Path, problems: list[Problem]) -> None:
    """problems.json/.csv beside the manifest; removed on a clean run so an old report never lingers."""
    if not problems:
        for name in ("problems.json", "problems.csv"):
            (out / name).unlink(missing_ok=True)
        return
    safe_io.atomic_write_json(out / "problems.json", [asdict(p) for p in problems])
    with safe_io.atomic_open(out / "problems.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "reason"])
        writer.writerows((safe_io.csv_cell(p.file), safe_io.csv_cell(p.reason)) for p in problems)


def _clean_stale(out: Path, planned: set[str], own: set[str] | None = None) -> None:
    """Temporary files of an interrupted run, and shards of an older plan, must not be mistaken for data.
    own: in a split prepare, only this task's shards' temporary files (the other tasks are writing theirs)."""
    for path in out.glob(".*.tmp"):
        if own is None or path.name[1:].split(".", 1)[0] in own:
            path.unlink(missing_ok=True)
    for path in out.iterdir():
        stem = path.name.split(".", 1)[0]
        if SHARD_NAME.match(stem) and stem not in planned:
            path.unlink(missing_ok=True)


def _check_file(out: Path, index: int, count: int) -> Path:
    return out / WORK_DIR / f"check-{index:05d}-of-{count:05d}.json"


def _inspect(cfg: PrepareConfig, records: list[Record], out: Path) -> list:
    """Every record's inspection (an Inspection, or the problem's text), in record order: computed here (phase
    all), by this task for records i::K (phase check: saved), or read back from the K tasks' files (phases write
    and finish)."""
    index, count = parse_task(cfg.task)
    paths = [r.path for r in records]
    if cfg.phase == "all":
        return _parallel(inspect_image, paths, cfg.workers, cfg.progress, "checking images", convert=_compact)
    if cfg.phase == "check":
        mine = _parallel(inspect_image, paths[index::count], cfg.workers, cfg.progress, "checking images")
        target = _check_file(out, index, count)
        safe_io.atomic_write_json(target, {"paths": paths[index::count], "results": mine})
        return [_compact(result) for result in mine]
    if cfg.phase == "finish":  # one process after the K tasks: K is read off their file names
        counts = {int(p.stem.rsplit("-", 1)[1]) for p in (out / WORK_DIR).glob("check-*-of-*.json")}
        if len(counts) != 1:
            raise DataError(f"{out / WORK_DIR}: expected the check files of one split prepare, found task counts "
                            f"{sorted(counts) or 'none'}; run the check and write phases first")
        count = counts.pop()
    inspected: list = [None] * len(records)
    for task in range(count):
        target = _check_file(out, task, count)
        try:
            saved = safe_io.load_json(target, what="check file")
            if not isinstance(saved, dict) or not isinstance(saved.get("results"), list):
                raise DataError(f"{target}: not a check file")
        except (OSError, DataError):
            raise DataError(f"{target}: missing or unreadable; run "
                            f"`tltrain prepare ... phase=check task={task}/{count}`"
                            " first (every check task must finish before the write phase)") from None
        if saved["paths"] != paths[task::count]:
            raise DataError(f"{target}: written for another source listing; run the check phase again")
        inspected[task::count] = [_compact(result) for result in saved["results"]]
    return inspected


def run_prepare(cfg: PrepareConfig) -> dict | None:
    """Write shards + manifest.json for cfg.source into cfg.out; returns the manifest.

    phase=all does everything in this process. On a cluster the same work is split over K tasks (`task=i/K`):
    check (task i inspects records i, i+K, ...), write (every task computes the same plan from all the check
    results, and task i writes planned shards i, i+K, ...), finish (one process: all shards present, manifest,
    verify). The plan and the shards depend only on the source and the options, never on K, so the shards are
    byte-identical to a one-process prepare. check and write return None.
    """
    cfg.validate()
    # every path the manifest and the samples' .json record is absolute: they must not depend on the folder
    # prepare ran in (a run elsewhere, `verify`, `report` read them)
    cfg = replace(cfg, out=os.path.abspath(cfg.out),
                  source=None if cfg.source is None else replace(cfg.source, root=os.path.abspath(cfg.source.root)),
                  sources={name: replace(source, root=os.path.abspath(source.root))
                           for name, source in cfg.sources.items()})
    out = Path(cfg.out)
    check_writable(out)
    try:
        return _run_prepare(cfg, out)
    except OSError as exc:  # a full disk, a folder made read-only meanwhile, a file vanishing: one line, exit 2
        raise _os_problem(exc, out) from None


def _run_prepare(cfg: PrepareConfig, out: Path) -> dict | None:
    source = read_dataset(cfg.source, cfg.sources, cfg.classes, cfg.follow_links_outside)
    identity = source_identity(source.description)
    claim_out(out, identity, cfg.replace, write=False)  # refused now, not after hours of checking images
    problems = list(source.problems)
    records = source.records
    if cfg.phase == "check":
        claim_out(out, identity, cfg.replace, write=True, whole=False)
    inspected = _inspect(cfg, records, out)
    if cfg.phase == "check":
        return None
    good: list[tuple[Record, Inspection]] = []
    for record, info in zip(records, inspected):
        if isinstance(info, str):
            problems.append(Problem(record.path, info))
            source.source_of_problem.append(record.extra["dataset"])
        else:
            good.append((record, info))
    del inspected
    good, duplicates = find_duplicates(good, source.classes, keep=cfg.duplicates == "keep")
    near = _near_threshold(good)
    if near["count"] and cfg.phase in ("all", "finish"):
        print(f"note: {near['count']} image(s) were accepted with a disc fill within {near['margin']:g} of the "
              f"{near['min_fill']:g} threshold (lowest {min(s['fill'] for s in near['samples']):.2f}): look at them "
              "(manifest.json disc_near_threshold)", flush=True)
    if problems and cfg.on_problem == "fail":
        listing = "\n".join(f"  - {p}" for p in problems)
        raise DataError(f"{len(problems)} problem(s) in {source.description.get('root')}; nothing was written "
                        f"(fix them, or pass on_problem=skip to write the good samples):\n{listing}", problems)
    if not good:
        raise DataError(f"{source.description.get('root')}: no usable samples ({len(problems)} problems)", problems)

    plan, fractions, split_how = _plan(cfg, source, good)
    if split_how["moved_patients"] and cfg.phase in ("all", "finish"):
        print(f"warning: {split_how['moved_patients']} patient(s) ({split_how['moved_images']} images) appear in two "
              "official splits of the source; each was kept wholly in the later split (train < val < test) so no "
              "patient crosses splits (manifest.json split_origin)", flush=True)
    del good  # the plan holds what the shards need
    out.mkdir(parents=True, exist_ok=True)
    if cfg.phase != "finish":
        claim_out(out, identity, cfg.replace, write=True, whole=cfg.phase == "all")
    hashes = {name: _plan_hash(entries, cfg) for name, entries in plan}
    index, count = parse_task(cfg.task)
    mine = plan if cfg.phase == "all" else plan[index::count]
    if cfg.phase != "finish":
        _clean_stale(out, {name for name, _ in plan}, None if cfg.phase == "all" else {name for name, _ in mine})
        todo = [(name, hashes[name], entries) for name, entries in mine if finished(out, name, hashes[name]) is None]
        if len(todo) < len(mine):
            print(f"resuming: {len(mine) - len(todo)} of {len(mine)} shards already written", flush=True)
        _write_shards(out, todo, cfg)
        if cfg.phase == "write":
            return None
    done = {name: finished(out, name, hashes[name]) for name, _ in plan}
    missing = [name for name, record in done.items() if record is None]
    if missing:
        raise DataError(f"{out}: {len(missing)} of {len(plan)} planned shards are missing or stale "
                        f"(e.g. {missing[0]}); run the write phase (all its tasks) again")
    manifest = _manifest(cfg, source, plan, done, problems, fractions, split_how, duplicates)
    manifest["disc_near_threshold"] = near
    _write_problems(out, problems)
    safe_io.atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=1))
    if cfg.phase == "finish":
        from tltrain.data.verify import verify_shards

        verify_shards(out, workers=cfg.workers)
        shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    return manifest


# -- the output folder ------------------------------------------------------------------------------------------
def check_writable(out: Path) -> None:
    """out, or the nearest folder above it that exists, takes a new file: a read-only or unwritable place is one
    DataError before any image is read (an unnamed temporary file, gone when closed, is the probe)."""
    folder = out
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise DataError(f"out={out}: {folder} is not a folder; choose a folder for out=")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise _os_problem(exc, out, folder) from None


def _os_problem(exc: OSError, out: Path, where: Path | None = None) -> DataError:
    reasons = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM:
               "operation not permitted", errno.ENOSPC: "no space left on the device", errno.EDQUOT:
               "disk quota exceeded"}
    reason = reasons.get(exc.errno, exc.strerror or type(exc).__name__)
    target = Path(exc.filename or where or out)
    writing = target.resolve() == out.resolve() or out.resolve() in target.resolve().parents or where is not None
    advice = "; choose a writable folder for out=" \
        if writing and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else ""
    return DataError(f"{target}: {reason} (prepare out={out}){advice}")


def source_identity(description: dict) -> dict:
    """What makes two prepares "the same dataset": the source kind, its root and (CSV kinds) the labels CSV and
    image folder, as resolved paths. Options (resize, fractions, seed...) may change between runs of the same
    dataset: its shards are then rewritten, as a re-run always did."""
    if isinstance(description.get("sources"), dict):  # several sources: each one's identity, by name
        return {"kind": "multi", "root": description.get("root"),
                "sources": {name: source_identity(part) for name, part in description["sources"].items()
                            if isinstance(part, dict)}}
    identity = {"kind": description.get("kind"), "root": description.get("root")}
    for key in ("labels_csv", "image_dir"):
        if description.get(key):
            identity[key] = str(Path(str(description[key])).resolve())
    return identity


def _owner(out: Path):
    """The identity of the dataset in `out`: from OWNER_FILE, else from an existing manifest's source (folders
    written before OWNER_FILE existed); "unreadable" when either is there but cannot be read; None when out
    holds neither."""
    for name in (OWNER_FILE, MANIFEST_NAME):
        path = out / name
        if not (path.exists() or path.is_symlink()):
            continue
        try:
            value = safe_io.load_json(path, safe_io.MiB if name == OWNER_FILE else safe_io.JSON_LIMIT)
        except (OSError, DataError):
            return "unreadable"
        if name == MANIFEST_NAME:
            value = value.get("source") if isinstance(value, dict) else None
            return source_identity(value) if isinstance(value, dict) else "unreadable"
        return value
    return None


def _dataset_files(out: Path) -> list[Path]:
    """The files of a prepared dataset in `out`: manifest, problem reports and every shard file (by its name)."""
    if not out.is_dir():
        return []
    return [path for path in out.iterdir()
            if path.name in (MANIFEST_NAME, "problems.json", "problems.csv")
            or SHARD_NAME.match(path.name.lstrip(".").split(".", 1)[0])]


def claim_out(out: Path, identity: dict, replace: bool, *, write: bool, whole: bool = True) -> None:
    """Refuse an `out` that holds another dataset's shards or manifest (DataError) unless replace; with write,
    remove that dataset's files (replace) and record this dataset as the folder's owner before any shard.
    whole=False (the tasks of a split prepare, which run side by side) leaves the work folder alone."""
    owner = _owner(out)
    foreign = owner != identity if owner is not None else bool(_dataset_files(out))
    if foreign and not replace:
        what = owner.get("root") if isinstance(owner, dict) else "an unknown source" if owner is None else \
            "a source it cannot tell (its manifest is unreadable)"
        raise DataError(f"out={out}: holds the shards of another dataset (from {safe_io.printable(what, 300)}); "
                        "nothing was written. Pass replace=true to replace them, or choose another out")
    if not write:
        return
    if foreign:
        for path in _dataset_files(out):
            path.unlink(missing_ok=True)
        if whole:
            shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    if owner != identity:
        safe_io.atomic_write_json(out / OWNER_FILE, identity)


def _plan(cfg: PrepareConfig, source: Dataset, good: list[tuple[Record, Inspection]]):
    """(plan, fractions, how the splits were made): each source's official splits or patient-level ones (tltrain.
    data.splits.assign_splits, per source: so splits are stratified by source and grade, and a source without a
    test split gets one even when another source has its own), nested train tiers stratified the same way, then
    shards: a pure function of the inputs."""
    splits, how = {}, {"origin": {}, "moved_patients": 0, "moved_images": 0}
    by_source: dict[str, list[Record]] = {name: [] for name in source.names}
    for record, _ in good:
        by_source[record.extra["dataset"]].append(record)
    for name, records in by_source.items():
        if not records:
            continue
        assignment, own = assign_splits(records, cfg.val_fraction, cfg.test_fraction, cfg.seed,
                                        source.split_origins.get(name))
        splits.update(assignment)
        how["moved_patients"] += own["moved_patients"]
        how["moved_images"] += own["moved_images"]
        if len(source.names) == 1:
            how["origin"] = own["origin"]
        else:
            how.setdefault("sources", {})[name] = own["origin"]
    if len(source.names) > 1:  # per split: one text when every source made it alike, else each source's
        for split in ("train", "val", "test"):
            texts = {name: origin[split] for name, origin in how["sources"].items() if split in origin}
            if texts:
                how["origin"][split] = next(iter(texts.values())) if len(set(texts.values())) == 1 else \
                    "; ".join(f"{name}: {text}" for name, text in texts.items())
    stratum = (lambda r: r.label) if len(source.names) == 1 else (lambda r: (r.extra["dataset"], r.label))
    tiers = nested_fractions([r for r, _ in good if splits[r.key] == "train"], list(cfg.fractions), cfg.seed,
                             stratum)
    fractions = sorted(set(tiers.values()))
    groups: dict[str, list[dict]] = {}
    for record, info in good:
        split = splits[record.key]
        group = f"train-{tier_name(tiers[record.key])}" if split == "train" else f"{split}-all"
        stat = Path(record.path).stat()
        groups.setdefault(group, []).append(PlanEntry(
            record.key, record.name, record.file, record.patient, record.label, record.path,
            source.class_names[record.label], info.width, info.height, info.disc, info.keep_as, stat.st_size,
            stat.st_mtime_ns, split, record.extra))
    return _plan_shards(groups, cfg), fractions, how


def _manifest(cfg, source: Dataset, plan, done, problems, fractions, split_how, duplicates) -> dict:
    n_classes = len(source.classes)
    shards, splits = [], {}
    for name, entries in plan:
        split, tier = name.split("-")[:2]
        record = done[name]
        shards.append({"name": name, "tar": record["tar"], "index": record["index"], "split": split, "tier": tier,
                       "count": record["count"], "bytes": record["bytes"], "sha256": record["sha256"]})
        info = splits.setdefault(split, {"count": 0, "class_counts": [0] * n_classes, "patients": set(),
                                         "sources": dict.fromkeys(source.names, 0)})
        info["count"] += len(entries)
        for e in entries:
            info["class_counts"][e.label] += 1
            info["patients"].add(e.patient)
            info["sources"][e.extra["dataset"]] += 1
    for info in splits.values():
        info["patients"] = len(info["patients"])
    fraction_info = {}
    for fraction in fractions:
        chosen = [s for s in shards if s["split"] == "train" and s["tier"] <= tier_name(fraction)]
        counts = [0] * n_classes
        for name, entries in plan:
            if any(s["name"] == name for s in chosen):
                for e in entries:
                    counts[e.label] += 1
        fraction_info[f"{fraction:g}"] = {"tier": tier_name(fraction), "count": sum(s["count"] for s in chosen),
                                          "class_counts": counts, "shards": [s["name"] for s in chosen]}
    written = sum(s["count"] for s in shards)
    return {
        "format": MANIFEST_FORMAT,
        "tool": {"name": "tltrain", "version": tltrain.__version__},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source.description,
        "options": {k: v for k, v in asdict(cfg).items()
                    if k not in ("source", "sources", "workers", "progress", "phase", "task", "replace")},
        "num_classes": n_classes,
        "classes": source.classes,
        "class_names": source.class_names,
        "counts": {"found": len(source.candidates), "written": written, "skipped": len(source.candidates) - written,
                   "problems": len(problems)},
        "splits": splits,
        "split_origin": split_how,
        "sources": _per_source(source, plan, duplicates),
        "ungradable": {"count": len(source.ungradable), "samples": [asdict(p) for p in source.ungradable]},
        "left_out": {"count": len(source.left_out), "samples": [asdict(p) for p in source.left_out]},
        "duplicates": {"count": len(duplicates), "left_out": sum(not d["kept"] for d in duplicates),
                       "across_sources": sum(d["dataset"] != d["same_as_dataset"] for d in duplicates),
                       "disagreeing_labels": sum(not d["agree"] for d in duplicates), "samples": duplicates},
        "fractions": fraction_info,
        "members": {"jpg": "encoded image: original JPEG bytes or a re-encode", "png": "lossless image (instead "
                    "of .jpg) where tltrain.data.decode re-encoded the file",
                    "cls": "label, ASCII decimal (webdataset convention)",
                    "lbl": "label, int32 little-endian (read by every tltrain loader)",
                    "disc": "disc cx, cy, r: 3 x float32 little-endian", "json": "sample metadata"},
        "shards": shards,
        "problems": [asdict(p) for p in problems],
    }


def _per_source(source: Dataset, plan, duplicates: list[dict]) -> dict:
    """manifest.json "sources": per source what was written (per split and class) and what was left out, and
    why: ungradable, a class mapped to null, a byte-identical copy, a problem."""
    roots = {name: (source.description.get("sources") or {}).get(name, source.description) for name in source.names}
    counts = {name: {"kind": roots[name].get("kind"), "root": roots[name].get("root"),
                     "found": sum(key.startswith(f"{name}:") for key in source.candidates)
                     if len(source.names) > 1 else len(source.candidates),
                     "written": 0, "splits": {}, "class_counts": [0] * len(source.classes), "ungradable": 0,
                     "left_out": 0, "duplicates_left_out": 0, "problems": source.source_of_problem.count(name)}
              for name in source.names}
    for _, entries in plan:
        for e in entries:
            info = counts[e.extra["dataset"]]
            info["written"] += 1
            info["splits"][e.split] = info["splits"].get(e.split, 0) + 1
            info["class_counts"][e.label] += 1
    for name, outcomes in source.outcomes.items():
        counts[name].update(outcomes)
    for duplicate in duplicates:
        counts[duplicate["dataset"]]["duplicates_left_out"] += not duplicate["kept"]
    return counts



def _near_threshold(good: list[tuple[Record, Inspection]]) -> dict:
    """manifest.json "disc_near_threshold": accepted images whose disc fill lies within NEAR_FILL_MARGIN of
    MIN_FILL (tltrain.data.disc.near_threshold), each with its fill: a photo that passed by a hair is worth a look
    (refused ones are problems whose text names their IoU)."""
    from tltrain.data.disc import MIN_FILL, NEAR_FILL_MARGIN, fill_near_threshold

    samples = [{"file": record.path, "fill": info.fill} for record, info in good if fill_near_threshold(info.fill)]
    return {"count": len(samples), "min_fill": MIN_FILL, "margin": NEAR_FILL_MARGIN, "samples": samples}
