"""The Ben Graham kernel with the Gaussian done as two banded matrix products on the tensor cores, in one pass.

Why: a direct 53..61-tap blur is bound by arithmetic and per-tap loads, not memory (benchmarks/kernel_notes.md).
A blur along a row segment is a product with a banded matrix, band[j, i] = taps[j - i], which the tensor cores
run at >10x the float32 FMA rate even though most of the band is zeros.

One program makes a BLOCK x BLOCK output tile of one channel of one sample:
  window  = the SPAN x SPAN uint8 input around it (zero outside the image; SPAN >= BLOCK + 2*half)
  rows    = window @ band                (SPAN x BLOCK): the horizontal blur of every row the tile needs
  blurred = band^T @ rows                (BLOCK x BLOCK): the vertical blur
then the shared epilogue (which divides by the blurred valid profiles). Nothing but the output goes to memory:
no float32 intermediate image.

Precision: the inputs are fp16, so each operand is split into hi + lo fp16 parts and the products summed in
float32 (the accumulator), which keeps the float32-level exactness of the direct kernel:
  - pixels 0..255 are exact in fp16, so pass 1 needs two products (taps hi and lo);
  - taps are scaled by 2^12 first so that even the outermost taps of a sigma-20 window stay normal in fp16;
  - the row-blurred values (0..255, float32) are split too, and pass 2 takes three products
    (hi*hi + lo*hi + hi*lo; lo*lo is below 2^-22 relative).
tf32 (Triton's default for float32 dots) would keep 10 mantissa bits: ~0.5 grey level of error after the x4 gain.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tltrain.errors import ConfigError

from .epilogue import TAP_SCALE, finish_and_store

SPANS = (32, 64, 128)  # window sides: one dot operand is SPAN x SPAN fp16 (32 KiB at 128)
BLOCKS = (16, 32, 64)  # output tile sides (tl.dot needs every dimension >= 16)
TRITON_VERSION = tuple(int(v) for v in triton.__version__.split(".")[:2])


def choose_tile(half: int) -> tuple[int, int] | None:
    """(BLOCK, SPAN) with the fewest tensor-core multiply-adds per output for a window of 2*half+1 taps, or None
    when no tile fits it (the caller uses the direct kernel). Per output pixel and channel the horizontal product
    costs SPAN^2/BLOCK MACs and the vertical SPAN, times 2 and 3 for the hi/lo splits."""
    fitting = [(2 * span * span / block + 3 * span, block, span)
               for span in SPANS for block in BLOCKS if block + 2 * half <= span]
    if not fitting:
        return None
    _, block, span = min(fitting)
    return block, span


def default_num_warps(tile: tuple[int, int], capability: tuple[int, int] | None,
                      triton_version: tuple[int, int] = TRITON_VERSION) -> int:
    """8 warps for SPAN 128 (with 4 the accumulators spill: 21.8 KB a thread on sm_80, benchmarks/kernel_notes.md),
    4 below; but 4 for the 64/128 tile on Hopper under triton < 3.2, which cannot compile it with 8."""
    if tile[1] < 128:
        return 4
    return 4 if unsupported(tile, 8, capability, triton_version) else 8


def unsupported(tile: tuple[int, int], num_warps: int, capability: tuple[int, int] | None,
                triton_version: tuple[int, int] = TRITON_VERSION) -> str | None:
    """Why this Triton cannot compile the tile for this GPU, or None. Checked before launching because the
    failure is a C++ assertion that kills the process, not an exception (measured with kernel_resources.py)."""
    if (tuple(tile) == (64, 128) and num_warps == 8 and capability is not None and capability >= (9, 0)
            and triton_version < (3, 2)):
        return (f"triton {'.'.join(map(str, triton_version))} cannot compile the 8-warp 64/128 tensor-core tile for "
                f"sm_{capability[0]}{capability[1]} (mma -> mma layout conversion); use num_warps=4 or triton >= 3.2 "
                f"(torch >= 2.6)")
    return None


@triton.jit
def _split_fp16(x):
    """float32 -> (hi, lo) fp16 with hi + lo == x to ~22 bits (x within fp16's range)."""
    hi = x.to(tl.float16)
    lo = (x - hi.to(tl.float32)).to(tl.float16)
    return hi, lo


@triton.jit
def _ben_graham_dot_kernel(img_ptr, taps_ptr, out_ptr, geom_ptr, yprof_ptr, xprof_ptr, norm_ptr, flip_ptr,
                           H, W, n_taps, taps_stride, geom_stride, yprof_stride, xprof_stride, flip_stride,
                           gain, offset,
                           s_n, s_c, s_h, s_w, o_n, o_c, o_h, o_w,
                           NORMALIZE: tl.constexpr, BLOCK: tl.constexpr, SPAN: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // 3
    c = pid % 3
    half = n_taps // 2
    y0 = tl.program_id(1) * BLOCK
    x0 = tl.program_id(2) * BLOCK
    span = tl.arange(0, SPAN)
    local = tl.arange(0, BLOCK)

    # Input window: rows y0-half .. y0+BLOCK-1+half and the same for columns, zero outside the image (the zero
    # padding of gauss0). Indices past the window (SPAN > BLOCK + 2*half) only meet zero band weights.
    win_y = y0 - half + span
    win_x = x0 - half + span
    in_image = ((win_y >= 0) & (win_y < H))[:, None] & ((win_x >= 0) & (win_x < W))[None, :]
    sample = img_ptr + n.to(tl.int64) * s_n + c * s_c
    window = tl.load(sample + win_y[:, None] * s_h + win_x[None, :] * s_w, mask=in_image, other=0).to(tl.float16)

    # band[j, i] = taps[j - i]: window column j feeds output column i with tap j - i (the tap for offset j-i-half).
    tap = span[:, None] - local[None, :]
    band = tl.load(taps_ptr + n * taps_stride + tap, mask=(tap >= 0) & (tap < n_taps), other=0.0) * TAP_SCALE
    band_hi, band_lo = _split_fp16(band)

    rows = tl.dot(window, band_hi, out_dtype=tl.float32)
    rows = tl.dot(window, band_lo, acc=rows, out_dtype=tl.float32)
    rows_hi, rows_lo = _split_fp16(rows * (1.0 / TAP_SCALE))

    band_t_hi = tl.trans(band_hi)
    blurred = tl.dot(band_t_hi, rows_hi, out_dtype=tl.float32)
    blurred = tl.dot(tl.trans(band_lo), rows_hi, acc=blurred, out_dtype=tl.float32)
    blurred = tl.dot(band_t_hi, rows_lo, acc=blurred, out_dtype=tl.float32)
    blurred = blurred * (1.0 / TAP_SCALE)

    y = y0 + local
    cols = x0 + local
    inside = (y[:, None] < H) & (cols[None, :] < W)
    pixels = tl.load(sample + y[:, None] * s_h + cols[None, :] * s_w, mask=inside, other=0).to(tl.float32)
    channel = tl.zeros((BLOCK,), dtype=tl.int32) + c
    finish_and_store(blurred, pixels, n, channel, y, cols, inside, H, W, gain, offset, geom_ptr, geom_stride,
                     yprof_ptr, yprof_stride, xprof_ptr, xprof_stride, norm_ptr, flip_ptr, flip_stride,
                     out_ptr, o_n, o_c, o_h, o_w, NORMALIZE)


def launch(nchw: torch.Tensor, out: torch.Tensor, params, tile: tuple[int, int], num_warps: int | None = None):
    """One pass over (N, 3, H, W) uint8 (any strides) into out with a (BLOCK, SPAN) tile from choose_tile."""
    n, _, h, w = nchw.shape
    block, span = tile
    if block + 2 * (params.n_taps // 2) > span:
        raise ValueError(f"tile {tile} is too small for a {params.n_taps}-tap window")
    capability = torch.cuda.get_device_capability(nchw.device) if nchw.device.type == "cuda" else None
    num_warps = num_warps or default_num_warps(tile, capability)
    problem = unsupported(tile, num_warps, capability)
    if problem:
        raise ConfigError(problem)
    grid = (3 * n, triton.cdiv(h, block), triton.cdiv(w, block))
    _ben_graham_dot_kernel[grid](nchw, params.taps, out, params.geom, params.yprof, params.xprof, params.norm,
                                 params.flip, h, w, params.n_taps, params.taps_stride, params.geom_stride,
                                 params.yprof_stride, params.xprof_stride, params.flip_stride,
                                 params.gain, params.offset, *nchw.stride(), *out.stride(),
                                 NORMALIZE=params.normalize, BLOCK=block, SPAN=span, num_warps=num_warps)
