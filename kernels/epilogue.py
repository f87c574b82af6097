"""Triton device functions shared by both Ben Graham blur kernels (blur_direct, blur_dot).

Everything after the blur is the same whichever way the blur was computed: the normalisation of the masked blur
by the valid profiles, gain, round half-to-even, clamp to [0, 255], the disc mask, normalisation (or the grey
levels as uint8), the per-sample flip and the store in any output strides (NCHW or channels_last). Keeping it in
one function is what makes the two kernels give the same numbers for the same blurred values.

Per-sample parameter tables are read with a per-sample stride that may be 0: one shared row serves a whole batch
(the loaders' case: one sigma, one centred disc), so planning a launch never has to build or copy a table.
"""
from __future__ import annotations

import triton
import triton.language as tl

TAP_SCALE = tl.constexpr(4096.0)  # 2^12: lifts the smallest taps (>= 1e-4) into fp16 normal range for the split


@triton.jit
def round_half_even(v):
    """torch.round semantics; written out because libdevice.rint has no interpreter (CPU test) implementation."""
    f = tl.floor(v)
    frac = v - f
    f_is_odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (frac > 0.5) | ((frac == 0.5) & f_is_odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def u8_to_f32(pixels):
    """uint8 -> float32 as 2^23 + x (exponent bits OR-ed in) minus 2^23: exact for 0..255, and two full-rate
    ALU ops instead of an int-to-float conversion, which Hopper issues at 1/8 of the FMA rate (once per tap)."""
    biased = (pixels.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)
    return biased - 8388608.0


@triton.jit
def finish_and_store(blurred, pixels, n, c, y, cols, inside, H, W, gain, offset,
                     geom_ptr, geom_stride, yprof_ptr, yprof_stride, xprof_ptr, xprof_stride,
                     norm_ptr, flip_ptr, flip_stride, out_ptr, o_n, o_c, o_h, o_w, NORMALIZE: tl.constexpr):
    """Epilogue for a (rows x cols) tile: c and y are per-row vectors (channel, image row), cols per column.

    blurred is gauss0(P), the zero-padded blur of the uint8 crop P (pixels). The valid map is vy (x) vx and its blur
    gauss0(vy) (x) gauss0(vx): yprof[n] = [vy (H values), gauss0(vy) (H)], xprof[n] = [vx (W), gauss0(vx) (W)].
    B = blurred / (gauss0(vy) gauss0(vx)) (0 where that is 0); value = round_half_even(gain*(P - vy*vx*B) + offset)
    clamped to [0, 255]; offset outside the disc (geom[n] = cx, cy, (mask_ratio*r)^2, unused; pixel centres at
    i + 0.5); then (v - 255*mean) / (255*std) unless the output is uint8; mirrored horizontally where flip[n] != 0."""
    row_ok = y < H
    col_ok = cols < W
    yprof = yprof_ptr + n * yprof_stride
    xprof = xprof_ptr + n * xprof_stride
    vy = tl.load(yprof + y, mask=row_ok, other=0.0)
    ny = tl.load(yprof + H + y, mask=row_ok, other=0.0)
    vx = tl.load(xprof + cols, mask=col_ok, other=0.0)
    nx = tl.load(xprof + W + cols, mask=col_ok, other=0.0)
    den = ny[:, None] * nx[None, :]
    mean_blur = tl.where(den > 0, blurred / tl.where(den > 0, den, 1.0), 0.0)
    value = gain * (pixels - (vy[:, None] * vx[None, :]) * mean_blur) + offset
    value = tl.minimum(tl.maximum(round_half_even(value), 0.0), 255.0)

    geom = geom_ptr + n * geom_stride
    dx = cols.to(tl.float32) + 0.5 - tl.load(geom)
    dy = y.to(tl.float32) + 0.5 - tl.load(geom + 1)
    outside = (dy[:, None] * dy[:, None] + dx[None, :] * dx[None, :]) > tl.load(geom + 2)
    value = tl.where(outside, offset, value)

    if NORMALIZE:
        mean255 = tl.load(norm_ptr + c, mask=c < 3, other=0.0)
        std255 = tl.load(norm_ptr + 3 + c, mask=c < 3, other=1.0)
        value = (value - mean255[:, None]) / std255[:, None]
    else:
        value = tl.minimum(tl.maximum(round_half_even(value), 0.0), 255.0)

    flip = tl.load(flip_ptr + n * flip_stride) != 0
    out_cols = tl.where(flip, W - 1 - cols, cols)
    dst = out_ptr + n.to(tl.int64) * o_n + (c * o_c + y * o_h)[:, None] + out_cols[None, :] * o_w
    tl.store(dst, value.to(out_ptr.dtype.element_ty), mask=inside)
