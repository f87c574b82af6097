"""The preprocessing definition (tltrain/preprocess.py) as fused CPU kernels (numba), so that on the CPU the loaders
are bound by JPEG decoding rather than by float arithmetic.

- `crop_resize_u8`: the disc square cut from the decoded photo (black outside it) and resized to size x size with
  the definition's antialiased bilinear filter, straight from the (H, W, 3) uint8 pixels: no crop copy and no
  float copy of the photo; one pass down the rows the filter touches, one along them.
- `filter_image`: the normalised masked blur, the gain, rounding and the circle mask of one (3, S, S) uint8 crop in
  one kernel: the blur is a row pass and a column pass with the definition's taps (pairs of symmetric taps at
  once) and a zero border, vectorised along the image rows. Its output is uint8 where every value fits (the
  filter rounds and clamps), so a DataLoader worker hands over a quarter of the bytes of float32.
- `normalise_u8`: uint8 grey levels -> (x - mean) / std through a 256-entry table per channel, in one pass.

Why numba (measured on 2 cores, benchmarks/RESULTS.md "CPU kernels"): the torch code of the definition spends its
time in float copies around each op (the antialiased resize of a 1829 px square: 39 ms against 4 ms here; the
filter of a 3x512x512 crop: 11 ms, 8 of them in OpenCV's float blur, against ~6 ms here), and OpenCV's uint8
filters round in between (p99 4 grey levels off the definition). The kernels keep float32 sums like the torch
code, so they meet the definition's bound (tests/test_preprocess_cpu.py: against the torch code and the float64
definition on random and photographic inputs). Compiled once per machine (cache=True) and run without the GIL,
so the images of a batch go through side by side on torch's intra-op threads.
"""
from __future__ import annotations

import functools

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - numba is an install requirement; the torch code still works without it
    numba = None

AVAILABLE = numba is not None


def _jit(fn):
    return numba.njit(cache=True, nogil=True, fastmath=False)(fn) if AVAILABLE else fn


@functools.lru_cache(maxsize=64)
def antialias_weights(length: int, size: int):
    """The 1-D weights of torch's antialiased bilinear resize (F.interpolate(..., antialias=True,
    align_corners=False), Pillow's algorithm) from `length` to `size` samples: (first, weights) with first (size,)
    int64 the first input index of each output and weights (size, K) float32, zero-padded. Samples outside the
    photo are black in the crop: the kernel skips them, their weight stays in the normalisation."""
    first, weights = antialias_weights64(length, size)
    return first, weights.astype(np.float32)


@functools.lru_cache(maxsize=64)
def antialias_weights64(length: int, size: int):
    """antialias_weights in float64 (what torch uses for float64 input: tltrain.preprocess.valid_profile)."""
    scale = length / size
    support = scale if scale >= 1.0 else 1.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    centers = scale * (np.arange(size) + 0.5)
    first = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    last = np.minimum((centers + support + 0.5).astype(np.int64), length)
    k = int((last - first).max())
    offsets = first[:, None] + np.arange(k)[None, :]
    x = (offsets - centers[:, None] + 0.5) * inv
    weights = np.where((offsets < last[:, None]), np.clip(1.0 - np.abs(x), 0.0, None), 0.0)
    weights /= weights.sum(1, keepdims=True)
    return first, weights  # cached: callers must not write to them


@_jit
def _add_scaled(dst, src, weight):
    """dst += weight * src (float32 sums of uint8 or float32 samples); a loop LLVM vectorises."""
    for q in range(dst.shape[0]):
        dst[q] += weight * np.float32(src[q])


@_jit
def _crop_resize_kernel(image, x0, y0, first_y, wy, first_x, wx, out):
    """image (H, W, 3) uint8; the square from (x0, y0), black outside the photo -> out (3, S, S) uint8."""
    h, w = image.shape[0], image.shape[1]
    size = out.shape[1]
    flat = image.reshape(h, w * 3)
    span = first_x[size - 1] + wx.shape[1]  # square columns the horizontal pass may read (zero weight past side)
    rows = np.zeros((span, 3), np.float32)  # the vertical pass's output row, per square column and channel
    flat_rows = rows.reshape(span * 3)
    lo = max(0, -x0)  # square columns inside the photo: [lo, hi)
    hi = min(span, w - x0)
    for i in range(size):
        flat_rows[:] = 0.0
        if hi > lo:
            dst = flat_rows[lo * 3:hi * 3]
            for k in range(wy.shape[1]):
                y = y0 + first_y[i] + k
                if wy[i, k] != 0.0 and 0 <= y < h:
                    _add_scaled(dst, flat[y, (x0 + lo) * 3:(x0 + hi) * 3], wy[i, k])
        for j in range(size):
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            start = np.uint64(first_x[j])  # unsigned: no negative-index handling in the loop
            for k in range(wx.shape[1]):
                weight = wx[j, k]
                c = start + np.uint64(k)
                a0 += weight * rows[c, 0]
                a1 += weight * rows[c, 1]
                a2 += weight * rows[c, 2]
            out[0, i, j] = np.uint8(min(max(np.rint(a0), 0.0), 255.0))
            out[1, i, j] = np.uint8(min(max(np.rint(a1), 0.0), 255.0))
            out[2, i, j] = np.uint8(min(max(np.rint(a2), 0.0), 255.0))


def crop_resize_u8(image: np.ndarray, x0: int, y0: int, side: int, size: int) -> np.ndarray:
    """(H, W, 3) uint8 photo -> (3, size, size) uint8: tltrain.preprocess.resize_square(crop_square(...), size)."""
    image = np.ascontiguousarray(image)
    first, weights = antialias_weights(side, size)  # a square: the same weights down the rows and along them
    out = np.empty((3, size, size), np.uint8)
    _crop_resize_kernel(image, int(x0), int(y0), first, weights, first, weights, out)
    return out


@_jit
def _set_scaled(dst, src, weight):
    """dst = weight * src."""
    for q in range(dst.shape[0]):
        dst[q] = weight * src[q]


@_jit
def _add_pair(dst, a, b, t):
    """dst += t * (a + b): two taps of a symmetric filter at once."""
    for q in range(dst.shape[0]):
        dst[q] += t * (a[q] + b[q])


@_jit
def _add_pairs(dst, a, b, c, d, s, t):
    """dst += s * (a + b) + t * (c + d): four taps, one pass over dst."""
    for q in range(dst.shape[0]):
        dst[q] += s * (a[q] + b[q]) + t * (c[q] + d[q])


@_jit
def _blur_row(dst, padded, taps, lo, hi):
    """dst[j] = sum_k taps[k] * padded[j + k] for j in [lo, hi), a symmetric window (padded: len(dst) +
    len(taps) - 1 samples); dst outside [lo, hi) is left alone."""
    n, half = hi - lo, (taps.shape[0] - 1) // 2
    last = taps.shape[0] - 1
    out = dst[lo:hi]
    _set_scaled(out, padded[lo + half:lo + half + n], taps[half])
    k = 0
    while k + 1 < half:
        _add_pairs(out, padded[lo + k:lo + k + n], padded[lo + last - k:lo + last - k + n],
                   padded[lo + k + 1:lo + k + 1 + n], padded[lo + last - k - 1:lo + last - k - 1 + n], taps[k],
                   taps[k + 1])
        k += 2
    if k < half:
        _add_pair(out, padded[lo + k:lo + k + n], padded[lo + last - k:lo + last - k + n], taps[k])


@_jit
def _blur_column(dst, plane, i, taps, zero, lo, hi):
    """dst[lo:hi] = columns [lo, hi) of row i of the column blur of plane (rows outside the plane are zero)."""
    size, half = plane.shape[0], (taps.shape[0] - 1) // 2
    out, none = dst[lo:hi], zero[lo:hi]
    _set_scaled(out, plane[i, lo:hi], taps[half])
    k = 0
    while k < half:
        top, bottom = i - half + k, i + half - k
        a = plane[top, lo:hi] if top >= 0 else none
        b = plane[bottom, lo:hi] if bottom < size else none
        if k + 1 < half:
            c = plane[top + 1, lo:hi] if top + 1 >= 0 else none
            d = plane[bottom - 1, lo:hi] if bottom - 1 < size else none
            _add_pairs(out, a, b, c, d, taps[k], taps[k + 1])
            k += 2
        else:
            _add_pair(out, a, b, taps[k])
            k += 1


@_jit
def _epilogue(target, source, blurred, col_factor, row_factor, gain, offset):
    """target = round(clamp(gain * P - a b_j gauss0(P) + offset, 0, 255)) along one row's run inside the mask.
    Loops from 0 over slices: an index LLVM knows is not negative lets it vectorise (numba checks for negative
    indices otherwise; a loop over range(lo, hi) ran 12x slower)."""
    magic = np.float32(12582912.0)  # 1.5 * 2**23: (v + magic) - magic rounds half to even, like torch.round
    low, high = np.float32(0.0), np.float32(255.0)
    for j in range(target.shape[0]):
        v = gain * np.float32(source[j]) - row_factor * col_factor[j] * blurred[j] + offset
        target[j] = (min(max(v, low), high) + magic) - magic


@_jit
def _needed_columns(first, end, half):
    """Per row r, the columns [lo[r], hi[r]) of the row pass that the column pass of rows r - half .. r + half
    reads, given each output row's run [first[i], end[i]) inside the mask: outside the circle mask (36 % of the
    square at 0.9 R) nothing is blurred."""
    size = first.shape[0]
    lo, hi = np.full(size, size, np.int64), np.zeros(size, np.int64)
    for i in range(size):
        if end[i] > first[i]:
            for r in range(max(0, i - half), min(size, i + half + 1)):
                lo[r] = min(lo[r], first[i])
                hi[r] = max(hi[r], end[i])
    return lo, hi


@_jit
def _filter_kernel(crop, taps, row_factor, col_factor, first, end, gain, offset, out):
    """crop (3, S, S) uint8 -> out (3, S, S) = round(clamp(gain * P - a_i b_j gauss0(P) + offset)), offset outside
    the mask (row i: inside on [first[i], end[i]) only), with a = gain * vy / gauss0(vy), b = vx / gauss0(vx) (0
    where the normaliser is 0). out is float32, or uint8 when every value fits (the caller checks the offset)."""
    channels, size = crop.shape[0], crop.shape[1]
    half = (taps.shape[0] - 1) // 2
    need_lo, need_hi = _needed_columns(first, end, half)
    padded = np.zeros(size + 2 * half, np.float32)
    rowblur = np.empty((size, size), np.float32)  # only what the column pass reads is ever written and read
    zero = np.zeros(size, np.float32)
    acc = np.empty(size, np.float32)
    for c in range(channels):
        for r in range(size):  # row pass (zero outside the square) where the column pass will read it
            if need_hi[r] > need_lo[r]:
                source = crop[c, r]
                for j in range(size):
                    padded[half + j] = np.float32(source[j])
                _blur_row(rowblur[r], padded, taps, need_lo[r], need_hi[r])
        for i in range(size):  # column pass inside the mask, then the epilogue of row i
            lo, hi = first[i], max(first[i], end[i])
            target = out[c, i]
            target[:lo] = offset
            target[hi:] = offset
            if hi > lo:
                _blur_column(acc, rowblur, i, taps, zero, lo, hi)
                _epilogue(target[lo:hi], crop[c, i, lo:hi], acc[lo:hi], col_factor[lo:hi], row_factor[i], gain,
                          offset)


def filter_image(crop: np.ndarray, factors: np.ndarray, taps: np.ndarray, runs: tuple[np.ndarray, np.ndarray],
                 gain: float, offset: float, out: np.ndarray) -> None:
    """tltrain.preprocess.ben_graham_filter of one (3, S, S) uint8 crop into out (float32, or uint8 for an
    integer offset in [0, 255]); factors (2, S) = [gain * vy / gauss0(vy), vx / gauss0(vx)], taps float32;
    runs = mask_runs(mask): where the mask keeps pixels."""
    first, end = runs
    _filter_kernel(np.ascontiguousarray(crop), taps, factors[0].astype(np.float32), factors[1].astype(np.float32),
                   first, end, np.float32(gain), np.float32(offset), out)


def mask_runs(inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(S, S) bool mask -> per row the run [first, end) of its True pixels (0, 0 when none); a ValueError when a
    row holds more than one run (the kernel keeps one per row: a disc, or the whole square)."""
    inside = np.asarray(inside, bool)
    starts = np.diff(inside.astype(np.int8), axis=1, prepend=0) == 1
    if (starts.sum(1) > 1).any():
        raise ValueError("the filter's mask must be one run of pixels per row (a disc or the whole square)")
    any_inside = inside.any(1)
    first = np.where(any_inside, inside.argmax(1), 0).astype(np.int64)
    end = np.where(any_inside, inside.shape[1] - inside[:, ::-1].argmax(1), 0).astype(np.int64)
    return first, end


@_jit
def _lookup_kernel(grey, table, out):
    """out[n, c] = table[c, grey[n, c]]: uint8 grey levels -> their normalised values, one pass."""
    for n in range(grey.shape[0]):
        for c in range(grey.shape[1]):
            src, dst, row = grey[n, c].reshape(-1), out[n, c].reshape(-1), table[c]
            for q in range(src.shape[0]):
                dst[q] = row[src[q]]


def normalise_u8(grey: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(N, C, H, W) uint8 -> float32 through a (C, 256) table of the normalised value of each grey level."""
    out = np.empty(grey.shape, np.float32)
    _lookup_kernel(np.ascontiguousarray(grey), table, out)
    return out


@functools.lru_cache(maxsize=None)
def warm() -> None:
    """Compile (or load from numba's cache) the kernels in this process. Call it before forking DataLoader
    workers: they inherit the compiled code, where each fresh worker would otherwise spend ~0.4 s loading it
    (measured), at every epoch."""
    if not AVAILABLE:
        return
    image = np.zeros((8, 8, 3), np.uint8)
    crop = crop_resize_u8(image, 0, 0, 8, 8)
    taps = np.full(3, 1 / 3, np.float32)
    normalise_u8(crop[None], np.zeros((3, 256), np.float32))
    runs = mask_runs(np.ones((8, 8), bool))
    for dtype in (np.uint8, np.float32):  # the two outputs tltrain.preprocess.grey_levels asks for
        filter_image(crop, np.ones((2, 8)), taps, runs, 4.0, 128.0, np.empty(crop.shape, dtype))
