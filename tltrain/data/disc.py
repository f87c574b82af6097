"""Where the eye is in a fundus photograph: a circle fitted to the retina's edge.

Ben Graham (Kaggle DR 2015) took the span of the middle row above a tenth of its mean as the diameter. Real
photographs break that rule: a frame, an axis line or a legend box in the middle row moves the span, a disc cut at
the left or right edge gives a short span, and a plain white image passes. Here the retina is the region that
differs from the surround, and its edge is fitted with a circle by a robust fit that ignores what is not circle:

1. Coarse, on a grid WORK_SIDE px on its longer side: the surround colour is the median of the four corner
   patches (black or bright, whatever the camera left there); pixels whose colour distance to it exceeds a level
   1/4 of the way to the typical retina (and the surround's noise) form the region. An opening removes thin
   lines (frames, axes, stray pixels), a closing mends thin surround-coloured lines across the retina, the
   largest component is kept and its holes filled. Its edge points, except those on the image border (where the
   photo is cut) and on long horizontal or vertical runs (frames, legend boxes, a mask's straight cut), get
   circles by RANSAC on three-point circles and least-squares fits of the inliers (a notch is an outlier); of
   those the edge supports, the one the region fills best is the retina's.
2. Fine, on a grid FINE_SIDE px on its shorter side: radial colour profiles across the coarse circle give the
   edge where the profile drops through the same level, to a fraction of a pixel (profiles that leave the image
   are cut edges and are dropped); RANSAC and least squares again.

Both grids are fixed relative to the picture, not to its pixels: each grid pixel is the exact mean of the image
area it covers (images smaller than a grid are used as given). A photograph and its thumbnail, or the same scene
from a 5 and a 10 megapixel camera, give the same grids, so the same region, circle, fill and verdict; every size
in pixels below (morphology windows, fit tolerances, border margins) is a fixed share of the picture. Issue 25:
the coarse step used to run on a strided copy whose size (85 to 105 rows) moved with the canvas, and one
channel-shifted photo measured a fill of 0.85 to 0.94 by its size, accepted at some and refused at others.

An image is rejected (r == 0 with the reason in DiscFit.problem) when nothing differs from the surround, when
the region is small, or when its edge is not a circle (few edge points on the fit, a short arc, or a region that
does not fill its circle: DiscFit.fill, the region's IoU with its circle, below MIN_FILL; see near_threshold).
Coordinates are continuous: pixel i covers [i, i+1), so a disc found on an image reduced by a factor f is the
full image's disc divided by f. numpy/scipy only: `prepare` workers stay torch-free (the circle fits and RANSAC
are written here: scikit-image has them, but is not worth a dependency for 40 lines).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

WORK_SIDE = 160  # the coarse step's grid: its longer side, px
FINE_SIDE = 256  # the fine step's grid: its shorter side, px (no more than the shorter side of locate's thumbnails)
MIN_CONTRAST = 10.0  # colour distance (0-441) between surround and typical retina below which there is none
EDGE_LEVEL = 0.25  # the edge lies where the colour distance falls through 1/4 of the surround->retina step
MIN_RADIUS = 0.15  # of the shorter image side: a smaller round region is not a fundus photograph
MIN_INLIERS = 0.4  # share of edge points on the circle (coarse), of profiles (fine)
MIN_ARC_DEG = 90.0  # the circle must be seen over at least this much of its circumference (10-degree bins)
STRAIGHT_RUN = 0.2  # of the shorter side: an image row or column with more edge points holds a straight edge
MIN_FILL = 0.85  # IoU of the region with the fitted circle (inside the image)
NEAR_FILL_MARGIN = 0.05  # a fill this close to MIN_FILL, either side, is near the threshold (see near_threshold)
PROFILES = 120  # radial profiles of the fine step
PROFILE_SAMPLES = 32
PROFILE_HALF_WIDTH = 0.05  # of r: the fine step looks this far inside and outside the coarse circle


@dataclass(frozen=True)
class DiscFit:
    """A disc in continuous pixel coordinates; r == 0 and `problem` says why when there is no retina.

    `fill` is the IoU of the coarse region with its fitted circle, the figure MIN_FILL judges; 0.0 where no circle
    was fitted (a blank image, a region too small)."""

    cx: float
    cy: float
    r: float
    problem: str | None = None
    fill: float = 0.0

    @property
    def disc(self) -> tuple[float, float, float]:
        return self.cx, self.cy, self.r


# -- circle fits ---------------------------------------------------------------------------------------------------
def _kasa(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Algebraic least-squares circle: x^2 + y^2 = a x + b y + c (linear, needs no start)."""
    design = np.stack([x, y, np.ones_like(x)], axis=1)
    (a, b, c), *_ = np.linalg.lstsq(design, x * x + y * y, rcond=None)
    cx, cy = a / 2, b / 2
    return float(cx), float(cy), float(math.sqrt(max(c + cx * cx + cy * cy, 0.0)))


def _geometric(x: np.ndarray, y: np.ndarray, start, steps: int = 8) -> tuple[float, float, float]:
    """Gauss-Newton on the orthogonal distances |p - c| - r (unbiased on short arcs, unlike the algebraic fit)."""
    cx, cy, r = start
    for _ in range(steps):
        dx, dy = x - cx, y - cy
        d = np.maximum(np.hypot(dx, dy), 1e-9)
        jac = np.stack([-dx / d, -dy / d, -np.ones_like(d)], axis=1)
        delta = np.linalg.solve(jac.T @ jac, jac.T @ (r - d))  # normal equations of the 3-parameter step
        cx, cy, r = cx + delta[0], cy + delta[1], r + delta[2]
        if abs(delta).max() < 1e-3:
            break
    return float(cx), float(cy), float(abs(r))


def _kasa_each(x: np.ndarray, y: np.ndarray, weights: np.ndarray):
    """_kasa for every row of weights (H, N) at once: the algebraic circle through each hypothesis's inliers."""
    design = np.stack([x, y, np.ones_like(x)], axis=1)
    normal = (weights @ (design[:, :, None] * design[:, None, :]).reshape(len(x), 9)).reshape(-1, 3, 3)
    rhs = weights @ (design * (x * x + y * y)[:, None])
    try:
        a, b, c = np.linalg.solve(normal, rhs[..., None])[..., 0].T
    except np.linalg.LinAlgError:  # a hypothesis with under 3 inliers among the scored points
        a, b, c = (np.linalg.pinv(normal) @ rhs[..., None])[..., 0].T
    cx, cy = a / 2, b / 2
    return cx, cy, np.sqrt(np.maximum(c + cx * cx + cy * cy, 0))


def _ransac(x: np.ndarray, y: np.ndarray, tol: float, r_range, hypotheses: int = 128, scored: int = 256,
            candidates: int = 4) -> list:
    """Circles through three edge points that most other points lie on, each refitted once to those points and
    scored again, best first, at most `candidates` of them and no two alike (fixed seed: same input, same discs).

    A circle through three points of a pixel grid is jittery; refitting it to its inliers takes every hypothesis
    near an arc to nearly the same circle, so the candidates are the arcs the edge holds, not the draws."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(x), (hypotheses, 3))
    px, py = x[idx], y[idx]  # (H, 3)
    # circle through 3 points: solve [x y 1][a b c]^T = x^2 + y^2 for each triple (degenerate ones skipped)
    mats = np.stack([px, py, np.ones_like(px)], axis=2)
    ok = np.abs(np.linalg.det(mats)) > 1e-3
    if not ok.any():
        return None
    abc = np.linalg.solve(mats[ok], (px * px + py * py)[ok][..., None])[..., 0]
    cx, cy = abc[:, 0] / 2, abc[:, 1] / 2
    r = np.sqrt(np.maximum(abc[:, 2] + cx * cx + cy * cy, 0))
    plausible = (r >= r_range[0]) & (r <= r_range[1])
    if not plausible.any():
        return None
    cx, cy, r = cx[plausible], cy[plausible], r[plausible]
    step = max(1, len(x) // scored)  # scoring on an evenly spread subset is as good and much cheaper
    sx, sy = x[::step], y[::step]

    def on_circle(cx, cy, r):  # |d - r| < tol, without square roots
        d2 = (sx[None] - cx[:, None]) ** 2 + (sy[None] - cy[:, None]) ** 2
        return (d2 > (np.maximum(r - tol, 0) ** 2)[:, None]) & (d2 < ((r + tol) ** 2)[:, None])

    cx, cy, r = _kasa_each(sx, sy, on_circle(cx, cy, r).astype(np.float64))
    plausible = (r >= r_range[0]) & (r <= r_range[1])
    if not plausible.any():
        return None
    cx, cy, r = cx[plausible], cy[plausible], r[plausible]
    score = on_circle(cx, cy, r).sum(axis=1)
    circles = np.stack([cx, cy, r], axis=1)
    unlike = np.ones(len(circles), bool)  # not within tol of a chosen circle in centre and radius
    chosen: list = []
    for i in np.argsort(-score, kind="stable"):
        if unlike[i]:
            chosen.append(tuple(float(v) for v in circles[i]))
            unlike &= np.abs(circles - circles[i]).max(axis=1) > tol
            if len(chosen) == candidates:
                break
    return chosen


def _robust_circles(x, y, tol: float, r_range, hypotheses: int = 128, geometric: bool = True,
                    candidates: int = 4) -> list:
    """RANSAC, then least squares on the inliers (geometric, or the cheaper algebraic fit), thrice, from each of
    RANSAC's few best circles; -> [(refined circle, its inlier mask)], RANSAC's best first.

    Several, because where an edge holds two arcs of similar support (a channel shifted by a misregistered camera)
    which one RANSAC's single best lies on depends on the random triples drawn and on a pixel or two of the edge:
    the callers choose among the refined circles by what they measure."""
    fits = []
    for circle in _ransac(x, y, tol, r_range, hypotheses, candidates=candidates) or []:
        for _ in range(3):
            inliers = np.abs(np.hypot(x - circle[0], y - circle[1]) - circle[2]) < tol
            if inliers.sum() < 5:
                break
            circle = _geometric(x[inliers], y[inliers], circle) if geometric else _kasa(x[inliers], y[inliers])
        else:
            fits.append((circle, np.abs(np.hypot(x - circle[0], y - circle[1]) - circle[2]) < tol))
    return fits


def _robust_circle(x, y, tol: float, r_range, hypotheses: int = 128, geometric: bool = True):
    """The circle of _robust_circles with the most inliers, and its inlier mask; None when there is none."""
    fits = _robust_circles(x, y, tol, r_range, hypotheses, geometric)
    return max(fits, key=lambda fit: int(fit[1].sum())) if fits else None


def _arc_degrees(x, y, cx, cy) -> float:
    """How much of the circumference the points cover, in 10-degree bins."""
    bins = np.unique((np.degrees(np.arctan2(y - cy, x - cx)) // 10).astype(int))
    return 10.0 * len(bins)


# -- the two steps -------------------------------------------------------------------------------------------------
def _colour_distance(pixels: np.ndarray, surround: np.ndarray) -> np.ndarray:
    return np.sqrt(((pixels - surround) ** 2).sum(axis=-1))


def _fill_holes(region: np.ndarray) -> np.ndarray:
    """The region plus every part of its complement that does not reach the image border (dark lesions, the
    macula, a legend box's text inside the retina)."""
    labels, _ = ndimage.label(~region)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return region | ~np.isin(labels, border)


def _bilinear(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Colours (N, C) at continuous coordinates (pixel i covers [i, i+1)), edge pixels repeated outside."""
    h, w = img.shape[:2]
    u = np.clip(x - 0.5, 0, w - 1)
    v = np.clip(y - 0.5, 0, h - 1)
    u0 = np.minimum(u.astype(np.int64), w - 2) if w > 1 else np.zeros_like(u, np.int64)
    v0 = np.minimum(v.astype(np.int64), h - 2) if h > 1 else np.zeros_like(v, np.int64)
    fu, fv = (u - u0).astype(np.float32)[:, None], (v - v0).astype(np.float32)[:, None]
    flat = img.reshape(h * w, -1)
    at = v0 * w + u0
    top = flat[at] * (1 - fu) + flat[at + 1] * fu
    bottom = flat[at + w] * (1 - fu) + flat[at + w + 1] * fu
    return top * (1 - fv) + bottom * fv


def _area_average(img: np.ndarray, scale: float, source_scale: float = 1.0, extent=None) -> np.ndarray:
    """The (H, W, C) image on a grid of pixels `scale` image pixels wide, each the exact mean of the image area it
    covers (the pixels a grid line cuts count by their share): grid pixel k covers [k * scale, (k + 1) * scale),
    the last row and column up to the image's end. Float32; the image as given when scale <= source_scale.

    `img` may itself be such a grid (pixel j covering [j * source_scale, (j + 1) * source_scale) of an image of
    `extent` (height, width), the last one what is left): the new grid then has the same geometry as one made
    from that image."""
    if scale <= source_scale:
        return np.asarray(img, np.float32)
    h, w, channels = img.shape
    extent = extent or (h, w)
    rows = _area_weights(h, scale, source_scale, extent[0]) @ img.reshape(h, w * channels)  # (h', w * C)
    rows = np.ascontiguousarray(rows.reshape(-1, w, channels).transpose(1, 0, 2)).reshape(w, -1)
    both = _area_weights(w, scale, source_scale, extent[1]) @ rows  # (w', h' * C)
    return np.ascontiguousarray(both.reshape(both.shape[0], -1, channels).transpose(1, 0, 2), np.float32)


def _area_weights(n: int, scale: float, source_scale: float, extent: float):
    """The sparse (grid pixels, n) matrix of _area_average along one axis: source pixel j covers [j * source_scale,
    (j + 1) * source_scale) up to `extent`, lies in grid pixel floor(j * source_scale / scale), and in the next
    one too where a grid line cuts it (scale >= source_scale); weights are shares of the grid pixel."""
    from scipy import sparse  # here: prepare workers and config checks that never locate a disc do not load it

    count = math.ceil(extent / scale - 1e-9)
    lines = np.minimum(np.arange(count + 1) * scale, extent)  # grid line k at k * scale, the last at the end
    start = np.arange(n) * source_scale
    end = np.minimum(start + source_scale, extent)
    cell = np.minimum((start / scale).astype(np.int64), count - 1)
    inside = np.clip(np.minimum(end, lines[cell + 1]) - start, 0, None)  # the part in its grid pixel, the rest
    cells = np.concatenate([cell, np.minimum(cell + 1, count - 1)])  # in the next
    weights = np.concatenate([inside, np.maximum(end - start - inside, 0)]) / np.diff(lines)[cells]
    pixels = np.concatenate([np.arange(n), np.arange(n)])
    return sparse.csr_matrix((weights.astype(np.float32), (cells, pixels)), shape=(count, n))


def _no_disc(w: int, h: int, why: str, fill: float = 0.0) -> DiscFit:
    return DiscFit(w / 2.0, h / 2.0, 0.0, why, fill)


def find_disc(image: np.ndarray) -> DiscFit:
    """The retina's circle in an (H, W, C) or (H, W) image, or r == 0 and the reason there is none."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    img = img[..., :3]
    h_full, w_full = img.shape[:2]
    if min(h_full, w_full) < 16:
        return _no_disc(w_full, h_full, "image smaller than 16 px")

    # Both steps on grids fixed relative to the picture (continuous coordinate u of a grid is u * its scale in the
    # image): the region, its circle and its fill are then the same at every canvas size. The coarse grid is made
    # from the fine one (one pass over a large image, not two; the fine grid is itself the same at every size).
    fine_scale = max(1.0, min(h_full, w_full) / FINE_SIDE)
    fine = _area_average(img, fine_scale)
    coarse_scale = max(1.0, max(h_full, w_full) / WORK_SIDE)
    to_fine = coarse_scale / fine_scale  # >= 1: a grid with a shorter side of FINE_SIDE is over WORK_SIDE long
    small = _area_average(fine, coarse_scale, fine_scale, (h_full, w_full))
    h, w = small.shape[:2]
    patch = max(2, min(h, w) // 12)
    corners = np.concatenate([small[:patch, :patch], small[:patch, -patch:], small[-patch:, :patch],
                              small[-patch:, -patch:]]).reshape(-1, small.shape[2])
    surround = np.median(corners, axis=0)
    dist = _colour_distance(small, surround)
    corner_dist = _colour_distance(corners, surround)
    background = float(np.median(corner_dist))
    # The surround's noise (JPEG, sensor): a robust spread, so a legend box in one corner does not count.
    ceiling = background + max(4 * 1.4826 * float(np.median(np.abs(corner_dist - background))), 2.0)
    differs = dist > ceiling + MIN_CONTRAST / 2
    min_r = MIN_RADIUS * min(h, w)
    if not differs.any():
        return _no_disc(w_full, h_full, "nothing differs from the surround (a blank image)")
    if differs.sum() < 0.5 * math.pi * min_r ** 2:
        return _no_disc(w_full, h_full, "what differs from the surround is too small for a retina")
    # The median over everything that differs is the retina's (overlays are a small share of those pixels).
    retina_level = float(np.median(dist[differs][::4]))
    if retina_level - background < MIN_CONTRAST:
        return _no_disc(w_full, h_full, "nothing differs clearly from the surround (too dark or faint)")
    level = max(background + EDGE_LEVEL * (retina_level - background), ceiling + 2)

    # Opening removes thin structures that differ from the surround (frame and axis lines, stray pixels);
    # closing then mends the retina where a thin line of surround colour crosses it. Square windows: fast.
    size = 2 * max(1, round(min(h, w) / 60)) + 1
    mask = (dist > level).astype(np.uint8)
    mask = ndimage.maximum_filter(ndimage.minimum_filter(mask, size, mode="nearest"), size, mode="nearest")
    mask = ndimage.minimum_filter(ndimage.maximum_filter(mask, size, mode="nearest"), size, mode="nearest")
    labels, count = ndimage.label(mask)
    if count == 0:
        return _no_disc(w_full, h_full, "no region differs from the surround")
    region = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    region = _fill_holes(region)
    if region.sum() < 0.5 * math.pi * min_r ** 2:
        return _no_disc(w_full, h_full, "the largest region is too small for a retina")

    edge = region & ~ndimage.binary_erosion(region, border_value=1)
    edge[:2], edge[-2:], edge[:, :2], edge[:, -2:] = False, False, False, False  # the image border: cuts
    # Long horizontal or vertical runs are frames, axis lines, legend boxes or a camera mask's straight cut; a
    # circle is that flat only over about sqrt(2 r) pixels at its extremes, a few points the fit can spare.
    straight = max(6, STRAIGHT_RUN * min(h, w))
    edge[edge.sum(axis=1) > straight] = False
    edge[:, edge.sum(axis=0) > straight] = False
    ys, xs = np.nonzero(edge)
    x, y = xs + 0.5, ys + 0.5
    if len(x) < 12:
        return _no_disc(w_full, h_full, "the region has no round edge inside the image")
    fits = _robust_circles(x, y, tol=1.5, r_range=(min_r, 2.0 * max(h, w)), hypotheses=256, geometric=False,
                           candidates=8)  # algebraic fits on ~300 points: more draws and candidates are cheap
    if not fits:
        return _no_disc(w_full, h_full, "no circle fits the region's edge")
    # Of the circles the edge supports, the one the region fills best (the first of equals): the fill is what the
    # verdict measures, and it changes little between two circles where the edge's support for them nearly ties.
    judged = [(circle, _fill(region, circle), inliers) for circle, inliers in fits]
    judged = [(_shape_problem(x, y, inliers, circle, fill), fill, circle) for circle, fill, inliers in judged]
    problem, fill, (cx, cy, r) = max(judged, key=lambda j: (j[0] is None, j[1]))
    if problem:
        return _no_disc(w_full, h_full, problem, fill)

    # The fine step on its grid, then back to the image's pixels.
    refined = _refine(fine, (cx * to_fine, cy * to_fine, r * to_fine), surround, level)
    if refined is None:
        return _no_disc(w_full, h_full, "the retina's edge is not a circle (too few edge profiles fit)", fill)
    cx, cy, r = (v * fine_scale for v in refined)
    if r < MIN_RADIUS * min(h_full, w_full):
        return _no_disc(w_full, h_full, f"the round region is too small (radius {r:.0f} px)", fill)
    return DiscFit(cx, cy, r, None, fill)


def _fill(region: np.ndarray, circle) -> float:
    """IoU of the region with the circle, both inside the image (the circle by pixel centres)."""
    cx, cy, r = circle
    h, w = region.shape
    yy, xx = np.ogrid[0:h, 0:w]
    circle_mask = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r
    return float((circle_mask & region).sum() / max((circle_mask | region).sum(), 1))


def near_threshold(fit: DiscFit) -> bool:
    """Whether the fill of a fit, accepted or refused, lies within NEAR_FILL_MARGIN of MIN_FILL.

    The fill is measured on a grid fixed relative to the picture, so it no longer moves with the canvas size, but
    a photograph whose retina is not quite round (a channel shifted by a misregistered camera, a mask's cut, a
    large notch) can still land on either side of MIN_FILL by a hundredth: `tltrain prepare` lists the accepted
    ones with their IoU (the refusal text names it already) so that a person can look at them. False where no
    circle was fitted (fill 0.0)."""
    return fill_near_threshold(fit.fill)


def fill_near_threshold(fill: float) -> bool:
    """near_threshold for a fill already measured (prepare keeps the fill, not the fit)."""
    return fill > 0 and abs(fill - MIN_FILL) <= NEAR_FILL_MARGIN


def _shape_problem(x, y, inliers, circle, fill: float) -> str | None:
    """Why the coarse region is not a retina, or None (fill: its IoU with the circle)."""
    cx, cy, r = circle
    share = inliers.mean()
    if share < MIN_INLIERS:
        return f"the region's edge is not a circle ({share:.0%} of edge points on the best circle)"
    arc = _arc_degrees(x[inliers], y[inliers], cx, cy)
    if arc < MIN_ARC_DEG:
        return f"the region's round edge is too short ({arc:.0f} degrees)"
    if fill < MIN_FILL:
        return f"the region does not fill its circle (IoU {fill:.2f})"
    return None


def _refine(img: np.ndarray, coarse, surround: np.ndarray, level: float):
    """Sub-pixel edge points on radial profiles of the fine grid, and a robust circle through them."""
    h, w = img.shape[:2]
    cx, cy, r = coarse
    angles = np.linspace(0, 2 * math.pi, PROFILES, endpoint=False)
    half = max(3.0, PROFILE_HALF_WIDTH * r)
    radii = np.linspace(r - half, r + half, PROFILE_SAMPLES)
    px = cx + np.cos(angles)[:, None] * radii[None]  # (profiles, samples), continuous coordinates
    py = cy + np.sin(angles)[:, None] * radii[None]
    profile = _colour_distance(_bilinear(img, px.ravel(), py.ravel()), surround).reshape(px.shape)
    inside = profile >= level
    falls = inside[:, :-1] & ~inside[:, 1:]
    found = falls.any(axis=1)
    j = np.argmax(falls, axis=1)
    rows = np.arange(len(angles))
    a, b = profile[rows, j], profile[rows, j + 1]
    step = radii[1] - radii[0]
    rho = radii[j] + step * (a - level) / np.maximum(a - b, 1e-6)
    ex, ey = cx + np.cos(angles) * rho, cy + np.sin(angles) * rho
    margin = 1.5  # an edge on the image border is where the photo was cut, not the retina's edge
    keep = found & (ex > margin) & (ex < w - margin) & (ey > margin) & (ey < h - margin)
    if keep.sum() < 24:
        return None
    ex, ey = ex[keep], ey[keep]
    fit = _robust_circle(ex, ey, tol=max(1.0, 0.005 * r), r_range=(0.9 * r, 1.1 * r), hypotheses=64)
    if fit is None:
        return None
    circle, inliers = fit
    if (inliers.sum() < 24 or inliers.mean() < MIN_INLIERS
            or _arc_degrees(ex[inliers], ey[inliers], circle[0], circle[1]) < MIN_ARC_DEG):
        return None
    return circle


# -- the API the rest of tltrain uses -------------------------------------------------------------------------------
def estimate_disc(image: np.ndarray) -> tuple[float, float, float]:
    """(cx, cy, r) in pixels of an (H, W, C) or (H, W) image; r == 0 when no retina is found."""
    return find_disc(image).disc


def disc_found(disc: tuple[float, float, float], width: int, height: int) -> bool:
    """find_disc reports r == 0 for an image without a retina (blank, foreign, too small a round region)."""
    return disc[2] >= MIN_RADIUS * min(width, height)


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
    return locate_disc_fit(image).disc


def locate_disc_fit(image) -> DiscFit:
    """locate_disc with the reason when there is no retina (prepare reports it as the file's problem)."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    factor = max(1, min(img.size) // 256)
    fit = find_disc(np.asarray(img.reduce(factor) if factor > 1 else img))
    if fit.problem:
        return fit
    # continuous pixel coordinates: the thumbnail's disc times the factor is the image's
    return DiscFit(fit.cx * factor, fit.cy * factor, fit.r * factor, None, fit.fill)
