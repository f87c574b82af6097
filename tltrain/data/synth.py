"""Synthetic fundus photographs in the Kaggle EyePACS layout, and a synthetic target domain (ImageFolder).

Why: tests and the demo need data with the real layout, real JPEG sizes and a learnable grade signal, without
downloads. A fundus image here is a lit disc on black with vignetting, an optic disc, a macula and a branching
vessel tree; the DR grade is carried by lesions whose number and kind grow with it (microaneurysms from grade 1,
haemorrhages and hard exudates from 2, many more at 3, new vessels at 4). Camera colour, exposure, blur, disc
size and position vary per image, and some images are mirrored, so the grade is learnable but not trivial.
A share of the eyes (`defect_fraction`) carries what real photographs bring and tests must meet: discs cut at the
top and bottom (EyePACS) or a side, frames, axis lines, a notch, a legend box, stray pixels, EXIF orientation
tags (pixels stored turned, so only the oriented image is the eye). `truth.json` records each eye's defects and
true disc. Every image is a pure function of (seed, patient, eye): results do not depend on the number of workers.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tltrain import safe_io
from tltrain.data.pool import pool_map

# Kaggle EyePACS training labels (research.md): 25,810 / 2,443 / 5,292 / 873 / 708 of 35,126.
EYEPACS_CLASS_MIX = (0.735, 0.070, 0.151, 0.025, 0.020)
GRADE_NAMES = ("no DR", "mild", "moderate", "severe", "proliferative")
TARGET_CLASSES = ("benign", "malignant")
MAX_WORK_WIDTH = 1024  # larger images are drawn at this width and upsampled (real photos are soft too)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int = 6) -> np.ndarray:
    """Low-frequency texture in [-1, 1]: a coarse random grid, bicubically upsampled."""
    grid = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    img = Image.fromarray(((grid + 1) * 127.5).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    return np.asarray(img, np.float32) / 127.5 - 1


def _random_walk(rng, start, angle, length, step, curl):
    """Points of a smoothly turning path: the shape of a vessel."""
    x, y = start
    points = [(x, y)]
    for _ in range(int(length / step)):
        angle += rng.normal(0, curl)
        x, y = x + step * math.cos(angle), y + step * math.sin(angle)
        points.append((x, y))
    return points, angle


def _draw_vessels(draw, rng, od, radius, scale, color, n_trunks=4):
    """Arcades leaving the optic disc toward both sides, branching and thinning."""
    base_angles = [-0.9, 0.9, math.pi - 0.9, math.pi + 0.9]
    stack = []
    for i in range(n_trunks):
        width = rng.uniform(3.0, 4.5) * scale
        stack.append((od, base_angles[i % 4] + rng.normal(0, 0.2), width, radius * rng.uniform(0.6, 0.9), 0))
    while stack:
        start, angle, width, length, depth = stack.pop()
        points, end_angle = _random_walk(rng, start, angle, length, step=max(2.0, 6 * scale), curl=0.12)
        draw.line(points, fill=color, width=max(1, int(round(width))), joint="curve")
        if depth < 3 and width > 1.2 * scale:
            for _ in range(2):
                branch_at = points[rng.integers(len(points) // 3, len(points))]
                stack.append((branch_at, end_angle + rng.choice([-1, 1]) * rng.uniform(0.4, 1.0),
                              width * 0.65, length * 0.55, depth + 1))


def _place_disc_and_macula(rng, img, xx, yy, cx, cy, radius, side, glow, shade):
    """The optic disc on the nasal side (side 1: right eye), the macula on the other, as both renderers draw them:
    adds the disc's `glow` (RGB) to img and darkens the macula by `shade`, in place. Returns (od, macula)."""
    od = (cx + side * radius * rng.uniform(0.25, 0.35), cy + rng.normal(0, 0.05) * radius)
    macula = (cx - side * radius * rng.uniform(0.12, 0.2), cy + rng.normal(0, 0.04) * radius)
    d_od = np.sqrt((xx - od[0]) ** 2 + (yy - od[1]) ** 2) / (radius * rng.uniform(0.07, 0.1))
    img += np.exp(-d_od ** 4)[..., None] * np.asarray(glow, np.float32)
    d_mac = np.sqrt((xx - macula[0]) ** 2 + (yy - macula[1]) ** 2) / (radius * 0.12)
    img *= (1 - shade * np.exp(-d_mac ** 2))[..., None]
    return od, macula


def _draw_dots(draw, rng, points, size_range, scale, fill):
    """Round lesions (microaneurysms, exudates), one at each of `points`, radius drawn from size_range.

    `points` may be a generator drawing from rng: it is read one point at a time, each before its radius, the
    order the seed's stream has always had (the images stay the same)."""
    for x, y in points:
        r = rng.uniform(*size_range) * scale + 0.6
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def _draw_blots(draw, rng, points, scale, fill):
    """Oval haemorrhages, one at each of `points` (read one at a time, as in _draw_dots)."""
    for x, y in points:
        rx, ry = rng.uniform(4, 11) * scale + 1, rng.uniform(4, 11) * scale + 1
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=fill)


def _lesion_counts(rng: np.random.Generator, grade: int) -> dict[str, int]:
    """How many lesions of each kind an eye of this grade shows (overlapping ranges: not trivially separable)."""
    ma = {0: (0, 2), 1: (3, 9), 2: (6, 18), 3: (12, 30), 4: (12, 30)}[grade]
    haem = {0: (0, 0), 1: (0, 1), 2: (2, 7), 3: (6, 16), 4: (5, 14)}[grade]
    exu = {0: (0, 0), 1: (0, 1), 2: (0, 10), 3: (8, 30), 4: (6, 24)}[grade]
    return {
        "microaneurysms": int(rng.integers(ma[0], ma[1] + 1)),
        "haemorrhages": int(rng.integers(haem[0], haem[1] + 1)),
        "exudates": int(rng.integers(exu[0], exu[1] + 1)),
        "new_vessels": int(rng.integers(3, 7)) if grade == 4 else 0,
    }


def render_fundus(seed, grade: int, width: int = 512, height: int | None = None, right_eye: bool = False,
                  mirrored: bool = False, disc=None, surround=(0, 0, 0)) -> np.ndarray:
    """One synthetic fundus photograph as an (H, W, 3) uint8 array; `seed` is an int or a numpy Generator."""
    return render_fundus_disc(seed, grade, width, height, right_eye, mirrored, disc, surround)[0]


def render_fundus_disc(seed, grade: int, width: int = 512, height: int | None = None, right_eye: bool = False,
                       mirrored: bool = False, disc=None, surround=(0, 0, 0)) -> tuple[np.ndarray, tuple]:
    """The photograph and its true disc (cx, cy, r) in continuous output pixels (pixel i covers [i, i+1)).

    `disc` places the retina (default: random, near the centre, whole); part of it may lie outside the image,
    which is how cut photographs are made. `surround` is the colour outside the retina (black in most cameras).
    """
    rng = seed if isinstance(seed, np.random.Generator) else _rng(seed)
    height = height or int(round(width * 0.75))
    work_w = min(width, MAX_WORK_WIDTH)
    work_h = max(8, int(round(height * work_w / width)))
    h, w = work_h, work_w
    to_work = work_w / width

    # Camera: disc size and position, colour cast, exposure.
    radius = min(h, w) * rng.uniform(0.42, 0.52)
    cx = w / 2 + rng.normal(0, 0.02) * w
    cy = h / 2 + rng.normal(0, 0.02) * h
    if disc is not None:
        cx, cy, radius = (float(v) * to_work for v in disc)
        if mirrored:
            cx = w - cx
    scale = radius / 200.0
    base = np.array([rng.uniform(0.75, 0.95), rng.uniform(0.32, 0.5), rng.uniform(0.12, 0.28)], np.float32)
    exposure = rng.uniform(0.65, 1.1)

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres
    dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / radius
    vignette = np.clip(1.0 - 0.55 * dist ** 2.5, 0, 1)
    texture = 1 + 0.08 * _smooth_noise(rng, h, w)
    img = base[None, None, :] * (vignette * texture * exposure)[..., None]

    side = 1 if right_eye else -1
    od, macula = _place_disc_and_macula(rng, img, xx, yy, cx, cy, radius, side, glow=(0.35, 0.35, 0.2), shade=0.25)

    pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    vessel = tuple(int(c) for c in (base * exposure * np.array([150, 45, 40])).clip(0, 255))
    _draw_vessels(draw, rng, od, radius, scale, vessel)

    counts = _lesion_counts(rng, grade)

    def point_in_disc(max_r=0.85):
        r = radius * max_r * math.sqrt(rng.uniform(0, 1))
        a = rng.uniform(0, 2 * math.pi)
        return cx + r * math.cos(a), cy + r * math.sin(a)

    def near_macula():
        """Hard exudates cluster around the macula: halfway from a point of the inner disc to it."""
        x, y = point_in_disc(0.6)
        return (x + macula[0]) / 2, (y + macula[1]) / 2

    dark_red = tuple(int(c) for c in (exposure * np.array([120, 18, 15])).clip(0, 255))
    _draw_dots(draw, rng, (point_in_disc() for _ in range(counts["microaneurysms"])), (1.0, 2.2), scale, dark_red)
    _draw_blots(draw, rng, (point_in_disc() for _ in range(counts["haemorrhages"])), scale,
                tuple(int(c * 0.85) for c in dark_red))
    yellow = tuple(int(c) for c in (np.array([250, 225, 110]) * min(1.0, exposure + 0.15)).clip(0, 255))
    _draw_dots(draw, rng, (near_macula() for _ in range(counts["exudates"])), (1.5, 3.8), scale, yellow)
    for _ in range(counts["new_vessels"]):
        start = (od[0] + rng.normal(0, 0.08) * radius, od[1] + rng.normal(0, 0.08) * radius)
        points, _ = _random_walk(rng, start, rng.uniform(0, 2 * math.pi), radius * rng.uniform(0.15, 0.3),
                                 step=max(1.5, 3 * scale), curl=0.7)
        draw.line(points, fill=vessel, width=max(1, int(round(1.2 * scale))))

    pil = pil.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.4, 1.3) * max(scale, 0.5)))
    out = np.asarray(pil, np.float32)
    inside = np.clip(radius - dist * radius + 0.5, 0, 1)[..., None]  # antialiased edge: the share of pixel inside
    out = out * inside + np.asarray(surround, np.float32) * (1 - inside)
    out += rng.normal(0, 1.5, out.shape).astype(np.float32)  # sensor noise
    out = np.clip(out, 0, 255).astype(np.uint8)
    if mirrored:
        out = out[:, ::-1]
        cx = w - cx
    if (work_w, work_h) != (width, height):
        out = np.asarray(Image.fromarray(out).resize((width, height), Image.BILINEAR))
    return np.ascontiguousarray(out), (cx / to_work, cy * height / work_h, radius / to_work)


# -- defects of real photographs ----------------------------------------------------------------------------------
DEFECTS = ("cut_top_bottom", "cut_left", "cut_right", "frame", "axis_lines", "notch", "legend", "stray_pixels",
           "exif")
GEOMETRY_DEFECTS = ("cut_top_bottom", "cut_left", "cut_right")


def defect_disc(kind: str, width: int, height: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """A disc placed the way a cut photograph has it: EyePACS cuts top and bottom at |y - cy| > ~0.8 r (the
    retina is taller than the photo); a left or right cut removes the side beyond ~0.6-0.9 r from the centre."""
    if kind == "cut_top_bottom":
        r = min(height / 2 / rng.uniform(0.72, 0.88), 0.49 * width)
        return width / 2 + rng.normal(0, 0.01) * width, height / 2 + rng.normal(0, 0.005) * height, r
    r = min(width, height) * rng.uniform(0.42, 0.5)
    reach = r * rng.uniform(0.6, 0.9)  # the centre's distance from the cut edge
    cx = reach if kind == "cut_left" else width - reach
    return cx, height / 2 + rng.normal(0, 0.02) * height, r


def draw_defects(image: np.ndarray, disc, kinds, rng: np.random.Generator, surround=(0, 0, 0)) -> np.ndarray:
    """Frames, axis lines, a notch in the rim, a legend box with text and stray bright pixels, as cameras and
    viewers leave them on real photographs (the disc itself stays where it is: ground truth is unchanged)."""
    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    h, w = image.shape[:2]
    cx, cy, r = disc
    thick = max(1, round(min(w, h) * rng.uniform(0.002, 0.008)))
    light = tuple(int(v) for v in rng.integers(200, 256, 3))
    if "frame" in kinds:
        inset = round(min(w, h) * rng.uniform(0.0, 0.03))
        draw.rectangle([inset, inset, w - 1 - inset, h - 1 - inset], outline=light, width=thick)
    if "axis_lines" in kinds:  # a cross through the middle row and column, as some viewers overlay it
        draw.line([(0, h // 2), (w, h // 2)], fill=light, width=thick)
        draw.line([(w // 2, 0), (w // 2, h)], fill=light, width=thick)
    if "notch" in kinds:  # a triangle of surround cut into the rim (the orientation mark of some cameras)
        angle = rng.uniform(0, 2 * math.pi) if rng.uniform() < 0.5 else -math.pi / 2
        half, depth = math.radians(rng.uniform(3, 6)), r * rng.uniform(0.05, 0.1)
        points = [(cx + (r + 3) * math.cos(angle - half), cy + (r + 3) * math.sin(angle - half)),
                  (cx + (r - depth) * math.cos(angle), cy + (r - depth) * math.sin(angle)),
                  (cx + (r + 3) * math.cos(angle + half), cy + (r + 3) * math.sin(angle + half))]
        draw.polygon(points, fill=tuple(int(v) for v in surround))
    if "legend" in kinds:  # a filled box with text in a corner; it may overlap the retina's rim
        bw, bh = round(w * rng.uniform(0.15, 0.25)), round(h * rng.uniform(0.05, 0.09))
        x0 = round(w * 0.01) if rng.uniform() < 0.5 else w - bw - round(w * 0.01)
        y0 = round(h * 0.01) if rng.uniform() < 0.5 else h - bh - round(h * 0.01)
        draw.rectangle([x0, y0, x0 + bw, y0 + bh], fill=light)
        draw.text((x0 + 3, y0 + 2), f"OD 45 {int(rng.integers(1000, 9999))}", fill=(20, 20, 20))
    if "stray_pixels" in kinds:
        n = int(rng.integers(10, 40))
        xs, ys = rng.integers(0, w, n), rng.integers(0, h, n)
        for x, y in zip(xs, ys):
            draw.rectangle([x, y, x + int(rng.integers(0, 2)), y + int(rng.integers(0, 2))], fill=light)
    return np.asarray(pil)


# The stored pixels of a photo tagged with EXIF orientation o are the displayed image under the inverse of the
# transpose that PIL's ImageOps.exif_transpose applies for o (2-5 and 7 are their own inverse; 6 and 8 swap).
_STORE_FOR_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                          4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                          6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
                          8: Image.Transpose.ROTATE_270}


def save_with_orientation(image: np.ndarray, path, orientation: int, quality: int = 90) -> None:
    """Save a JPEG that *displays* as `image` once EXIF orientation `orientation` (1-8) is applied."""
    pil = Image.fromarray(image)
    exif = Image.Exif()
    if orientation != 1:
        pil = pil.transpose(_STORE_FOR_ORIENTATION[orientation])
    exif[0x0112] = orientation  # Orientation
    pil.save(path, format="JPEG", quality=quality, exif=exif.tobytes())


def _sample_grades(seed: int, n_patients: int, class_mix, pair_same_grade: float, min_per_class: int):
    """Per-patient (left, right) grades: EyePACS mix, both eyes usually alike, at least min_per_class per grade."""
    rng = _rng(seed, 0xC1A55)
    mix = np.asarray(class_mix, float) / np.sum(class_mix)
    grades = []
    for _ in range(n_patients):
        g = int(rng.choice(len(mix), p=mix))
        other = g if rng.uniform() < pair_same_grade else int(np.clip(g + rng.choice([-1, 1]), 0, len(mix) - 1))
        grades.append([g, other] if rng.uniform() < 0.5 else [other, g])
    counts = np.bincount(np.ravel(grades), minlength=len(mix))
    for g in range(len(mix)):  # top up rare grades by re-grading patients of the most common grade
        while counts[g] < min_per_class:
            donors = [i for i, pair in enumerate(grades) if pair[0] == pair[1] == int(np.argmax(counts))]
            if not donors:
                break
            i = donors[int(rng.integers(len(donors)))]
            counts[grades[i][0]] -= 2
            grades[i] = [g, g]
            counts[g] += 2
    return grades


def _write_eye(job) -> tuple[str, int, dict]:
    path, seed, patient, eye, grade, width, height, mirror_fraction, quality, defect_fraction, exif = job
    rng = _rng(seed, patient, eye)
    mirrored = bool(rng.uniform() < mirror_fraction)
    defect_rng = _rng(seed, patient, eye, 0xDEF)  # its own stream: images without defects stay as they were
    kinds = ()
    if defect_rng.uniform() < defect_fraction:
        menu = [k for k in DEFECTS if exif or k != "exif"]
        kinds = tuple(defect_rng.choice(menu, size=int(defect_rng.integers(1, 3)), replace=False))
        if sum(k in GEOMETRY_DEFECTS for k in kinds) > 1:
            kinds = tuple(k for k in kinds if k not in GEOMETRY_DEFECTS[1:]) or kinds[:1]
    cut = next((k for k in kinds if k in GEOMETRY_DEFECTS), None)
    disc = defect_disc(cut, width, height, defect_rng) if cut else None
    img, disc = render_fundus_disc(rng, grade, width, height, right_eye=(eye == 1), mirrored=mirrored, disc=disc)
    if set(kinds) - set(GEOMETRY_DEFECTS) - {"exif"}:
        img = draw_defects(img, disc, kinds, defect_rng)
    orientation = int(defect_rng.integers(2, 9)) if "exif" in kinds else 1
    if orientation != 1:
        save_with_orientation(img, path, orientation, quality)
    else:
        Image.fromarray(img).save(path, format="JPEG", quality=quality)
    truth = {"defects": [str(k) for k in kinds], "orientation": orientation, "disc": [float(v) for v in disc]}
    return Path(path).stem, grade, truth


def _pool_map(fn, jobs, workers, progress, desc):
    """fn over jobs in order across `workers` processes (None or 0: the usable cores) with prepare's pool
    (tltrain.data.pool), and a progress bar; every image is a function of its job alone, so the workers do not
    change a byte."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=desc, unit="img", disable=None)
    results = []
    for result in pool_map(fn, jobs, workers or 0):
        results.append(result)
        bar and bar.update()
    bar and bar.close()
    return results


def generate_eyepacs(out_dir, n_patients: int, width: int = 512, height: int | None = None, seed: int = 0,
                     workers: int | None = None, class_mix=EYEPACS_CLASS_MIX, jpeg_quality: int = 90,
                     mirror_fraction: float = 0.1, pair_same_grade: float = 0.8, min_per_class: int = 0,
                     progress: bool = True, defect_fraction: float = 0.3, exif_orientation: bool = True) -> dict:
    """Write `<out>/train/<patient>_{left,right}.jpeg` and `<out>/trainLabels.csv` (image,level).

    A `defect_fraction` share of the eyes gets one or two defects of real photographs (DEFECTS: cut discs, frames,
    axis lines, a notch, a legend box, stray pixels and, with `exif_orientation`, an EXIF orientation tag with the
    stored pixels turned so that the *oriented* image is the eye)."""
    out = Path(out_dir)
    (out / "train").mkdir(parents=True, exist_ok=True)
    height = height or int(round(width * 0.75))
    grades = _sample_grades(seed, n_patients, class_mix, pair_same_grade, min_per_class)
    jobs = []
    for index, pair in enumerate(grades):
        patient = 10 + index * 3  # Kaggle-like, non-contiguous ids
        for eye, name in enumerate(("left", "right")):
            jobs.append((str(out / "train" / f"{patient}_{name}.jpeg"), seed, patient, eye, pair[eye], width,
                         height, mirror_fraction, jpeg_quality, defect_fraction, exif_orientation))
    rows = _pool_map(_write_eye, jobs, workers, progress, "synth fundus")
    with safe_io.atomic_open(out / "trainLabels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "level"])
        writer.writerows(row[:2] for row in rows)
    counts = np.bincount([row[1] for row in rows], minlength=5).tolist()
    # Per image: its defects, EXIF orientation and true disc (cx, cy, r) in the pixels of the oriented image.
    truth = {stem: info for stem, _, info in rows}
    safe_io.atomic_write_text(out / "truth.json", json.dumps(truth, indent=0))
    return {"root": str(out), "labels_csv": str(out / "trainLabels.csv"), "images": len(rows),
            "patients": n_patients, "per_grade": dict(enumerate(counts)), "width": width, "height": height,
            "with_defects": sum(bool(info["defects"]) for info in truth.values()), "truth": str(out / "truth.json")}


def render_target(seed, label: int, size: int = 256) -> np.ndarray:
    """A laryngoscopy-like image: pink mucosa seen through a round endoscope, class told by the vessel pattern.

    Class 0 (benign): a few long, smooth, branching vessels. Class 1 (malignant): dense, tortuous, looping
    short vessels and irregular dark spots (the intraepithelial papillary capillary loops of neoplasia).
    """
    rng = seed if isinstance(seed, np.random.Generator) else _rng(seed)
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = w / 2 + rng.normal(0, 0.03) * w, h / 2 + rng.normal(0, 0.03) * h
    dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / (0.55 * size)
    base = np.array([rng.uniform(0.8, 0.95), rng.uniform(0.5, 0.65), rng.uniform(0.55, 0.7)], np.float32)
    light = np.clip(1.05 - 0.6 * dist ** 2, 0, 1) * (1 + 0.12 * _smooth_noise(rng, h, w, 5))
    img = base[None, None] * light[..., None] * rng.uniform(0.8, 1.1)
    pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    scale = size / 256
    color = (int(rng.uniform(130, 170)), 30, int(rng.uniform(40, 70)))
    if label == 0:
        for _ in range(int(rng.integers(3, 6))):
            start = (rng.uniform(0, w), rng.uniform(0, h))
            points, _ = _random_walk(rng, start, rng.uniform(0, 2 * math.pi), size * 0.7, 4 * scale, 0.08)
            draw.line(points, fill=color, width=max(1, int(2.5 * scale)))
    else:
        for _ in range(int(rng.integers(25, 45))):
            start = (rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h)
            points, _ = _random_walk(rng, start, rng.uniform(0, 2 * math.pi), size * 0.12, 2 * scale, 0.9)
            draw.line(points, fill=color, width=max(1, int(1.5 * scale)))
        for _ in range(int(rng.integers(4, 10))):
            x, y, r = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h, rng.uniform(2, 6) * scale
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(color[0] // 2, 20, 30))
    pil = pil.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 1.0) * scale))
    out = np.asarray(pil, np.float32) * (dist <= 0.95)[..., None]
    return np.clip(out + rng.normal(0, 2, out.shape), 0, 255).astype(np.uint8)


def _write_target(job):
    path, seed, index, label, size = job
    Image.fromarray(render_target(_rng(seed, index, label), label, size)).save(path, format="JPEG", quality=90)
    return path


def generate_target_domain(out_dir, n_per_class: int, size: int = 256, classes=TARGET_CLASSES, seed: int = 0,
                           workers: int | None = None, progress: bool = True) -> dict:
    """Write `<out>/<class>/<class>_<index>.jpg` (ImageFolder layout) for two-step transfer tests."""
    out = Path(out_dir)
    jobs = []
    for label, name in enumerate(classes):
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            jobs.append((str(out / name / f"{name}_{i:05d}.jpg"), seed, i, label % 2, size))
    _pool_map(_write_target, jobs, workers, progress, "synth target")
    return {"root": str(out), "classes": list(classes), "per_class": n_per_class, "images": len(jobs), "size": size}
