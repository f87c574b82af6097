"""Where the eye is in a fundus photograph: disc centre and radius, by Ben Graham's rule extended to the centre.

Ben Graham (Kaggle DR 2015) took the middle row, summed the channels and counted the pixels brighter than a
tenth of the row's mean: half that count is the radius. The bright span's midpoint gives the centre's x, and
the middle column's span gives its y unless the disc is cut by the top and bottom edges (common in EyePACS),
in which case the image centre is used. Computed once at `prepare` time and stored with each sample.
"""
from __future__ import annotations

import math

import numpy as np


def _span(profile: np.ndarray) -> tuple[int, int] | None:
    bright = np.flatnonzero(profile > profile.mean() / 10.0)
    return (int(bright[0]), int(bright[-1])) if bright.size else None


def estimate_disc(image: np.ndarray) -> tuple[float, float, float]:
    """(cx, cy, r) in pixels of an (H, W, C) or (H, W) image; r == 0 when no disc is found."""
    img = np.asarray(image, np.float32)
    gray = img.sum(axis=2) if img.ndim == 3 else img
    h, w = gray.shape
    row_span = _span(gray[h // 2])
    if row_span is None:
        return w / 2.0, h / 2.0, 0.0
    r = (row_span[1] - row_span[0] + 1) / 2.0
    cx = (row_span[0] + row_span[1] + 1) / 2.0
    col_span = _span(gray[:, min(w - 1, int(cx))])
    if col_span is None or (col_span[0] == 0 and col_span[1] == h - 1):
        cy = h / 2.0
    else:
        cy = (col_span[0] + col_span[1] + 1) / 2.0
    return float(cx), float(cy), float(r)


def disc_found(disc: tuple[float, float, float], width: int, height: int) -> bool:
    """A radius under 5 % of the shorter side means the thresholding found no eye (a black or foreign image)."""
    return disc[2] >= 0.05 * min(width, height)


def disc_square(disc: tuple[float, float, float]) -> tuple[int, int, int]:
    """(x0, y0, side) of the square around the disc, rounded half up like DALI's crop box.

    The same box as tltrain.preprocess.disc_box (crop to disc, no scale or shift), kept here without torch so
    `prepare` workers stay small (importing torch costs each process about 400 MB); a test holds the two equal.
    """
    cx, cy, r = (float(v) for v in disc)
    side = max(2, math.floor(2 * r + 0.5))
    return math.floor(cx - side / 2 + 0.5), math.floor(cy - side / 2 + 0.5), side


def locate_disc(image) -> tuple[float, float, float]:
    """The disc of a decoded RGB image (PIL image or (H, W, 3) array) as `prepare` stores it and `predict` and
    load_pretrained recompute it: found on a thumbnail reduced by an integer factor (box average, shorter side
    >= 256 px), scaled back. One function for every caller, so prepare and predict crop the same square."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    factor = max(1, min(img.size) // 256)
    thumb = np.asarray(img.reduce(factor) if factor > 1 else img)
    cx, cy, r = estimate_disc(thumb)
    return cx * factor, cy * factor, r * factor
