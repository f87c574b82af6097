"""Ben Graham's preprocessing, the torch reference: the one definition every loader backend is tested against.

Per image (docs/architecture.md, "Preprocessing definition", version FILTER_VERSION): crop the square around the
disc and resize it to 2R x 2R, so the disc radius becomes the configured R (`radius`, 0 = size / 2). Pixels of the
square outside the photo are black in the crop P (rounded to uint8) and carry weight 0 in the valid map V, which is
the same crop + resize applied to the photo's indicator: V = vy (x) vx, two 1-D profiles, because the photo is a
rectangle and the resize is separable. Then a normalised masked blur,
    B = gauss0(P) / gauss0(V)      (zero outside the square; B = 0 where gauss0(V) = 0)
    out = round(gain * (P - V * B) + offset), saturated to [0, 255]
so pixels outside the photo (V = 0) become the offset grey, photo pixels (V = 1) get 4*img - 4*blur + 128 with a
blur over photo pixels only (no black/white bars at cut edges), and edge pixels blend the two. Pixels farther than
mask_ratio * R from the centre become offset; then resize to the model's size x size (identity when 2R == size),
and (x / 255 - mean) / std in the configured dtype and memory format.
Gaussian: 2*ceil(3*sigma)+1 normalised taps, zero padding (the normalisation makes the border weightless).
"""
from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from tltrain import preprocess_cpu

FILTER_VERSION = 2  # 1: black padding + reflect-101 blur (bars at cut edges); 2: normalised masked blur
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The config dataclasses are torch-free (tltrain submit checks a run without importing torch); re-exported here.
from tltrain.preprocess_config import (DTYPE_NAMES, IMAGENET_MEAN, IMAGENET_STD, AugmentConfig,  # noqa: E402,F401
                                       PreprocessConfig, validate_dtype)


def gaussian_taps(sigma: float, dtype=torch.float64) -> torch.Tensor:
    """Normalised 1-D Gaussian with 2*ceil(3*sigma)+1 taps (the OpenCV / DALI window rule)."""
    half = int(math.ceil(3 * sigma))
    x = torch.arange(-half, half + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    return (taps / taps.sum()).to(dtype)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable blur of (N, C, H, W) float images, zero outside the image (gauss0); the window may not exceed it.

    float32 on the CPU blurs each plane with OpenCV's separable filter (the same taps, a zero border: 8 ms per
    3x512x512 image on one thread against 21 ms for two banded matrix products and ~80 ms for conv2d, all equal to
    the float64 blur within 1e-4 grey levels); without OpenCV, the banded products (what the Triton dot kernel does
    on tensor cores). Other dtypes and devices (the float64 ground truth, GPUs) use conv2d."""
    taps = gaussian_taps(sigma, images.dtype).to(images.device)
    n, c, h, w = images.shape
    check_window(taps, h, w, sigma)
    if images.device.type == "cpu" and images.dtype == torch.float32:
        blurred = _opencv_blur(images, taps)
        if blurred is not None:
            return blurred
        return band_matrix(h, float(sigma)).T @ images @ band_matrix(w, float(sigma))
    return _conv_blur(images, taps)


def check_window(taps: torch.Tensor, h: int, w: int, sigma: float) -> None:
    """The blur's window may not exceed the image (a ValueError naming both)."""
    if (len(taps) - 1) // 2 >= min(h, w):
        raise ValueError(f"blur window {len(taps)} taps is larger than the {h}x{w} image (sigma {sigma:g})")


def _opencv_blur(images: torch.Tensor, taps: torch.Tensor) -> torch.Tensor | None:
    """gauss0 of float32 CPU images plane by plane with cv2.sepFilter2D (None when OpenCV is not installed)."""
    try:
        import cv2
    except ImportError:
        return None
    cv2.setNumThreads(torch.get_num_threads())  # as many threads as torch may use here (1 in loader workers)
    source = images.detach().contiguous().numpy()
    out = np.empty_like(source)
    kernel = taps.numpy()
    for index in range(source.shape[0]):
        for channel in range(source.shape[1]):
            out[index, channel] = cv2.sepFilter2D(source[index, channel], -1, kernel, kernel,
                                                  borderType=cv2.BORDER_CONSTANT)
    return torch.from_numpy(out)



@functools.lru_cache(maxsize=16)
def band_matrix(length: int, sigma: float) -> torch.Tensor:
    """(length, length) float32 M with M[i, j] = tap[i - j + half] inside the window, 0 outside: x @ M blurs the
    rows of x with zero padding (the taps are symmetric, so M.T @ x blurs its columns)."""
    taps = gaussian_taps(sigma)
    half = (len(taps) - 1) // 2
    offset = torch.arange(length).view(-1, 1) - torch.arange(length).view(1, -1) + half
    inside = (offset >= 0) & (offset < len(taps))
    return torch.where(inside, taps[offset.clamp(0, len(taps) - 1)], 0.0).to(torch.float32)


def _conv_blur(images: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """The blur as two 1-D convolutions (rows, then columns)."""
    half = (len(taps) - 1) // 2
    n, c, h, w = images.shape
    x = images.reshape(n * c, 1, h, w)
    tf32 = torch.backends.cudnn.allow_tf32  # on by default: cuDNN would blur with 10-bit mantissas on a GPU,
    torch.backends.cudnn.allow_tf32 = False  # ~0.5 grey level after the x4 gain; the reference stays float32
    try:
        x = F.conv2d(x, taps.view(1, 1, 1, -1), padding=(0, half))
        x = F.conv2d(x, taps.view(1, 1, -1, 1), padding=(half, 0))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return x.reshape(n, c, h, w)


def blur_profiles(profiles: torch.Tensor, sigma: float) -> torch.Tensor:
    """(..., L) 1-D valid profiles -> gauss0 of each, in float64: the separable normaliser gauss0(vy (x) vx)."""
    taps = gaussian_taps(sigma).to(profiles.device)
    half = (len(taps) - 1) // 2
    flat = profiles.reshape(-1, 1, profiles.shape[-1]).to(torch.float64)
    return F.conv1d(flat, taps.view(1, 1, -1), padding=half).reshape(profiles.shape)


def full_valid(n: int, size: int, device=None) -> torch.Tensor:
    """(n, 2, size) all-ones profiles: every pixel of the square is photo."""
    return torch.ones((n, 2, size), dtype=torch.float32, device=device)


def circle_mask(size: int, ratio: float, device=None) -> torch.Tensor:
    """(size, size) bool: True inside ratio * radius of the centre (pixel centres at i + 0.5)."""
    coords = torch.arange(size, device=device, dtype=torch.float32) + 0.5 - size / 2
    dist2 = coords.view(-1, 1) ** 2 + coords.view(1, -1) ** 2
    return dist2 <= (ratio * size / 2) ** 2


def ben_graham_filter(images: torch.Tensor, cfg: PreprocessConfig, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(N, C, S, S) float in [0, 255] with the disc filling the square -> filtered, rounded, masked, [0, 255].

    valid: (N, 2, S) profiles [vy, vx] of the photo inside the square (None: all photo); module docstring."""
    n, _, size, _ = images.shape
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    work = images.to(dtype)
    sigma = size / 2 * cfg.sigma_ratio
    if valid is None:
        valid = full_valid(n, size, images.device)
    valid = valid.to(images.device, torch.float64)
    norm = blur_profiles(valid, sigma)  # (N, 2, S): gauss0(vy), gauss0(vx)
    den = (norm[:, 0, :, None] * norm[:, 1, None, :]).unsqueeze(1)
    weight = (valid[:, 0, :, None] * valid[:, 1, None, :]).unsqueeze(1).to(dtype)
    blurred = gaussian_blur(work, sigma) / torch.where(den > 0, den, 1.0).to(dtype)
    out = torch.round(cfg.gain * (work - weight * blurred) + cfg.offset).clamp_(0, 255)
    if cfg.mask_ratio > 0:
        inside = circle_mask(size, cfg.mask_ratio, images.device)
        out = torch.where(inside, out, torch.full_like(out, cfg.offset))
    return out


def disc_box(disc, width: int, height: int, crop_to_disc: bool = True, scale: float = 1.0,
             shift=(0.0, 0.0)) -> tuple[int, int, int]:
    """Integer square (x0, y0, side) around the disc, possibly reaching outside the photo (zero weight there)."""
    if not crop_to_disc:
        side = max(width, height)
        return (width - side) // 2, (height - side) // 2, side
    cx, cy, r = (float(v) for v in disc)
    side = max(2, _round_half_up(2 * r * scale))
    x0 = _round_half_up(cx + shift[0] * r - side / 2)
    y0 = _round_half_up(cy + shift[1] * r - side / 2)
    return x0, y0, side


def _round_half_up(value: float) -> int:
    """floor(v + 0.5): the rounding DALI's graph uses for the crop box (Python's round() is half-to-even)."""
    return int(math.floor(value + 0.5))


def crop_square(image: torch.Tensor, x0: int, y0: int, side: int) -> torch.Tensor:
    """(H, W, C) uint8 -> (side, side, C), zero (black) where the square leaves the photo."""
    h, w, c = image.shape
    out = torch.zeros((side, side, c), dtype=image.dtype)
    sx0, sy0 = max(0, x0), max(0, y0)
    sx1, sy1 = min(w, x0 + side), min(h, y0 + side)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


def resize_square(square_hwc: torch.Tensor, size: int) -> torch.Tensor:
    """(S, S, C) uint8 -> (C, size, size) uint8: antialiased bilinear (DALI: linear + antialias), rounded."""
    x = square_hwc.permute(2, 0, 1).unsqueeze(0).float()
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0]


def valid_profile(start: int, side: int, length: int, size: int, dtype=torch.float32) -> torch.Tensor:
    """(size,) the photo's share of each pixel along one axis: the indicator of [0, length) on the square's
    pixels start .. start+side-1, resized like the crop (antialiased bilinear, not rounded). The resize's float64
    weights (those of F.interpolate on float64, cached per (side, size)) applied to the indicator: one per image
    on every CPU path, where F.interpolate cost 0.15 ms a call."""
    lo, hi = min(max(-start, 0), side), min(max(length - start, 0), side)  # the square's pixels on the photo
    if lo == 0 and hi == side:
        return torch.ones(size, dtype=dtype)
    first, weights = preprocess_cpu.antialias_weights64(side, size)
    sample = first[:, None] + np.arange(weights.shape[1])
    photo = (weights * ((sample >= lo) & (sample < hi))).sum(1)
    return torch.from_numpy(np.clip(photo, 0.0, 1.0)).to(dtype)


def square_valid(x0: int, y0: int, side: int, width: int, height: int, size: int) -> torch.Tensor:
    """(2, size) float32 profiles [vy, vx] of the photo inside the square (x0, y0, side) resized to size."""
    return torch.stack([valid_profile(y0, side, height, size), valid_profile(x0, side, width, size)])


def crop_resize_box(image_hwc: torch.Tensor, x0: int, y0: int, side: int, size: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) uint8: resize_square(crop_square(image, x0, y0, side), size), on the CPU
    by the fused kernel of tltrain.preprocess_cpu (same numbers, ~10x faster on a 5 MP photo)."""
    if image_hwc.device.type == "cpu" and image_hwc.dtype == torch.uint8 and image_hwc.shape[-1] == 3 \
            and preprocess_cpu.AVAILABLE:
        return torch.from_numpy(preprocess_cpu.crop_resize_u8(image_hwc.numpy(), x0, y0, side, size))
    return resize_square(crop_square(image_hwc, x0, y0, side), size)


def crop_resize(image_hwc: torch.Tensor, disc, size: int, cfg: PreprocessConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation geometry: the disc square resized to size x size (pass cfg.work_size(model size)) as uint8 CHW,
    and its (2, size) valid profiles."""
    h, w = image_hwc.shape[:2]
    x0, y0, side = disc_box(disc, w, h, cfg.crop_to_disc)
    return crop_resize_box(image_hwc, x0, y0, side, size), square_valid(x0, y0, side, w, h, size)


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, S, S) float -> (N, C, size, size), antialiased bilinear, not rounded (the filtered image is float)."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def finish(batch_uint8: torch.Tensor, cfg: PreprocessConfig, dtype: str = "fp32",
           channels_last: bool = False, size: int | None = None, valid: torch.Tensor | None = None,
           kernel: str = "auto") -> torch.Tensor:
    """(N, C, 2R, 2R) uint8 crops -> model input: filter (unless off or offline), resize to size, normalize,
    dtype, layout. size=None keeps the crops' size; valid: (N, 2, 2R) profiles (None: every pixel is photo).
    kernel: "auto" filters CPU crops with the fused kernel of tltrain.preprocess_cpu (the same numbers within
    float32 rounding, 2-3x faster), "torch" always with the torch code (the kernel's reference)."""
    return normalise(grey_levels(batch_uint8, cfg, size, valid, kernel), cfg, dtype, channels_last)


def grey_levels(batch_uint8: torch.Tensor, cfg: PreprocessConfig, size: int | None = None,
                valid: torch.Tensor | None = None, kernel: str = "auto") -> torch.Tensor:
    """finish() before normalisation: filtered (unless off or offline) and resized grey levels. uint8 where
    that is exact (no resize after the filter and an integer offset in [0, 255]: the filter rounds and clamps),
    so a DataLoader worker can hand over a quarter of the bytes; float32 otherwise."""
    size = size or batch_uint8.shape[-1]
    resized = size != batch_uint8.shape[-1]
    if not cfg.filter_on:
        return resize_batch(batch_uint8.float(), size) if resized else batch_uint8
    if kernel == "auto" and _cpu_kernel_fits(batch_uint8):
        exact = not resized and float(cfg.offset).is_integer() and 0 <= cfg.offset <= 255
        x = _filter_cpu_kernel(batch_uint8, cfg, valid, torch.uint8 if exact else torch.float32)
    else:
        x = ben_graham_filter(batch_uint8.float(), cfg, valid)
    return resize_batch(x.float(), size) if resized else x


def normalise(grey: torch.Tensor, cfg: PreprocessConfig, dtype: str = "fp32",
              channels_last: bool = False) -> torch.Tensor:
    """(N, 3, S, S) grey levels (uint8 or float) -> (x / 255 - mean) / std in dtype and layout."""
    mean = torch.tensor(cfg.mean, device=grey.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.std, device=grey.device).view(1, 3, 1, 1) * 255
    if _cpu_kernel_fits(grey):  # one pass through a table of the 256 values each channel can take (same numbers)
        table = ((torch.arange(256, dtype=torch.float32).view(1, 1, 1, 256) - mean) / std).view(3, 256)
        x = torch.from_numpy(preprocess_cpu.normalise_u8(grey.numpy(), table.numpy())).to(DTYPES[dtype])
    else:
        x = grey.float() if grey.dtype != torch.float32 else grey.clone()
        x = x.sub_(mean).div_(std).to(DTYPES[dtype])  # in place: one image-sized allocation, not three
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def _cpu_kernel_fits(batch: torch.Tensor) -> bool:
    """A CPU uint8 (N, 3, S, S) batch: what the kernels of tltrain.preprocess_cpu take."""
    return preprocess_cpu.AVAILABLE and batch.device.type == "cpu" and batch.dtype == torch.uint8 \
        and batch.dim() == 4 and batch.shape[1] == 3 and batch.shape[-1] == batch.shape[-2]


@functools.lru_cache(maxsize=16)
def _mask_runs(side: int, ratio: float):
    """Per row, the run of the circle mask (everything when ratio is 0), for the CPU kernel; cached per size."""
    inside = circle_mask(side, ratio) if ratio > 0 else torch.ones((side, side), dtype=torch.bool)
    return preprocess_cpu.mask_runs(inside.numpy())


def _filter_cpu_kernel(batch: torch.Tensor, cfg: PreprocessConfig, valid: torch.Tensor | None,
                       out_dtype: torch.dtype) -> torch.Tensor:
    """ben_graham_filter of CPU uint8 crops by the fused kernel (tltrain.preprocess_cpu), as out_dtype grey
    levels; the images of a batch side by side on torch's intra-op threads (the kernel runs without the GIL)."""
    n, _, side, _ = batch.shape
    sigma = side / 2 * cfg.sigma_ratio
    taps = gaussian_taps(sigma, torch.float32)
    check_window(taps, side, side, sigma)
    profiles = (full_valid(n, side) if valid is None else valid.cpu()).to(torch.float64)
    norm = blur_profiles(profiles, sigma)  # the separable normaliser: V B = (vy / gauss0(vy)) (x) (vx / gauss0(vx))
    factors = torch.where(norm > 0, profiles / torch.where(norm > 0, norm, 1.0), 0.0)
    factors[:, 0] *= cfg.gain
    runs = _mask_runs(side, float(cfg.mask_ratio))
    out = torch.empty((n, 3, side, side), dtype=out_dtype)
    crops, factors, taps, target = batch.contiguous().numpy(), factors.numpy(), taps.numpy(), out.numpy()

    for_each_image(lambda index: preprocess_cpu.filter_image(crops[index], factors[index], taps, runs, cfg.gain,
                                                             cfg.offset, target[index]), n)
    return out


def for_each_image(work, count: int) -> None:
    """work(i) for i < count, side by side on torch's intra-op threads (one in a DataLoader worker): the CPU
    kernels run without the GIL, so a batch's images go through in parallel in the loader's own process."""
    threads = min(count, torch.get_num_threads())
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, range(count)))
    else:
        for index in range(count):
            work(index)


def reference(images_hwc: list[torch.Tensor], discs, size: int, cfg: PreprocessConfig, dtype: str = "fp32",
              channels_last: bool = False) -> torch.Tensor:
    """The whole evaluation recipe for a list of decoded (H, W, 3) uint8 images: the definition."""
    work = cfg.work_size(size)
    pairs = [crop_resize(img, disc, work, cfg) for img, disc in zip(images_hwc, discs)]
    crops, valid = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    return finish(crops, cfg, dtype, channels_last, size, valid)


def definition_float64(image_hwc: torch.Tensor, disc, size: int, cfg: PreprocessConfig) -> torch.Tensor:
    """The filter step of the definition written out in float64 without the shortcuts the backends take (the
    tests' ground truth): the valid map is the crop + resize of a 2-D ones channel (not two profiles), and the
    normaliser is a 2-D blur of it. Returns (3, size, size) float64 grey levels; size is the work size 2R."""
    h, w = image_hwc.shape[:2]
    x0, y0, side = disc_box(disc, w, h, cfg.crop_to_disc)
    ones = torch.ones((h, w, 1), dtype=torch.float64)
    square = torch.cat([crop_square(image_hwc.to(torch.float64), x0, y0, side), crop_square(ones, x0, y0, side)], 2)
    x = square.permute(2, 0, 1).unsqueeze(0)
    if side != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    crop = x[:, :3].round().clamp(0, 255)  # every backend hands the filter a uint8 crop
    valid = x[:, 3:].clamp(0, 1)
    sigma = size / 2 * cfg.sigma_ratio
    den = gaussian_blur(valid, sigma)
    blurred = gaussian_blur(crop, sigma) / torch.where(den > 0, den, 1.0)
    out = torch.round(cfg.gain * (crop - valid * blurred) + cfg.offset).clamp(0, 255)
    if cfg.mask_ratio > 0:
        out = torch.where(circle_mask(size, cfg.mask_ratio), out, torch.full_like(out, cfg.offset))
    return out[0]


def rotate_batch(x: torch.Tensor, degrees, cfg: PreprocessConfig) -> torch.Tensor:
    """Rotate each image of a finished (N, 3, S, S) batch about its centre by its own angle (bilinear); the
    corners that come in are the offset grey (black with the filter off), normalised. Training rotates after the
    filter, which is rotation invariant, so the filter always sees the crop's separable valid map."""
    angles = torch.as_tensor(degrees, dtype=torch.float32).to(x.device).reshape(-1)
    if len(angles) == 0 or not bool(angles.ne(0).any()):
        return x
    level = cfg.offset if cfg.filter_on else 0.0
    grey = (level / 255 - torch.tensor(cfg.mean, device=x.device)) / torch.tensor(cfg.std, device=x.device)
    grey = grey.view(1, 3, 1, 1)
    theta = torch.deg2rad(angles)
    cos, sin, zero = torch.cos(theta), torch.sin(theta), torch.zeros_like(theta)
    affine = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    work = x.float() - grey
    grid = F.affine_grid(affine, list(work.shape), align_corners=False)
    out = F.grid_sample(work, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + grey
    out = out.to(x.dtype)
    return out.contiguous(memory_format=torch.channels_last) if x.is_contiguous(
        memory_format=torch.channels_last) and not x.is_contiguous() else out.contiguous()
