"""A synthetic second fundus task for two-step transfer: macular-oedema risk on photographs from another camera.

Why this target (docs/transfer.md): THTL's question is whether an intermediate domain helps a target with few
images. A fair synthetic test needs a target that shares low-level content with the intermediate domain but asks
a different question, so that neither "the same task again" nor "nothing in common" decides the answer:
- another camera: a redder, darker colour cast, a wider field (smaller disc in the frame), stronger vignetting and
  more blur than the EyePACS-style set;
- another grading task: clinically significant macular oedema (CSME-like), i.e. hard exudates within ~0.25 R of
  the macula. Both classes carry the same background retinopathy (microaneurysms, haemorrhages) and both may
  carry exudates: class 0 has none or has them only far from the macula (> 0.45 R). So the label depends on
  what an exudate is (something the fundus model has seen: exudates come with grades 2-4 there) and on where it
  lies (something it was never asked).
Every image is a pure function of (seed, index, label), like the other generators.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tltrain.safe_io import atomic_write_text
from tltrain.data.synth import (_draw_blots, _draw_dots, _draw_vessels, _place_disc_and_macula, _pool_map, _rng,
                                _smooth_noise)

DME_CLASSES = ("no_csme", "csme")


NEAR = 0.25  # exudates of class 1 lie within NEAR x R of the macula (centres), R the fundus radius
DOT_RADIUS = (1.5, 3.8)  # exudate radius range before scaling (tltrain.data.synth._draw_dots adds 0.6 px)


def render_dme(seed, label: int, size: int = 192, truth: dict | None = None) -> np.ndarray:
    """(size*3/4, size, 3) uint8: one photograph of camera B; label 1 = exudates close to the macula.

    truth: a dict to fill with where the lesions are by construction, in the returned image's pixels (continuous
    coordinates): "macula" (x, y), "radius" (of the fundus) and "lesion_radius", the circle around the macula
    that holds every near exudate whole (NEAR x R plus the largest exudate); recording it draws nothing from the
    seed's stream, so the image is the same with or without it."""
    rng = seed if isinstance(seed, np.random.Generator) else _rng(seed)
    w, h = size, int(round(size * 0.75))
    radius = min(h, w) * rng.uniform(0.40, 0.46)
    cx, cy = w / 2 + rng.normal(0, 0.03) * w, h / 2 + rng.normal(0, 0.03) * h
    scale = radius / 200.0
    base = np.array([rng.uniform(0.85, 1.0), rng.uniform(0.22, 0.34), rng.uniform(0.06, 0.14)], np.float32)
    exposure = rng.uniform(0.55, 0.9)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / radius
    img = base[None, None] * (np.clip(1.0 - 0.7 * dist ** 2, 0, 1) * (1 + 0.1 * _smooth_noise(rng, h, w))
                              * exposure)[..., None]
    side = 1 if rng.integers(0, 2) else -1  # right or left eye
    od, macula = _place_disc_and_macula(rng, img, xx, yy, cx, cy, radius, side, glow=(0.3, 0.3, 0.15), shade=0.3)
    pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    vessel = tuple(int(c) for c in (base * exposure * np.array([140, 50, 40])).clip(0, 255))
    _draw_vessels(draw, rng, od, radius, scale, vessel)

    def around(centre, r_min, r_max):
        """A point at a distance in [r_min, r_max] * radius from centre, inside 0.85 R of the disc."""
        while True:
            r = radius * rng.uniform(r_min, r_max)
            a = rng.uniform(0, 2 * math.pi)
            x, y = centre[0] + r * math.cos(a), centre[1] + r * math.sin(a)
            if math.hypot(x - cx, y - cy) <= 0.85 * radius:
                return x, y

    dark_red = tuple(int(c) for c in (exposure * np.array([115, 15, 12])).clip(0, 255))
    # Background retinopathy in both classes (each count is drawn when its generator is made, before its lesions).
    _draw_dots(draw, rng, (around((cx, cy), 0.0, 0.85) for _ in range(int(rng.integers(2, 14)))), (1.0, 2.2), scale,
               dark_red)
    _draw_blots(draw, rng, (around((cx, cy), 0.0, 0.85) for _ in range(int(rng.integers(0, 6)))), scale,
                tuple(int(c * 0.85) for c in dark_red))
    yellow = tuple(int(c) for c in (np.array([245, 215, 100]) * min(1.0, exposure + 0.25)).clip(0, 255))
    if label == 1:
        near, far = int(rng.integers(3, 12)), int(rng.integers(0, 8))
    else:
        near, far = 0, int(rng.integers(0, 2)) * int(rng.integers(3, 14))  # half have far exudates only
    spots = [around(macula, 0.0, NEAR) for _ in range(near)] + [around(macula, 0.45, 0.9) for _ in range(far)]
    _draw_dots(draw, rng, spots, DOT_RADIUS, scale, yellow)

    pil = pil.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.8, 1.6) * max(scale, 0.5)))
    out = np.asarray(pil, np.float32) * (dist <= 1.0)[..., None]
    out = np.clip(out + rng.normal(0, 2.0, out.shape), 0, 255).astype(np.uint8)
    flipped = rng.uniform() < 0.5
    if truth is not None:
        mx, my = float(macula[0]), float(macula[1])
        truth.update(macula=(w - mx if flipped else mx, my), radius=float(radius),
                     lesion_radius=float(NEAR * radius + DOT_RADIUS[1] * scale + 0.6))
    return np.ascontiguousarray(out[:, ::-1]) if flipped else out


LESIONS_FILE = "lesions.json"  # beside the class folders: where each image's lesions are by construction


def _write_dme(job):
    path, seed, index, label, size = job
    truth: dict = {}
    Image.fromarray(render_dme(_rng(seed, index, label, 0xD3E), label, size, truth)).save(path, format="JPEG",
                                                                                         quality=88)
    return path, truth


def generate_dme_target(out_dir, n_per_class: int, size: int = 192, seed: int = 0, workers: int | None = None,
                        progress: bool = True) -> dict:
    """Write `<out>/<class>/<class>_<index>.jpg` (ImageFolder) of the macular-oedema task, classes DME_CLASSES."""
    out = Path(out_dir)
    jobs = []
    for label, name in enumerate(DME_CLASSES):
        (out / name).mkdir(parents=True, exist_ok=True)
        jobs += [(str(out / name / f"{name}_{i:05d}.jpg"), seed, i, label, size) for i in range(n_per_class)]
    results = _pool_map(_write_dme, jobs, workers, progress, "synth DME target")
    lesions = {Path(path).relative_to(out).as_posix(): {"label": label, **truth}
               for (path, truth), (_, _, _, label, _) in zip(results, jobs)}
    atomic_write_text(out / LESIONS_FILE, json.dumps(lesions, indent=1))  # never through a link
    return {"root": str(out), "classes": list(DME_CLASSES), "per_class": n_per_class, "images": len(jobs),
            "size": size, "lesions": str(out / LESIONS_FILE)}
