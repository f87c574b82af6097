"""Cost of the disc step of `tltrain prepare` per image: the middle-row rule it replaced vs the fitted circle.

prepare decodes each image fully, reduces it to a thumbnail (shorter side 256-511 px) and finds the disc there;
`predict` finds it on the full image. Timed per image on synthetic JPEGs with the defects of real photographs,
at camera size (2592x1944) and at 512 px: the disc estimate alone on prepare's thumbnail, the whole per-image
step (decode + thumbnail + estimate), and the estimate on the full image. The old rule is git's copy of
tltrain/data/disc.py at OLD_REV, loaded as a module.

Quiet rule (benchmarks/quiet.py): it waits up to --quiet-wait s for a quiet machine, times old and new in turns
(--repeats >= 3 rounds of each figure; a round's figure is the mean over the images of the fastest of --repeat
calls), reports the medians with a `*_spread` beside each, records the load in the JSON and exits 3 when the
figure is refused, unless --smoke.

  python benchmarks/bench_disc.py --images 12 --out benchmarks/results/disc_cpu.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import quiet
from tltrain.data import disc as new_disc
from tltrain.data.synth import generate_eyepacs

OLD_REV = "a274b0c"  # main before the circle fit
REPO = Path(__file__).resolve().parents[1]


def _old_module():
    source = subprocess.run(["git", "show", f"{OLD_REV}:tltrain/data/disc.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_disc.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_disc", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _thumbnail(img: Image.Image) -> np.ndarray:
    """As prepare.inspect_image makes it."""
    factor = max(1, min(img.size) // 256)
    return np.asarray(img.reduce(factor) if factor > 1 else img)


def _best_ms(fn, repeat: int) -> float:
    """Fastest of `repeat` runs in process CPU time: the development machine's cores are shared, and CPU time
    is what another process's load changes least."""
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return 1000 * best


FIGURES = ("estimate_on_thumbnail_ms", "decode_thumbnail_estimate_ms", "estimate_on_full_image_ms")


def measurements(paths, estimate, repeat: int) -> dict:
    """Each figure as a function returning ms per image (the mean over the images of the best of `repeat`)."""
    def step(path):
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
        return estimate(_thumbnail(rgb))

    images = [Image.open(p).convert("RGB") for p in paths]
    thumbs = [_thumbnail(img) for img in images]
    fulls = [np.asarray(img) for img in images]
    return {
        "estimate_on_thumbnail_ms": lambda: float(np.mean([_best_ms(lambda t=t: estimate(t), repeat)
                                                           for t in thumbs])),
        "decode_thumbnail_estimate_ms": lambda: float(np.mean([_best_ms(lambda p=p: step(p), repeat)
                                                               for p in paths])),
        "estimate_on_full_image_ms": lambda: float(np.mean([_best_ms(lambda a=a: estimate(a), repeat)
                                                            for a in fulls])),
    }


def measure(paths, finders: dict, repeat: int, repeats: int) -> dict:
    """{finder: {figure: median ms, figure without _ms + "_spread": spread}}, every (figure, finder) in turns."""
    timed = {name: measurements(paths, estimate, repeat) for name, estimate in finders.items()}
    runs = quiet.interleaved({(figure, name): timed[name][figure] for figure in FIGURES for name in finders},
                             repeats)
    out = {name: {} for name in finders}
    for (figure, name), run in runs.items():
        out[name][figure] = round(run["median"], 2)
        out[name][figure.removesuffix("_ms") + "_spread"] = run["spread"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=5, help="calls per image and figure; the fastest counts")
    parser.add_argument("--repeats", type=int, default=quiet.MIN_REPEATS,
                        help="rounds of every figure, old and new in turns; the medians count")
    quiet.add_arguments(parser)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    old = _old_module()
    results = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "repeat": args.repeat,
               "repeats": max(args.repeats, quiet.MIN_REPEATS), "sizes": {}}
    watch = quiet.Watch().start(args.quiet_wait)
    with tempfile.TemporaryDirectory() as tmp:
        for width, height in ((2592, 1944), (512, 384)):
            root = Path(tmp) / f"w{width}"
            generate_eyepacs(root, n_patients=max(1, args.images // 2), width=width, height=height, seed=5,
                             workers=1, progress=False, defect_fraction=0.5, exif_orientation=False)
            paths = sorted((root / "train").glob("*.jpeg"))
            row = measure(paths, {"old": old.estimate_disc, "new": new_disc.estimate_disc}, args.repeat,
                          args.repeats)
            row["ratio_new_over_old"] = {k: round(row["new"][k] / row["old"][k], 2) for k in FIGURES}
            results["sizes"][f"{width}x{height}"] = row
            print(f"{width}x{height}: {json.dumps(row)}", flush=True)
    results.update(watch.verdict())
    print(json.dumps({k: v for k, v in results.items() if k != "sizes"}))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    if not results["recorded"] and not args.smoke:
        return quiet.REFUSED_EXIT


if __name__ == "__main__":
    sys.exit(main())
