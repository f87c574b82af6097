"""Cost of the disc step of `tltrain prepare` per image: the middle-row rule it replaced vs the fitted circle.

prepare decodes each image fully, reduces it to a thumbnail (shorter side 256-511 px) and finds the disc there;
`predict` finds it on the full image. Timed per image on synthetic JPEGs with the defects of real photographs,
at camera size (2592x1944) and at 512 px: the disc estimate alone on prepare's thumbnail, the whole per-image
step (decode + thumbnail + estimate), and the estimate on the full image. The old rule is git's copy of
tltrain/data/disc.py at OLD_REV, loaded as a module.

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


def measure(paths, estimate, repeat: int) -> dict:
    def step(path):
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
        return estimate(_thumbnail(rgb))

    images = [Image.open(p).convert("RGB") for p in paths]
    thumbs = [_thumbnail(img) for img in images]
    fulls = [np.asarray(img) for img in images]
    return {
        "estimate_on_thumbnail_ms": round(np.mean([_best_ms(lambda t=t: estimate(t), repeat) for t in thumbs]), 2),
        "decode_thumbnail_estimate_ms": round(np.mean([_best_ms(lambda p=p: step(p), repeat) for p in paths]), 2),
        "estimate_on_full_image_ms": round(np.mean([_best_ms(lambda a=a: estimate(a), repeat) for a in fulls]), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    old = _old_module()
    results = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for width, height in ((2592, 1944), (512, 384)):
            root = Path(tmp) / f"w{width}"
            generate_eyepacs(root, n_patients=max(1, args.images // 2), width=width, height=height, seed=5,
                             workers=1, progress=False, defect_fraction=0.5, exif_orientation=False)
            paths = sorted((root / "train").glob("*.jpeg"))
            row = {"old": measure(paths, old.estimate_disc, args.repeat),
                   "new": measure(paths, new_disc.estimate_disc, args.repeat)}
            row["ratio_new_over_old"] = {k: round(row["new"][k] / row["old"][k], 2) for k in row["old"]}
            results["sizes"][f"{width}x{height}"] = row
            print(f"{width}x{height}: {json.dumps(row)}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
