"""EyePACS at scale: synth -> prepare -> verify -> loader start-up -> one epoch (torch and DALI CPU), per N.

    .venv/bin/python benchmarks/bench_scale.py --n 1000 10000 --out /tmp/scale --json benchmarks/results/scale.json

Layout `kaggle` (default) mirrors the Kaggle release: train/ + trainLabels.csv (35,126 of 88,702 images) and
test/ + retinopathy_solution.csv (image,level,Usage; 53,576), scaled to N. tltrain's eyepacs source reads one
image folder and one label CSV, so the two parts are prepared as two sources into two shard folders
(shards/train: train/val/test by patient; shards/test: the Kaggle test set, prepared with
val_fraction=test_fraction=0, so it is the 'train' split of its own manifest). Loaders and the epoch use
shards/train. Images are 128 px wide so 88,702 fit a small disk. The epoch stage trains a tiny timm model
(resnet10t at 32 px, batch 32, random init) for one epoch over the train split on each backend (DALI on the CPU).

Reports per N and stage: seconds, images/s, the peak RSS of every process of the stage (this one and its
children, sampled every 0.1 s with psutil), plus the shard count and the manifest size. Every generated file is
deleted after each N unless --keep.

Quiet rule (benchmarks/quiet.py): it waits up to --quiet-wait s for a quiet machine, records the load before and
after and the other processes' CPU use in the JSON, and exits 3 when the figures are refused, unless --smoke
(also the default under pytest, as tests/test_bench_scale.py runs it: CI's machine is loaded). The loader start-up
(cheap) runs --repeats >= 3 times, the backends in turns: its seconds are the median, with `seconds_spread` and
`seconds_values` beside it (the first value also pays this process's one-time set-up), its RSS that of the first
round. The camera costs run in turns the same way
(`wall_spread`, `cpu_spread`). synth, prepare, verify and the epoch are single figures: each writes or reads the
whole data set once, so repeating them would multiply the run's length (hours at N = 88,702); their RSS is a peak,
not a rate, and the load check above is what keeps their seconds honest.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil

import quiet

KAGGLE_TRAIN, KAGGLE_TEST = 35_126, 53_576


class PeakRss:
    """Peak RSS per process (this one and all descendants) while the block runs."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.peaks, self._stop = interval, {}, threading.Event()

    def _sample(self):
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                key = f"{proc.pid}:{proc.name()}"
                self.peaks[key] = max(self.peaks.get(key, 0), proc.memory_info().rss)
            except psutil.Error:
                pass

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def report(self) -> dict:
        values = sorted(self.peaks.values(), reverse=True)
        main = self.peaks.get(f"{os.getpid()}:{psutil.Process().name()}", 0)
        return {"main_mb": round(main / 2**20, 1), "max_child_mb": round(max([v for k, v in self.peaks.items()
                if not k.startswith(f"{os.getpid()}:")] or [0]) / 2**20, 1),
                "processes": len(values), "all_mb": [round(v / 2**20, 1) for v in values]}


def stage(results: dict, name: str, images: int, fn):
    with PeakRss() as rss:
        start = time.perf_counter()
        extra = fn() or {}
        seconds = time.perf_counter() - start
    images = extra.pop("images", images)  # a stage may report what it really processed
    results[name] = {"seconds": round(seconds, 2), "images": images,
                     "images_per_s": round(images / seconds, 1) if seconds else None, "rss": rss.report(), **extra}
    print(f"  {name:14s} {images:7d} images {seconds:8.1f} s {results[name]['images_per_s']:9.1f} img/s  "
          f"main {rss.report()['main_mb']} MB, largest child {rss.report()['max_child_mb']} MB", flush=True)


def stages_in_turns(results: dict, stages: dict, images: int, repeats: int) -> None:
    """Cheap stages {name: fn}, run in turns `repeats` (>= 3) times each: the first round as stage() records it
    (RSS included), then seconds (and images_per_s) become the median of the rounds, with the spread beside."""
    first = {}

    def once(name, fn):
        if name not in first:
            stage(results, name, images, fn)
            first[name] = results[name]
            return first[name]["seconds"]
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    runs = quiet.interleaved({name: (lambda name=name, fn=fn: once(name, fn)) for name, fn in stages.items()},
                             repeats)
    for name, run in runs.items():
        row = results[name]
        row.update(seconds=round(run["median"], 2), seconds_spread=run["spread"],
                   seconds_values=[round(v, 2) for v in run["values"]],
                   images_per_s=round(row["images"] / run["median"], 1) if run["median"] else None)
        print(f"  {name:14s} median of {len(run['values'])}: {row['seconds']} s (spread {run['spread']})", flush=True)


def kaggle_split(n: int) -> tuple[int, int]:
    """(train, test) image counts in Kaggle's proportion, each even (two eyes per patient)."""
    train = 2 * round(n * KAGGLE_TRAIN / (KAGGLE_TRAIN + KAGGLE_TEST) / 2)
    return train, 2 * ((n - train) // 2)


def synth(root: Path, n: int, layout: str, width: int, workers: int) -> dict:
    from tltrain.data.synth import generate_eyepacs

    n_train, n_test = kaggle_split(n) if layout == "kaggle" else (2 * (n // 2), 0)
    generate_eyepacs(root, n_patients=n_train // 2, width=width, seed=1, workers=workers, progress=False)
    if n_test:
        tmp = root / ".test_part"
        generate_eyepacs(tmp, n_patients=n_test // 2, width=width, seed=2, workers=workers, progress=False)
        os.replace(tmp / "train", root / "test")
        with open(tmp / "trainLabels.csv") as src, open(root / "retinopathy_solution.csv", "w", newline="") as dst:
            rows = list(csv.reader(src))[1:]
            writer = csv.writer(dst)
            writer.writerow(["image", "level", "Usage"])
            writer.writerows([image, level, "Private" if i % 2 else "Public"] for i, (image, level) in enumerate(rows))
        shutil.rmtree(tmp)
    return {"train_images": n_train, "test_images": n_test}


def prepare_parts(root: Path, shards: Path, layout: str, workers: int, shard_samples: int) -> dict:
    from tltrain.data.prepare import PrepareConfig, run_prepare
    from tltrain.data.sources import SourceConfig

    # the two parts as two sources: a plain source=eyepacs reads train/ with the official test/ in one go; naming
    # the training CSV by its full path reads that set alone (tltrain/data/layouts/eyepacs.py)
    parts = {"train": (SourceConfig(kind="eyepacs", root=str(root), labels_csv=str(root / "trainLabels.csv")), {})}
    if layout == "kaggle":
        parts["test"] = (SourceConfig(kind="eyepacs", root=str(root), labels_csv="retinopathy_solution.csv",
                                      image_dir="test"), {"val_fraction": 0.0, "test_fraction": 0.0})
    info = {}
    for part, (source, options) in parts.items():
        manifest = run_prepare(PrepareConfig(source=source, out=str(shards / part), workers=workers, progress=False,
                                             shard_samples=shard_samples, **options))
        info[part] = {"shards": len(manifest["shards"]), "written": manifest["counts"]["written"],
                      "manifest_bytes": (shards / part / "manifest.json").stat().st_size,
                      "shard_bytes": sum(s["bytes"] for s in manifest["shards"])}
    return {"parts": info}


def verify_parts(shards: Path, workers: int) -> dict:
    from tltrain.data.verify import verify_shards

    return {"workers": workers or len(os.sched_getaffinity(0)),
            "verified": {p.name: verify_shards(p, workers=workers)["samples"] for p in sorted(shards.iterdir())}}


def _import_loaders(backends) -> None:
    import tltrain.data.loaders.torch_wds  # noqa: F401
    if "dali" in backends:
        import tltrain.data.loaders.dali  # noqa: F401
        import nvidia.dali.pipeline  # noqa: F401


def loader_start(shards: Path, backend: str) -> dict:
    """build_loader + the first batch: the time a run waits before its first step."""
    from tltrain.data.loaders import LoaderConfig, build_loader

    cfg = LoaderConfig(backend=backend, batch_size=64, size=32, workers=2, dtype="fp32")
    if backend == "dali":
        cfg.dali_device = "cpu"
    loader = build_loader(cfg, shards / "train", "train", train=True)
    next(iter(loader))
    return {"batches_per_epoch": len(loader)}


def epoch(shards: Path, backend: str, arch: str, size: int, batch: int, threads: int) -> dict:
    """One training epoch over the train split: the loader of `backend` (DALI on its CPU operators) feeding a tiny
    timm model (random init), SGD on every batch. The engine's own overhead is bench_trainer.py's concern; here the
    question is whether the input pipeline and a model step keep their rate as N grows. `images` is what the epoch
    trained on: train // batch full batches (both backends drop the last partial batch). `threads`: torch's
    intra-op threads for the model step. On a shared machine, OpenMP threads of one step wait for each other at
    every barrier, and one descheduled thread stalls the step: resnet10t at 32 px measured 0.08 s per step with
    one thread and 0.1-2.3 s with two on the loaded 2-core machine."""
    import torch
    import torch.nn.functional as F

    from tltrain.data.loaders import LoaderConfig, build_loader
    from tltrain.models import create_model

    cfg = LoaderConfig(backend=backend, batch_size=batch, size=size, workers=2, dtype="fp32")
    if backend == "dali":
        cfg.dali_device = "cpu"
    loader = build_loader(cfg, shards / "train", "train", train=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(arch, num_classes=loader.num_classes).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    trained, losses, start = 0, [], time.perf_counter()
    for batch_ in loader:
        loss = F.cross_entropy(model(batch_.images[batch_.valid]), batch_.labels[batch_.valid])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        trained += int(batch_.valid.sum())
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    torch.set_num_threads(threads_before)
    return {"images": trained, "batches": len(loader), "arch": arch, "size": size, "batch_size": batch,
            "threads": threads, "loop_seconds": round(seconds, 2), "loop_images_per_s": round(trained / seconds, 1),
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
            "losses_finite": all(map(math.isfinite, losses))}


def camera_costs(images: int, out: Path, repeats: int = quiet.MIN_REPEATS) -> dict:
    """Seconds per image in one process at camera size (2592 x 1944 JPEG, ~5 MP like EyePACS): prepare's check
    (full decode + disc) and its write (decode, disc crop, resize to radius 256 or longest 1024, re-encode).
    The check and the three writes run in turns, `repeats` (>= 3) times each (after one check that finds the
    discs the writes need): medians, with the spread beside."""
    from tltrain.data.prepare import _encode_image, inspect_image
    from tltrain.data.synth import generate_eyepacs

    root = out / "camera"
    shutil.rmtree(root, ignore_errors=True)
    try:
        generate_eyepacs(root, n_patients=max(1, images // 2), width=2592, seed=5, workers=1, progress=False)
        paths = sorted(str(p) for p in (root / "train").iterdir())
        costs = {"images": len(paths), "mean_jpeg_bytes": round(sum(os.path.getsize(p) for p in paths) / len(paths))}
        infos = [inspect_image(p) for p in paths]
        # CPU seconds (process_time) as well as wall seconds: on a shared, loaded machine the CPU time is the
        # per-image cost that carries over to an idle node
        cpu_values: dict[str, list[float]] = {}

        def timed(name, work):
            start, cpu = time.perf_counter(), time.process_time()
            work()
            cpu_values.setdefault(name, []).append((time.process_time() - cpu) / len(paths))
            return (time.perf_counter() - start) / len(paths)

        def write(resize):
            for p, info in zip(paths, infos):
                _encode_image((p, info["disc"], info["width"], info["height"], info["keep_as"], resize, 90))

        variants = {"check": lambda: [inspect_image(p) for p in paths]}
        variants.update({f"write[{resize}]": (lambda resize=resize: write(resize))
                         for resize in ("none", "radius:256", "longest:1024")})
        runs = quiet.interleaved({name: (lambda name=name, work=work: timed(name, work))
                                  for name, work in variants.items()}, repeats)
        for name, run in runs.items():
            cpus = cpu_values[name]
            costs[name] = {"wall_s": round(run["median"], 4), "cpu_s": round(statistics.median(cpus), 4),
                           "wall_spread": run["spread"],
                           "cpu_spread": round(max(cpus) / min(cpus) - 1, 3) if min(cpus) > 0 else None}
        return costs
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_n(n: int, args) -> dict:
    work = Path(args.out) / f"n{n}"
    shutil.rmtree(work, ignore_errors=True)
    raw, shards = work / "raw", work / "shards"
    results: dict = {"n": n, "layout": args.layout}
    print(f"N = {n}", flush=True)
    try:
        stage(results, "synth", n, lambda: synth(raw, n, args.layout, args.width, args.workers))
        stage(results, "prepare", n, lambda: prepare_parts(raw, shards, args.layout, args.workers, args.shard_samples))
        stage(results, "verify", n, lambda: verify_parts(shards, args.workers))
        n_train = json.loads((shards / "train" / "manifest.json").read_text())["splits"]["train"]["count"]
        results["train_split"] = n_train
        _import_loaders(args.backends)  # torch/DALI imports are paid once per process, not per loader
        # the loader start-ups of every backend in turns, args.repeats times (cheap: the median counts)
        stages_in_turns(results, {f"loader_start_{backend}": (lambda b=backend: loader_start(shards, b))
                                  for backend in args.backends}, 64, args.repeats)
        for backend in args.backends:
            if not args.skip_epoch:
                stage(results, f"epoch_{backend}", n_train, lambda b=backend: epoch(
                    shards, b, args.epoch_arch, args.epoch_size, args.epoch_batch,
                    args.epoch_threads))
        results["shards"] = sum(p["shards"] for p in results["prepare"]["parts"].values())
        results["manifest_bytes"] = sum(p["manifest_bytes"] for p in results["prepare"]["parts"].values())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return results


def run_fresh(n: int, args, argv) -> dict:
    """Each N in a fresh process of its own, so its RSS figures start from the same state (no torch from the
    previous N's loader stages)."""
    if len(args.n) == 1:
        return run_n(n, args)
    import subprocess
    import tempfile

    argv = list(sys.argv[1:] if argv is None else argv)
    drop = {"--n", "--json", "--camera", "--quiet-wait", "--smoke"}  # this process waits and judges
    rest, skip = [], False
    for item in argv:
        if item.startswith("--"):
            skip = item in drop
        if not skip:
            rest.append(item)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, __file__, "--n", str(n), "--json", f"{tmp}/one.json", "--quiet-wait", "0",
                        "--smoke", *rest], check=True)
        return json.loads(Path(f"{tmp}/one.json").read_text())["runs"][0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="*", default=[KAGGLE_TRAIN + KAGGLE_TEST], help="dataset sizes")
    parser.add_argument("--layout", choices=("kaggle", "train"), default="kaggle")
    parser.add_argument("--width", type=int, default=128, help="synthetic image width in px")
    parser.add_argument("--workers", type=int, default=2, help="processes for synth, prepare and verify")
    parser.add_argument("--shard-samples", type=int, default=1000)
    parser.add_argument("--backends", nargs="+", default=["torch", "dali"], choices=("torch", "dali"))
    parser.add_argument("--out", default="/tmp/tltrain_bench_scale", help="work folder (emptied per N)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--camera", type=int, default=0,
                        help="also time prepare per image on this many 2592x1944 JPEGs in one process")
    parser.add_argument("--epoch-arch", default="resnet10t", help="timm model of the epoch stage (random init)")
    parser.add_argument("--epoch-size", type=int, default=32, help="model input side of the epoch stage")
    parser.add_argument("--epoch-batch", type=int, default=32, help="batch size of the epoch stage")
    parser.add_argument("--epoch-threads", type=int, default=1, help="torch threads of the epoch's model step")
    parser.add_argument("--skip-epoch", action="store_true", help="stop after the loader start-up")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument("--repeats", type=int, default=quiet.MIN_REPEATS,
                        help="rounds of the cheap stages (loader start-up, camera costs), in turns")
    quiet.add_arguments(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    watch = quiet.Watch().start(args.quiet_wait)
    report = {"cpus": os.cpu_count(), "load_avg": os.getloadavg()[0],
              "runs": [run_fresh(n, args, argv) for n in args.n]}
    if args.camera:
        report["camera"] = camera_costs(args.camera, Path(args.out), args.repeats)
        print(f"camera size, one process: {report['camera']}", flush=True)
    report.update(watch.verdict())
    if not report["recorded"]:
        print(f"not to be recorded: {report['refused']}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return quiet.REFUSED_EXIT if not report["recorded"] and not args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
