"""Ben Graham's preprocessing, the torch reference: the one definition every loader backend is tested against.

Per image (docs/architecture.md): crop the square around the disc (black outside the photo) and resize it to
2R x 2R, so the disc radius becomes the configured R (`radius`, 0 = size / 2); then out = 4*img - 4*gauss(img,
sigma = R * sigma_ratio) + 128, rounded and saturated to [0, 255] like OpenCV's addWeighted on uint8; pixels
farther than mask_ratio * R from the centre become 128; then resize to the model's size x size (identity when
2R == size), and (x / 255 - mean) / std in the configured dtype and memory format.
Gaussian: 2*ceil(3*sigma)+1 normalised taps, border reflect-101 (OpenCV's and DALI's default).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
    """Separable blur of (N, C, H, W) float images, reflect-101 border; the window may not exceed the image."""
    taps = gaussian_taps(sigma, images.dtype).to(images.device)
    half = (len(taps) - 1) // 2
    n, c, h, w = images.shape
    if half >= min(h, w):
        raise ValueError(f"blur window {len(taps)} taps is larger than the {h}x{w} image (sigma {sigma:g})")
    x = images.reshape(n * c, 1, h, w)
    tf32 = torch.backends.cudnn.allow_tf32  # on by default: cuDNN would blur with 10-bit mantissas on a GPU,
    torch.backends.cudnn.allow_tf32 = False  # ~0.5 grey level after the x4 gain; the reference stays float32
    try:
        x = F.conv2d(F.pad(x, (half, half, 0, 0), mode="reflect"), taps.view(1, 1, 1, -1))
        x = F.conv2d(F.pad(x, (0, 0, half, half), mode="reflect"), taps.view(1, 1, -1, 1))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return x.reshape(n, c, h, w)


def circle_mask(size: int, ratio: float, device=None) -> torch.Tensor:
    """(size, size) bool: True inside ratio * radius of the centre (pixel centres at i + 0.5)."""
    coords = torch.arange(size, device=device, dtype=torch.float32) + 0.5 - size / 2
    dist2 = coords.view(-1, 1) ** 2 + coords.view(1, -1) ** 2
    return dist2 <= (ratio * size / 2) ** 2


def ben_graham_filter(images: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """(N, C, S, S) float in [0, 255] with the disc filling the square -> filtered, rounded, masked, [0, 255]."""
    size = images.shape[-1]
    radius = size / 2
    work = images.to(torch.float64) if images.dtype == torch.float64 else images.float()
    blurred = gaussian_blur(work, radius * cfg.sigma_ratio)
    out = torch.round(cfg.gain * work - cfg.gain * blurred + cfg.offset).clamp_(0, 255)
    if cfg.mask_ratio > 0:
        inside = circle_mask(size, cfg.mask_ratio, images.device)
        out = torch.where(inside, out, torch.full_like(out, cfg.offset))
    return out


def disc_box(disc, width: int, height: int, crop_to_disc: bool = True, scale: float = 1.0,
             shift=(0.0, 0.0)) -> tuple[int, int, int]:
    """Integer square (x0, y0, side) around the disc, possibly reaching outside the photo (padded black)."""
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


def crop_resize(image_hwc: torch.Tensor, disc, size: int, cfg: PreprocessConfig) -> torch.Tensor:
    """Evaluation geometry: the disc square resized to size x size (pass cfg.work_size(model size)), uint8 CHW."""
    x0, y0, side = disc_box(disc, image_hwc.shape[1], image_hwc.shape[0], cfg.crop_to_disc)
    return resize_square(crop_square(image_hwc, x0, y0, side), size)


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, S, S) float -> (N, C, size, size), antialiased bilinear, not rounded (the filtered image is float)."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def finish(batch_uint8: torch.Tensor, cfg: PreprocessConfig, dtype: str = "fp32",
           channels_last: bool = False, size: int | None = None) -> torch.Tensor:
    """(N, C, 2R, 2R) uint8 crops -> model input: filter (unless off or offline), resize to size, normalize,
    dtype, layout. size=None keeps the crops' size."""
    x = batch_uint8.float()
    if cfg.filter_on:
        x = ben_graham_filter(x, cfg)
    x = resize_batch(x, size or x.shape[-1])
    mean = torch.tensor(cfg.mean, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.std, device=x.device).view(1, 3, 1, 1) * 255
    x = ((x - mean) / std).to(DTYPES[dtype])
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def reference(images_hwc: list[torch.Tensor], discs, size: int, cfg: PreprocessConfig, dtype: str = "fp32",
              channels_last: bool = False) -> torch.Tensor:
    """The whole evaluation recipe for a list of decoded (H, W, 3) uint8 images: the definition."""
    work = cfg.work_size(size)
    crops = torch.stack([crop_resize(img, disc, work, cfg) for img, disc in zip(images_hwc, discs)])
    return finish(crops, cfg, dtype, channels_last, size)
