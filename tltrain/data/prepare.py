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
import hashlib
import io
import json
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import MISSING
from PIL import Image

import tltrain
from tltrain.data.decode import DECODE_RULE, JPEG_FORMATS, decode_image, encode_png, open_image, passes_through
from tltrain.data.disc import disc_square, locate_disc_fit
from tltrain.data.shards import ShardSample, finished, write_shard
from tltrain.data.sources import Problem, Record, SourceConfig, read_source
from tltrain.data.splits import nested_fractions, split_by_patient, tier_name
from tltrain.errors import ConfigError, DataError, choices_error

MANIFEST_FORMAT = "tltrain-shards/1"
ON_PROBLEM = ("fail", "skip")
SHARD_NAME = re.compile(r"^(train|val|test)-(f\d{3}|all)-\d{6}$")


@dataclass
class PrepareConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    out: str = MISSING  # output folder for shards, index files and manifest.json
    val_fraction: float = 0.1  # share of patients in the validation split
    test_fraction: float = 0.1  # share of patients in the test split
    fractions: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.4, 0.6, 0.8, 1.0])  # nested train subsets
    seed: int = 0
    shard_samples: int = 1000  # samples per shard at most
    shard_mb: float = 0.0  # >0: also cap a shard's size (MB of source files)
    resize: str = "none"  # none (original bytes) | longest:N | radius:N (Ben Graham radius scaling + disc crop)
    jpeg_quality: int = 90  # re-encoding quality when resizing
    on_problem: str = "fail"  # fail: stop before writing, listing every problem | skip: write good samples + report
    workers: int = 0  # processes; 0 = all cores
    progress: bool = True

    def validate(self) -> None:
        self.source.validate()
        if self.on_problem not in ON_PROBLEM:
            raise choices_error("prepare.on_problem", self.on_problem, ON_PROBLEM)
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ConfigError("prepare.val_fraction and test_fraction must be in [0, 1) and leave room for training")
        if any(not 0 < f <= 1 for f in self.fractions):
            raise ConfigError(f"prepare.fractions={list(self.fractions)} must lie in (0, 1]")
        if self.shard_samples < 1:
            raise ConfigError("prepare.shard_samples must be >= 1")
        parse_resize(self.resize)


def parse_resize(spec: str) -> tuple[str, int]:
    """'none' | 'longest:N' | 'radius:N' -> (mode, N)."""
    if spec == "none":
        return "none", 0
    mode, _, size = spec.partition(":")
    if mode in ("longest", "radius") and size.isdigit() and int(size) > 0:
        return mode, int(size)
    raise ConfigError(f"prepare.resize={spec!r} is not valid; choose one of: none, longest:N, radius:N")


# -- per-image work (runs in worker processes) ------------------------------------------------------------------
def inspect_image(path: str) -> dict:
    """Decode fully by the shared rule (tltrain.data.decode: EXIF orientation, 16-bit, alpha, ...) and locate the
    disc in those oriented pixels; {'width','height','disc','keep_as'} or {'problem'}. keep_as names the member
    ('jpg'/'png') when the file's own bytes can go into the shard, None when it must be re-encoded."""
    try:
        with open_image(path) as img:
            keep_as = ("jpg" if img.format in JPEG_FORMATS else "png") if passes_through(img) else None
        img = decode_image(path, path)  # truncated or corrupt files fail here, not in the middle of training
    except Exception as exc:  # PIL raises several types for bad files; the reason text names the cause
        return {"problem": f"cannot decode image ({type(exc).__name__}: {exc})"}
    fit = locate_disc_fit(img)
    if fit.problem:
        return {"problem": f"no fundus disc found ({fit.problem})"}
    return {"width": img.size[0], "height": img.size[1], "disc": fit.disc, "keep_as": keep_as}


def _resized_sample(path: str, disc, mode: str, size: int, quality: int):
    """Re-encoded image bytes and the disc in the new pixel grid (decoded by the shared rule first)."""
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


def _write_one_shard(job) -> dict:
    out_dir, name, plan_hash, entries, resize, quality = job
    mode, size = parse_resize(resize)
    samples = []
    for e in entries:
        ext = "jpg"
        if mode == "none" and e["keep_as"]:  # bytes every decoder turns into the rule's pixels: kept as they are
            image, disc, (w, h) = Path(e["path"]).read_bytes(), e["disc"], (e["width"], e["height"])
            ext = e["keep_as"]
        elif mode == "none":  # 16-bit, alpha, palette, CMYK, TIFF, oriented PNG: the rule's pixels, lossless PNG
            ext, image = "png", encode_png(decode_image(e["path"], e["path"]))
            disc, (w, h) = e["disc"], (e["width"], e["height"])
        else:
            image, disc, (w, h) = _resized_sample(e["path"], e["disc"], mode, size, quality)
        meta = {"key": e["key"], "name": e["name"], "file": e["file"], "patient": e["patient"], "label": e["label"],
                "grade_name": e["grade_name"], "source": e["path"], "width": w, "height": h,
                "disc": [round(v, 3) for v in disc]}
        samples.append(ShardSample(e["key"], e["label"], image, tuple(disc), meta, image_ext=ext))
    return write_shard(Path(out_dir), name, samples, plan_hash)


def _parallel(fn, jobs, workers: int, progress: bool, desc: str) -> list:
    from tqdm import tqdm

    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(jobs), desc=desc, disable=None if progress else True)
    results = []
    try:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(fn(job))
                bar.update()
        else:
            with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
                for result in pool.map(fn, jobs, chunksize=max(1, min(64, len(jobs) // (workers * 4)))):
                    results.append(result)
                    bar.update()
    finally:
        bar.close()
    return results


# -- planning -----------------------------------------------------------------------------------------------------
def _plan_shards(groups: dict[str, list[dict]], cfg: PrepareConfig) -> list[tuple[str, list[dict]]]:
    """Shuffle each (split, tier) group once with the seed, then cut it into shards."""
    plan = []
    for group_name in sorted(groups):
        entries = sorted(groups[group_name], key=lambda e: e["key"])
        digest = int(hashlib.sha256(group_name.encode()).hexdigest()[:8], 16)
        order = np.random.default_rng(np.random.SeedSequence([cfg.seed, digest])).permutation(len(entries))
        limit_bytes = cfg.shard_mb * 1e6 if cfg.shard_mb > 0 else float("inf")
        shards, current, current_bytes = [], [], 0
        for index in order:
            entry = entries[index]
            if current and (len(current) >= cfg.shard_samples or current_bytes + entry["bytes"] > limit_bytes):
                shards.append(current)
                current, current_bytes = [], 0
            current.append(entry)
            current_bytes += entry["bytes"]
        if current:
            shards.append(current)
        plan += [(f"{group_name}-{number:06d}", shard) for number, shard in enumerate(shards)]
    return plan


def _plan_hash(entries: list[dict], cfg: PrepareConfig) -> str:
    """Changes when anything that shapes the shard's bytes changes: inputs (path, size, mtime) or options."""
    spec = {"resize": cfg.resize, "decode": DECODE_RULE, "quality": cfg.jpeg_quality if cfg.resize != "none" else None,
            "entries": [(e["key"], e["label"], e["path"], e["bytes"], e["mtime_ns"]) for e in entries]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _write_problems(out: Path, problems: list[Problem]) -> None:
    """problems.json/.csv beside the manifest; removed on a clean run so an old report never lingers."""
    if not problems:
        for name in ("problems.json", "problems.csv"):
            (out / name).unlink(missing_ok=True)
        return
    (out / "problems.json").write_text(json.dumps([asdict(p) for p in problems], indent=1))
    with open(out / "problems.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "reason"])
        writer.writerows((p.file, p.reason) for p in problems)


def _clean_stale(out: Path, planned: set[str]) -> None:
    """Temporary files of an interrupted run, and shards of an older plan, must not be mistaken for data."""
    for path in out.glob(".*.tmp"):
        path.unlink()
    for path in out.iterdir():
        stem = path.name.split(".", 1)[0]
        if SHARD_NAME.match(stem) and stem not in planned:
            path.unlink()


def run_prepare(cfg: PrepareConfig) -> dict:
    """Write shards + manifest.json for cfg.source into cfg.out; returns the manifest."""
    cfg.validate()
    source = read_source(cfg.source)
    problems = list(source.problems)
    records = source.records
    inspected = _parallel(inspect_image, [r.path for r in records], cfg.workers, cfg.progress, "checking images")
    good: list[tuple[Record, dict]] = []
    for record, info in zip(records, inspected):
        if "problem" in info:
            problems.append(Problem(record.path, info["problem"]))
        else:
            good.append((record, info))
    if problems and cfg.on_problem == "fail":
        listing = "\n".join(f"  - {p}" for p in problems)
        raise DataError(f"{len(problems)} problem(s) in {source.description.get('root')}; nothing was written "
                        f"(fix them, or pass on_problem=skip to write the good samples):\n{listing}", problems)
    if not good:
        raise DataError(f"{source.description.get('root')}: no usable samples ({len(problems)} problems)", problems)

    splits = split_by_patient([r for r, _ in good], cfg.val_fraction, cfg.test_fraction, cfg.seed)
    tiers = nested_fractions([r for r, _ in good if splits[r.key] == "train"], list(cfg.fractions), cfg.seed)
    fractions = sorted(set(tiers.values()))
    groups: dict[str, list[dict]] = {}
    for record, info in good:
        split = splits[record.key]
        group = f"train-{tier_name(tiers[record.key])}" if split == "train" else f"{split}-all"
        stat = Path(record.path).stat()
        groups.setdefault(group, []).append({
            "key": record.key, "name": record.name, "file": record.file, "patient": record.patient,
            "label": record.label, "path": record.path,
            "grade_name": source.class_names[record.label], "width": info["width"], "height": info["height"],
            "disc": info["disc"], "keep_as": info["keep_as"], "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "split": split})
    plan = _plan_shards(groups, cfg)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _clean_stale(out, {name for name, _ in plan})
    hashes = {name: _plan_hash(entries, cfg) for name, entries in plan}
    done = {name: finished(out, name, hashes[name]) for name, _ in plan}
    todo = [(str(out), name, hashes[name], entries, cfg.resize, cfg.jpeg_quality)
            for name, entries in plan if done[name] is None]
    if len(todo) < len(plan):
        print(f"resuming: {len(plan) - len(todo)} of {len(plan)} shards already written", flush=True)
    for record in _parallel(_write_one_shard, todo, cfg.workers, cfg.progress, "writing shards"):
        done[record["name"]] = record

    manifest = _manifest(cfg, source, plan, done, problems, fractions)
    _write_problems(out, problems)
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    return manifest


def _manifest(cfg, source, plan, done, problems, fractions) -> dict:
    n_classes = len(source.classes)
    shards, splits = [], {}
    for name, entries in plan:
        split, tier = name.split("-")[:2]
        record = done[name]
        shards.append({"name": name, "tar": record["tar"], "index": record["index"], "split": split, "tier": tier,
                       "count": record["count"], "bytes": record["bytes"], "sha256": record["sha256"]})
        info = splits.setdefault(split, {"count": 0, "class_counts": [0] * n_classes, "patients": set()})
        info["count"] += len(entries)
        for e in entries:
            info["class_counts"][e["label"]] += 1
            info["patients"].add(e["patient"])
    for info in splits.values():
        info["patients"] = len(info["patients"])
    fraction_info = {}
    for fraction in fractions:
        chosen = [s for s in shards if s["split"] == "train" and s["tier"] <= tier_name(fraction)]
        counts = [0] * n_classes
        for name, entries in plan:
            if any(s["name"] == name for s in chosen):
                for e in entries:
                    counts[e["label"]] += 1
        fraction_info[f"{fraction:g}"] = {"tier": tier_name(fraction), "count": sum(s["count"] for s in chosen),
                                          "class_counts": counts, "shards": [s["name"] for s in chosen]}
    written = sum(s["count"] for s in shards)
    return {
        "format": MANIFEST_FORMAT,
        "tool": {"name": "tltrain", "version": tltrain.__version__},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source.description,
        "options": {k: v for k, v in asdict(cfg).items() if k not in ("source", "workers", "progress")},
        "num_classes": n_classes,
        "classes": source.classes,
        "class_names": source.class_names,
        "counts": {"found": len(source.candidates), "written": written, "skipped": len(source.candidates) - written,
                   "problems": len(problems)},
        "splits": splits,
        "fractions": fraction_info,
        "members": {"jpg": "encoded image: original JPEG bytes or a re-encode", "png": "lossless image (instead "
                    "of .jpg) where tltrain.data.decode re-encoded the file",
                    "cls": "label, ASCII decimal (webdataset convention)",
                    "lbl": "label, int32 little-endian (read by every tltrain loader)",
                    "disc": "disc cx, cy, r: 3 x float32 little-endian", "json": "sample metadata"},
        "shards": shards,
        "problems": [asdict(p) for p in problems],
    }
