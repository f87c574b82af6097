"""Ben Graham's filter on the GPU with Triton: the public entry points, argument checks and launch planning.

The GPU twin of tltrain.preprocess.finish (the torch reference, definition version 2): with the valid map
V = vy (x) vx of the photo inside the square (two 1-D profiles per sample; all ones when not given),
B = gauss0(img) / gauss0(V) and out = gain*(img - V*B) + offset, rounded half-to-even and clamped to [0, 255],
offset outside the disc, then (v/255 - mean)/std in fp32/fp16/bf16 (or the grey levels as uint8), NCHW or
channels_last, optionally mirrored per sample. Gaussian: 2*ceil(3*sigma)+1 normalised taps, zero padding; the
normaliser gauss0(V) = gauss0(vy) (x) gauss0(vx) is computed here on the 1-D profiles (float64, then float32).

Two kernels compute it (method=):
- "dot" (kernels/blur_dot.py): one pass, the blur as banded matrix products on the tensor cores with hi/lo fp16
  splits; for windows up to 2*56+1 taps (sigma <= 18.6).
- "direct" (kernels/blur_direct.py): two passes of float32 multiply-adds, any window that fits the image.
- "auto": dot where its tile fits and the device has tensor cores (or under the interpreter), else direct.
Both give the float64 definition's grey levels except rare float32 .5-boundary flips (tests/test_kernels.py).

Planning never waits for the GPU: scalar parameters (one sigma, one centre, one radius: the loaders' case) become
small device tables cached per value and read with stride 0; per-sample parameters that are already on the device
(a GPU disc estimate) are used where they are. Only a per-sample sigma on the device costs one sync (the window
width must be known on the host); sequences on the host are copied.
"""
from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from triton.runtime.errors import OutOfResources
from triton.runtime.interpreter import InterpretedFunction

from tltrain import preprocess as P
from tltrain.errors import ConfigError, choices_error

from . import blur_direct, blur_dot

LAYOUTS = ("NCHW", "NHWC")
METHODS = ("auto", "direct", "dot")
OUT_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "uint8"}


@dataclass(frozen=True)
class LaunchParams:
    """Device tables and scalars both kernels read. A stride of 0 means one row shared by the whole batch."""

    taps: torch.Tensor  # (rows, n_taps) float32, each row a centred, zero-padded Gaussian
    taps_stride: int
    n_taps: int  # 2 * half + 1, half = the widest window's half-width
    geom: torch.Tensor  # (rows, 4) float32: cx, cy, (mask_ratio * r)^2, unused
    geom_stride: int
    yprof: torch.Tensor  # (rows, 2, H) float32: vy and gauss0(vy) per sample
    yprof_stride: int
    xprof: torch.Tensor  # (rows, 2, W) float32: vx and gauss0(vx)
    xprof_stride: int
    norm: torch.Tensor  # (6,) float32: 255 * mean, 255 * std
    flip: torch.Tensor  # (rows,) int32
    flip_stride: int
    gain: float
    offset: float
    normalize: bool  # False: uint8 grey levels


def _is_scalar(value) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1
                                               and value.device.type == "cpu")


def _on_device(value) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type != "cpu"


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant table on the device, made once per distinct value (no copy, no sync on later calls)."""
    return torch.tensor(values, dtype=dtype).to(device)


@functools.lru_cache(maxsize=16)
def _normalisation(mean: tuple, std: tuple, device: torch.device) -> torch.Tensor:
    """(6,) 255*mean, 255*std, multiplied in float32 exactly as tltrain.preprocess.finish does."""
    return (torch.tensor(mean + std, dtype=torch.float32) * 255).to(device)


@functools.lru_cache(maxsize=16)
def _shared_taps(sigma: float, device: torch.device) -> torch.Tensor:
    """(1, n_taps) float32 Gaussian for one sigma, built once per value (the loaders call with the same sigma)."""
    return P.gaussian_taps(sigma, torch.float32).view(1, -1).to(device)


def _per_sample(value, n: int, name: str, device: torch.device) -> torch.Tensor:
    """A length-n sequence or tensor -> float64 (n,) on the device (kept there when it already is)."""
    t = torch.as_tensor(value).detach().to(device=device, dtype=torch.float64).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"{name} needs one value or one per sample ({n}), got {t.numel()}")
    return t


def _half_width(sigma: float) -> int:
    return int(math.ceil(3 * sigma))


def _check_window(sigma_min: float, sigma_max: float, height: int, width: int) -> int:
    if not sigma_min > 0:
        raise ConfigError(f"blur sigma must be > 0, got {sigma_min:g}")
    half = _half_width(sigma_max)
    if half >= min(height, width):
        raise ConfigError(f"blur sigma {sigma_max:g} needs a {2 * half + 1}-tap window, larger than the "
                          f"{height}x{width} image; lower loader.preprocess.sigma_ratio")
    return half


def _tap_table(sigma, n: int, height: int, width: int, device: torch.device):
    """(taps, stride, n_taps, taps64): a cached shared row for one sigma, else one zero-padded row per sample;
    taps64 is the same table in float64 for the valid-profile normaliser."""
    if _is_scalar(sigma):
        sigma = float(sigma)
        half = _check_window(sigma, sigma, height, width)
        return _shared_taps(sigma, device), 0, 2 * half + 1, _shared_taps64(sigma, device)
    sigmas = _per_sample(sigma, n, "sigma", device)
    low, high = torch.stack([sigmas.min(), sigmas.max()]).tolist()  # the one sync: the window width
    half = _check_window(low, high, height, width)
    offsets = torch.arange(-half, half + 1, dtype=torch.float64, device=device)
    taps = torch.exp(-0.5 * (offsets / sigmas[:, None]) ** 2)
    taps = taps * (offsets.abs() <= torch.ceil(3 * sigmas)[:, None])  # each sample's own window, zero-padded
    taps64 = taps / taps.sum(dim=1, keepdim=True)
    taps = taps64.float().contiguous()
    return taps, taps.stride(0), 2 * half + 1, taps64


@functools.lru_cache(maxsize=16)
def _shared_taps64(sigma: float, device: torch.device) -> torch.Tensor:
    return P.gaussian_taps(sigma).view(1, -1).to(device)


def _profile_table(profiles: torch.Tensor, taps64: torch.Tensor) -> torch.Tensor:
    """(rows, L) valid profiles and (1 or rows, K) float64 taps -> (rows, 2, L) float32: the profile and its
    zero-padded blur gauss0 (summed in float64, so an all-photo row blurs to exactly 1.0 away from the border)."""
    half = taps64.shape[1] // 2
    padded = torch.nn.functional.pad(profiles.to(torch.float64), (half, half))
    blurred = (padded.unfold(-1, taps64.shape[1], 1) * taps64[:, None, :]).sum(-1)
    return torch.stack([profiles.to(torch.float64), blurred], dim=1).float().contiguous()


@functools.lru_cache(maxsize=32)
def _shared_profiles(sigma: float, length: int, device: torch.device) -> torch.Tensor:
    """(1, 2, L) all-photo profile and its blur for one sigma (the loaders' uncut crops), built once per value."""
    return _profile_table(torch.ones((1, length), dtype=torch.float64, device=device), _shared_taps64(sigma, device))


def _valid_tables(valid, sigma, taps64: torch.Tensor, n: int, height: int, width: int, device: torch.device):
    """(yprof, yprof_stride, xprof, xprof_stride) from valid = None (all photo) or (vy (N, H), vx (N, W))."""
    if valid is None and _is_scalar(sigma):
        yprof, xprof = _shared_profiles(float(sigma), height, device), _shared_profiles(float(sigma), width, device)
        return yprof, 0, xprof, 0
    if valid is None:
        vy = torch.ones((n, height), dtype=torch.float64, device=device)
        vx = torch.ones((n, width), dtype=torch.float64, device=device)
    else:
        vy, vx = (torch.as_tensor(v).to(device) for v in valid)
        if tuple(vy.shape) != (n, height) or tuple(vx.shape) != (n, width):
            raise ValueError(f"valid must be (vy ({n}, {height}), vx ({n}, {width})), "
                             f"got {tuple(vy.shape)} and {tuple(vx.shape)}")
    yprof, xprof = _profile_table(vy, taps64), _profile_table(vx, taps64)
    return yprof, yprof.stride(0), xprof, xprof.stride(0)


def _geometry(centers, radii, mask_ratio: float, n: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """(geom, stride): cx, cy, (mask_ratio * r)^2 per sample, or one cached row when every sample shares them."""
    shared_center = not _on_device(centers) and torch.as_tensor(centers).numel() == 2
    if shared_center and _is_scalar(radii):
        cx, cy = (float(v) for v in torch.as_tensor(centers, dtype=torch.float64).reshape(2))
        limit2 = (mask_ratio * float(radii)) ** 2 if mask_ratio > 0 else math.inf
        return _constant((cx, cy, limit2, 0.0), torch.float32, device).view(1, 4), 0
    centers = torch.as_tensor(centers).detach().to(device=device, dtype=torch.float64)
    centers = centers.reshape(1, 2).expand(n, 2) if centers.numel() == 2 else centers.reshape(-1, 2)
    if centers.shape[0] != n:
        raise ValueError(f"centers must be (N, 2) or one (x, y) pair with N={n}, got {tuple(centers.shape)}")
    radii = _per_sample(radii, n, "radii", device)
    limit2 = (mask_ratio * radii) ** 2 if mask_ratio > 0 else torch.full_like(radii, math.inf)
    geom = torch.stack([centers[:, 0], centers[:, 1], limit2, torch.zeros_like(radii)], dim=1)
    return geom.float().contiguous(), 4


def _flips(flip, n: int, device: torch.device) -> tuple[torch.Tensor, int]:
    if flip is None:
        return _constant((0,), torch.int32, device), 0
    flips = torch.as_tensor(flip).detach().to(device=device, dtype=torch.int32).reshape(-1).contiguous()
    if flips.numel() != n:
        raise ValueError(f"flip needs one value per sample ({n}), got {flips.numel()}")
    return flips, 1


def _check_batch(images: torch.Tensor, layout: str) -> tuple[int, int, int]:
    if layout not in LAYOUTS:
        raise choices_error("layout", layout, LAYOUTS)
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be a 4-D uint8 batch, got {images.dim()}-D {images.dtype}")
    n, h, w, c = images.shape if layout == "NHWC" else (images.shape[0], *images.shape[2:], images.shape[1])
    if c != 3:
        raise ValueError(f"images must have 3 channels in layout {layout}, got shape {tuple(images.shape)}")
    return n, h, w


def _has_tensor_cores(device: torch.device) -> bool:
    if isinstance(blur_dot._ben_graham_dot_kernel, InterpretedFunction):
        return True  # the interpreter runs tl.dot as a float32 matmul: the path is testable on a CPU
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def _choose_method(method: str, n_taps: int, device: torch.device, tile) -> tuple[str, tuple[int, int] | None]:
    if method not in METHODS:
        raise choices_error("method", method, METHODS)
    tile = tile or blur_dot.choose_tile(n_taps // 2)
    if method == "dot" and tile is None:
        raise ConfigError(f"method='dot' has no tensor-core tile for a {n_taps}-tap window (at most "
                          f"{2 * ((max(blur_dot.SPANS) - min(blur_dot.BLOCKS)) // 2) + 1}); use method='direct'")
    if method == "auto":
        method = "dot" if tile is not None and _has_tensor_cores(device) else "direct"
    return method, tile


@functools.lru_cache(maxsize=None)
def _warn_fallback(reason: str) -> None:
    warnings.warn(f"Ben Graham tensor-core kernel does not fit this GPU ({reason}); using the direct kernel",
                  RuntimeWarning, stacklevel=4)


def _launch_dot_or_fall_back(nchw, out, params, tile, num_warps, method_was_auto: bool) -> None:
    """A tile that does not fit this GPU's registers/shared memory is a compile-time error: under method='auto'
    the direct kernel takes over (warned once per reason); an explicit method='dot' raises it."""
    try:
        blur_dot.launch(nchw, out, params, tile, num_warps)
    except OutOfResources as error:
        if not method_was_auto:
            raise
        _warn_fallback(str(error))
        blur_direct.launch(nchw, out, params)


def ben_graham_triton(images: torch.Tensor, centers, radii, sigma, gain: float = 4.0, offset: float = 128.0,
                      mask_ratio: float = 0.9, mean: Sequence[float] = P.IMAGENET_MEAN,
                      std: Sequence[float] = P.IMAGENET_STD, out_dtype: torch.dtype = torch.float32,
                      channels_last: bool = False, flip=None, layout: str = "NCHW",
                      out: torch.Tensor | None = None, *, valid=None, method: str = "auto",
                      tile: tuple[int, int] | None = None, num_warps: int | None = None) -> torch.Tensor:
    """uint8 batch (N,3,H,W) or (N,H,W,3) -> (N,3,H,W) out_dtype: 4*(img - V*B) + 128, masked, normalised.

    centers: one (x, y) disc centre in pixels for all, or (N, 2); radii: one or (N,): mask where the distance
    exceeds mask_ratio * r (mask_ratio 0 disables it). sigma: one or (N,). flip: None or (N,) bools, mirrors the
    output horizontally. mean/std are in [0, 1] units like torchvision; out_dtype uint8 skips normalisation.
    out: an optional preallocated (N,3,H,W) out_dtype tensor to write into (any strides, e.g. a reused buffer).
    valid: None (every pixel is photo) or (vy, vx) of shapes (N, H) and (N, W): the photo's share of each row and
    column (tltrain.preprocess.square_valid); the blur is normalised by gauss0(vy (x) vx), outside-photo -> offset.
    method: auto | direct | dot (module docstring); tile (BLOCK, SPAN) and num_warps tune the dot kernel.
    """
    n, h, w = _check_batch(images, layout)
    if out_dtype not in OUT_DTYPES:
        raise choices_error("out_dtype", out_dtype, [str(d) for d in OUT_DTYPES])
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError("mean/std need 3 values each, std > 0")
    device = images.device
    if n == 0:
        return torch.empty((0, 3, h, w), dtype=out_dtype, device=device)
    taps, taps_stride, n_taps, taps64 = _tap_table(sigma, n, h, w, device)
    geom, geom_stride = _geometry(centers, radii, mask_ratio, n, device)
    yprof, yprof_stride, xprof, xprof_stride = _valid_tables(valid, sigma, taps64, n, h, w, device)
    flips, flip_stride = _flips(flip, n, device)
    norm = _normalisation(tuple(float(v) for v in mean), tuple(float(v) for v in std), device)
    params = LaunchParams(taps, taps_stride, n_taps, geom, geom_stride, yprof, yprof_stride, xprof, xprof_stride,
                          norm, flips, flip_stride, float(gain), float(offset), out_dtype != torch.uint8)
    chosen, tile = _choose_method(method, n_taps, device, tile)

    if out is None:
        out = torch.empty((n, 3, h, w), dtype=out_dtype, device=device,
                          memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    elif out.shape != (n, 3, h, w) or out.dtype != out_dtype or out.device != device:
        raise ValueError(f"out must be a ({n}, 3, {h}, {w}) {out_dtype} tensor on {device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    nchw = images if layout == "NCHW" else images.permute(0, 3, 1, 2)  # a view: strides carry the layout
    if chosen == "dot":
        _launch_dot_or_fall_back(nchw, out, params, tile, num_warps, method == "auto")
    else:
        blur_direct.launch(nchw, out, params)
    return out


def ben_graham_batch(crops: torch.Tensor, cfg: P.PreprocessConfig, dtype: str = "fp32", channels_last: bool = False,
                     method: str = "auto", valid: torch.Tensor | None = None) -> torch.Tensor:
    """Drop-in for P.finish(crops, cfg, dtype, channels_last, valid=valid) on (N, 3, S, S) uint8 disc crops
    (disc = square); valid: (N, 2, S) profiles [vy, vx] or None (all photo)."""
    P.validate_dtype(dtype)
    if not cfg.filter_on:  # normalisation alone: nothing for a blur kernel to fuse
        return P.finish(crops, cfg, dtype, channels_last)
    side = crops.shape[-1]
    pair = None if valid is None else (valid[:, 0], valid[:, 1])
    return ben_graham_triton(crops, (side / 2, side / 2), side / 2, side / 2 * cfg.sigma_ratio, cfg.gain,
                             cfg.offset, cfg.mask_ratio, cfg.mean, cfg.std, P.DTYPES[dtype], channels_last,
                             layout="NCHW", valid=pair, method=method)
