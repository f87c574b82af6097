"""The exact direct-tap Ben Graham kernel: two passes of plain float32 multiply-adds, one per tap.

Why two passes: the 2-D Gaussian is separable, so a horizontal pass writes a float32 row-blurred image and a
vertical pass reads it back and runs the shared epilogue (kernels/epilogue.py) in registers, so the output is
written once. Every output element is one direct sum over the taps with zero padding (the epilogue normalises
by the blurred valid profiles), accumulated in float32: the reference's numbers up to float32 summation order.
Works for any window that fits the image; the tensor-core kernel (blur_dot) is the fast path where its tile fits
the window.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .epilogue import finish_and_store, u8_to_f32

BLOCK_ROWS = 16  # GPU tile: 16 rows x 64 columns per program (coalesced 64-wide row segments)
BLOCK_COLS = 64


@triton.jit
def _stacked_rows(g, cols, H, W):
    """Rows g of the 3H-row stacked image -> channel, row within it, and the tile's in-bounds mask."""
    return g // H, g % H, (g[:, None] < 3 * H) & (cols[None, :] < W)


@triton.jit
def _blur_rows_kernel(img_ptr, taps_ptr, tmp_ptr, H, W, n_taps, taps_stride,
                      s_n, s_c, s_h, s_w,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Horizontal pass: tmp[n, c, y, x] = sum_k taps[n, k] * img[n, c, y, x + k - half] (float32, 0 outside).

    A sample's three planes are stacked into one 3H-row image (row g = c * H + y), so a tile never pads a
    channel dimension and the CPU interpreter runs one program per sample."""
    n = tl.program_id(0)
    half = n_taps // 2
    g = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # aranges stay here: triton 3.0 helpers lose constexpr
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c, y, inside = _stacked_rows(g, cols, H, W)
    src = img_ptr + n.to(tl.int64) * s_n + (c * s_c + y * s_h)[:, None]
    tap_row = taps_ptr + n * taps_stride
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for k in range(0, n_taps):
        x = cols + (k - half)
        pixels = tl.load(src + x[None, :] * s_w, mask=inside & ((x >= 0) & (x < W))[None, :], other=0)
        acc += tl.load(tap_row + k) * u8_to_f32(pixels)
    dst = tmp_ptr + n.to(tl.int64) * 3 * H * W + g[:, None] * W + cols[None, :]
    tl.store(dst, acc, mask=inside)


@triton.jit
def _blur_cols_finish_kernel(img_ptr, taps_ptr, tmp_ptr, out_ptr, geom_ptr, yprof_ptr, xprof_ptr, norm_ptr, flip_ptr,
                             H, W, n_taps, taps_stride, geom_stride, yprof_stride, xprof_stride, flip_stride,
                             gain, offset,
                             s_n, s_c, s_h, s_w, o_n, o_c, o_h, o_w,
                             NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Vertical pass + epilogue: blur the row-blurred buffer down the columns, then finish_and_store."""
    n = tl.program_id(0)
    half = n_taps // 2
    g = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # aranges stay here: triton 3.0 helpers lose constexpr
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c, y, inside = _stacked_rows(g, cols, H, W)
    src = tmp_ptr + n.to(tl.int64) * 3 * H * W + (c * H * W)[:, None] + cols[None, :]
    tap_row = taps_ptr + n * taps_stride
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for k in range(0, n_taps):
        y_k = y + (k - half)
        acc += tl.load(tap_row + k) * tl.load(src + (y_k * W)[:, None], mask=inside & ((y_k >= 0) & (y_k < H))[:, None],
                                              other=0.0)

    pixel_ptr = img_ptr + n.to(tl.int64) * s_n + (c * s_c + y * s_h)[:, None] + cols[None, :] * s_w
    pixels = tl.load(pixel_ptr, mask=inside, other=0).to(tl.float32)
    finish_and_store(acc, pixels, n, c, y, cols, inside, H, W, gain, offset, geom_ptr, geom_stride,
                     yprof_ptr, yprof_stride, xprof_ptr, xprof_stride, norm_ptr, flip_ptr, flip_stride,
                     out_ptr, o_n, o_c, o_h, o_w, NORMALIZE)


def _tile(height: int, width: int) -> tuple[int, int]:
    """GPU: small tiles, many programs. CPU interpreter (tests): one tile per sample, since each program and each
    tile operation costs interpreter overhead regardless of its size."""
    if isinstance(_blur_rows_kernel, InterpretedFunction):
        return min(256, triton.next_power_of_2(3 * height)), min(128, triton.next_power_of_2(width))
    return BLOCK_ROWS, BLOCK_COLS


def launch(nchw: torch.Tensor, out: torch.Tensor, params) -> None:
    """Run both passes on (N, 3, H, W) uint8 (any strides) into out; params: ben_graham.LaunchParams."""
    n, _, h, w = nchw.shape
    tmp = torch.empty((n, 3, h, w), dtype=torch.float32, device=nchw.device)
    block_r, block_c = _tile(h, w)
    grid = (n, triton.cdiv(3 * h, block_r), triton.cdiv(w, block_c))
    _blur_rows_kernel[grid](nchw, params.taps, tmp, h, w, params.n_taps, params.taps_stride, *nchw.stride(),
                            BLOCK_R=block_r, BLOCK_C=block_c)
    _blur_cols_finish_kernel[grid](nchw, params.taps, tmp, out, params.geom, params.yprof, params.xprof,
                                   params.norm, params.flip, h, w, params.n_taps, params.taps_stride,
                                   params.geom_stride, params.yprof_stride, params.xprof_stride, params.flip_stride,
                                   params.gain, params.offset, *nchw.stride(), *out.stride(),
                                   NORMALIZE=params.normalize, BLOCK_R=block_r, BLOCK_C=block_c)
