"""Ben Graham's filter as two Triton kernels: the GPU twin of tltrain.preprocess.finish (the torch reference).

Why two passes: the 2-D Gaussian is separable, so a horizontal pass writes a float32 row-blurred image and a
vertical pass reads it back and does everything else in registers (gain, round half-to-even, clamp to [0, 255],
disc mask, normalisation, dtype, optional per-sample horizontal flip, NCHW or channels_last store). Every output
element is one direct sum over 2*ceil(3*sigma)+1 normalised taps with reflect-101 borders, accumulated in float32:
the same numbers as the reference up to float32 summation order (a rare one-grey-level flip at a .5 boundary).

Input is the uint8 batch as decoded (NHWC) or as cropped (NCHW); each sample has its own disc centre and radius
(the mask), its own sigma if wanted (per-sample tap tables, zero-padded to the widest) and its own flip bit.
out_dtype=torch.uint8 returns the filtered grey levels before normalisation (for offline shards and for tests).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from tltrain import preprocess as P
from tltrain.errors import ConfigError, choices_error

LAYOUTS = ("NCHW", "NHWC")
OUT_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "uint8"}
BLOCK_ROWS = 16  # GPU tile: 16 rows x 64 columns per program (coalesced 64-wide row segments)
BLOCK_COLS = 64


@triton.jit
def _reflect101(idx, size):
    """Mirror an index about the first/last pixel without repeating it (OpenCV's BORDER_REFLECT_101)."""
    idx = tl.where(idx < 0, -idx, idx)
    return tl.where(idx > size - 1, 2 * (size - 1) - idx, idx)


@triton.jit
def _round_half_even(v):
    """torch.round semantics; written out because libdevice.rint has no interpreter (CPU test) implementation."""
    f = tl.floor(v)
    frac = v - f
    f_is_odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (frac > 0.5) | ((frac == 0.5) & f_is_odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _u8_to_f32(pixels):
    """uint8 -> float32 as 2^23 + x (exponent bits OR-ed in) minus 2^23: exact for 0..255, and two full-rate
    ALU ops instead of an int-to-float conversion, which Hopper issues at 1/8 of the FMA rate (once per tap)."""
    biased = (pixels.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)
    return biased - 8388608.0


@triton.jit
def _blur_rows_kernel(img_ptr, taps_ptr, tmp_ptr, H, W, n_taps, half,
                      s_n, s_c, s_h, s_w,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Horizontal pass: tmp[n, c, y, x] = sum_k taps[n, k] * img[n, c, y, reflect(x + k - half)] (float32).

    A sample's three planes are stacked into one 3H-row image (row g = c * H + y), so a tile never pads a
    channel dimension and the CPU interpreter runs one program per sample."""
    n = tl.program_id(0)
    g = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = g // H
    y = g % H
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (g[:, None] < 3 * H) & (cols[None, :] < W)
    src = img_ptr + n.to(tl.int64) * s_n + (c * s_c + y * s_h)[:, None]
    tap_row = taps_ptr + n * n_taps
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for k in range(0, n_taps):
        x = _reflect101(cols + (k - half), W)
        pixels = tl.load(src + x[None, :] * s_w, mask=inside, other=0)
        acc += tl.load(tap_row + k) * _u8_to_f32(pixels)
    dst = tmp_ptr + n.to(tl.int64) * 3 * H * W + g[:, None] * W + cols[None, :]
    tl.store(dst, acc, mask=inside)


@triton.jit
def _blur_cols_finish_kernel(img_ptr, taps_ptr, tmp_ptr, out_ptr, geom_ptr, norm_ptr, flip_ptr,
                             H, W, n_taps, half, gain, offset,
                             s_n, s_c, s_h, s_w, o_n, o_c, o_h, o_w,
                             NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Vertical pass + epilogue: blur, gain/round/clamp, disc mask, normalise (or keep grey levels), flip, store."""
    n = tl.program_id(0)
    g = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = g // H
    y = g % H
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (g[:, None] < 3 * H) & (cols[None, :] < W)
    src = tmp_ptr + n.to(tl.int64) * 3 * H * W + (c * H * W)[:, None] + cols[None, :]
    tap_row = taps_ptr + n * n_taps
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for k in range(0, n_taps):
        y_k = _reflect101(y + (k - half), H)
        acc += tl.load(tap_row + k) * tl.load(src + (y_k * W)[:, None], mask=inside, other=0.0)

    pixel_ptr = img_ptr + n.to(tl.int64) * s_n + (c * s_c + y * s_h)[:, None] + cols[None, :] * s_w
    pixels = tl.load(pixel_ptr, mask=inside, other=0).to(tl.float32)
    value = gain * pixels - gain * acc + offset
    value = tl.minimum(tl.maximum(_round_half_even(value), 0.0), 255.0)

    # Disc mask: pixel centres at (x + 0.5, y + 0.5); geom[n] = (cx, cy, (mask_ratio * r)^2, unused).
    dx = cols.to(tl.float32) + 0.5 - tl.load(geom_ptr + n * 4)
    dy = y.to(tl.float32) + 0.5 - tl.load(geom_ptr + n * 4 + 1)
    outside = (dy[:, None] * dy[:, None] + dx[None, :] * dx[None, :]) > tl.load(geom_ptr + n * 4 + 2)
    value = tl.where(outside, offset, value)

    if NORMALIZE:
        mean255 = tl.load(norm_ptr + c, mask=c < 3, other=0.0)
        std255 = tl.load(norm_ptr + 3 + c, mask=c < 3, other=1.0)
        value = (value - mean255[:, None]) / std255[:, None]
    else:
        value = tl.minimum(tl.maximum(_round_half_even(value), 0.0), 255.0)

    flip = tl.load(flip_ptr + n) != 0
    out_cols = tl.where(flip, W - 1 - cols, cols)
    dst = out_ptr + n.to(tl.int64) * o_n + (c * o_c + y * o_h)[:, None] + out_cols[None, :] * o_w
    tl.store(dst, value.to(out_ptr.dtype.element_ty), mask=inside)


def _per_sample(value, n: int, name: str) -> torch.Tensor:
    """A float or a length-n sequence/tensor -> float64 tensor (n,) on the CPU (host-side planning)."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().cpu().reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"{name} needs one value or one per sample ({n}), got {t.numel()}")
    return t


def _tap_table(sigmas: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, int]:
    """(N, 2*half_max+1) float32 taps, each row centred and zero-padded: per-sample sigma in one launch.
    Built once per distinct sigma (a batch usually has one), so planning stays cheap next to the kernels."""
    if not bool((sigmas > 0).all()):
        raise ConfigError(f"blur sigma must be > 0, got {sigmas.min().item():g}")
    distinct, which = torch.unique(sigmas, return_inverse=True)
    halves = [int(math.ceil(3 * float(s))) for s in distinct]
    half_max = max(halves)
    if half_max >= min(height, width):
        raise ConfigError(f"blur sigma {float(distinct[-1]):g} needs a {2 * half_max + 1}-tap window, larger than "
                          f"the {height}x{width} image (reflect-101 border); lower loader.preprocess.sigma_ratio")
    rows = torch.zeros((len(halves), 2 * half_max + 1), dtype=torch.float32)
    for i, (sigma, half) in enumerate(zip(distinct, halves)):
        rows[i, half_max - half:half_max + half + 1] = P.gaussian_taps(float(sigma), torch.float32)
    return rows[which].contiguous(), half_max


def _tile(height: int, width: int) -> tuple[int, int]:
    """GPU: small tiles, many programs. CPU interpreter (tests): one tile per sample, since each program and each
    tile operation costs interpreter overhead regardless of its size."""
    if isinstance(_blur_rows_kernel, InterpretedFunction):
        return min(256, triton.next_power_of_2(3 * height)), min(128, triton.next_power_of_2(width))
    return BLOCK_ROWS, BLOCK_COLS


def _check_batch(images: torch.Tensor, layout: str) -> tuple[int, int, int]:
    if layout not in LAYOUTS:
        raise choices_error("layout", layout, LAYOUTS)
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be a 4-D uint8 batch, got {images.dim()}-D {images.dtype}")
    n, h, w, c = images.shape if layout == "NHWC" else (images.shape[0], *images.shape[2:], images.shape[1])
    if c != 3:
        raise ValueError(f"images must have 3 channels in layout {layout}, got shape {tuple(images.shape)}")
    return n, h, w


def ben_graham_triton(images: torch.Tensor, centers, radii, sigma, gain: float = 4.0, offset: float = 128.0,
                      mask_ratio: float = 0.9, mean: Sequence[float] = P.IMAGENET_MEAN,
                      std: Sequence[float] = P.IMAGENET_STD, out_dtype: torch.dtype = torch.float32,
                      channels_last: bool = False, flip=None, layout: str = "NCHW",
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 batch (N,3,H,W) or (N,H,W,3) -> (N,3,H,W) out_dtype: 4*img - 4*gauss(img) + 128, masked, normalised.

    centers (N,2) = disc centre (x, y) in pixels, radii (N,): mask where the distance exceeds mask_ratio * r
    (mask_ratio 0 disables it). sigma: a float or one per sample. flip: None or (N,) bools, mirrors the output
    horizontally. mean/std are in [0, 1] units like torchvision; out_dtype uint8 skips normalisation.
    out: an optional preallocated (N,3,H,W) out_dtype tensor to write into (any strides, e.g. a reused buffer).
    """
    n, h, w = _check_batch(images, layout)
    if out_dtype not in OUT_DTYPES:
        raise choices_error("out_dtype", out_dtype, [str(d) for d in OUT_DTYPES])
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError("mean/std need 3 values each, std > 0")
    device = images.device
    if n == 0:
        return torch.empty((0, 3, h, w), dtype=out_dtype, device=device)
    centers = torch.as_tensor(centers, dtype=torch.float64).detach().cpu().reshape(-1, 2)
    if centers.shape[0] != n:
        raise ValueError(f"centers must be (N, 2) with N={n}, got {tuple(centers.shape)}")
    radii = _per_sample(radii, n, "radii")
    taps, half = _tap_table(_per_sample(sigma, n, "sigma"), h, w)

    # geom row: cx, cy, (mask_ratio * r)^2 rounded once to float32 (as circle_mask's comparison does), pad.
    limit2 = (mask_ratio * radii) ** 2 if mask_ratio > 0 else torch.full((n,), math.inf, dtype=torch.float64)
    geom = torch.stack([centers[:, 0], centers[:, 1], limit2, torch.zeros(n, dtype=torch.float64)], 1)
    norm = torch.cat([torch.tensor(mean, dtype=torch.float32) * 255, torch.tensor(std, dtype=torch.float32) * 255])
    flips = torch.zeros(n, dtype=torch.int32) if flip is None else torch.as_tensor(flip).to(torch.int32).reshape(-1)
    if flips.numel() != n:
        raise ValueError(f"flip needs one value per sample ({n}), got {flips.numel()}")
    taps, geom, norm, flips = (t.to(device, non_blocking=True) for t in (taps, geom.float(), norm, flips))

    nchw = images if layout == "NCHW" else images.permute(0, 3, 1, 2)  # a view: strides carry the layout
    tmp = torch.empty((n, 3, h, w), dtype=torch.float32, device=device)
    if out is None:
        out = torch.empty((n, 3, h, w), dtype=out_dtype, device=device,
                          memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    elif out.shape != (n, 3, h, w) or out.dtype != out_dtype or out.device != device:
        raise ValueError(f"out must be a ({n}, 3, {h}, {w}) {out_dtype} tensor on {device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    block_r, block_c = _tile(h, w)
    grid = (n, triton.cdiv(3 * h, block_r), triton.cdiv(w, block_c))
    _blur_rows_kernel[grid](nchw, taps, tmp, h, w, taps.shape[1], half, *nchw.stride(),
                            BLOCK_R=block_r, BLOCK_C=block_c)
    _blur_cols_finish_kernel[grid](nchw, taps, tmp, out, geom, norm, flips, h, w, taps.shape[1], half,
                                   float(gain), float(offset), *nchw.stride(), *out.stride(),
                                   NORMALIZE=out_dtype != torch.uint8, BLOCK_R=block_r, BLOCK_C=block_c)
    return out


def ben_graham_batch(crops: torch.Tensor, cfg: P.PreprocessConfig, dtype: str = "fp32",
                     channels_last: bool = False) -> torch.Tensor:
    """Drop-in for P.finish(crops, cfg, dtype, channels_last) on (N, 3, S, S) uint8 disc crops (disc = square)."""
    P.validate_dtype(dtype)
    if not cfg.filter_on:  # normalisation alone: nothing for a blur kernel to fuse
        return P.finish(crops, cfg, dtype, channels_last)
    n, side = crops.shape[0], crops.shape[-1]
    centers = torch.full((n, 2), side / 2, dtype=torch.float64)
    return ben_graham_triton(crops, centers, side / 2, side / 2 * cfg.sigma_ratio, cfg.gain, cfg.offset,
                             cfg.mask_ratio, cfg.mean, cfg.std, P.DTYPES[dtype], channels_last, layout="NCHW")


def ben_graham(images_nhwc: torch.Tensor, centers, radii, sigma, mean, std, out_dtype: torch.dtype,
               channels_last: bool, flip=None) -> torch.Tensor:
    """Ben Graham's own constants (gain 4, offset 128, mask 0.9 r) on an NHWC batch: the loaders' call."""
    return ben_graham_triton(images_nhwc, centers, radii, sigma, 4.0, 128.0, 0.9, mean, std, out_dtype,
                             channels_last, flip, layout="NHWC")
