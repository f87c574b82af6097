"""The preprocessing and augmentation configs (loader.preprocess, loader.augment), torch-free so a run's config
can be checked in a fraction of a second; the preprocessing itself is tltrain/preprocess.py."""
from __future__ import annotations

from dataclasses import dataclass, field

from tltrain.errors import ConfigError, choices_error

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DTYPE_NAMES = ("fp32", "fp16", "bf16")  # preprocess.DTYPES maps them to torch dtypes


@dataclass
class PreprocessConfig:
    enabled: bool = True  # Ben Graham filter on; off = crop + resize + normalize only
    applied_offline: bool = False  # the shards already hold filtered images (skip the filter here)
    crop_to_disc: bool = True  # crop the disc square before resizing (off: resize the whole photo)
    radius: int = 0  # disc radius R in px at which the filter runs (Ben Graham: 300); 0 = half the model size
    sigma_ratio: float = 1.0 / 30.0  # blur sigma as a fraction of the disc radius (Ben Graham: scale / 30)
    gain: float = 4.0  # out = gain * img - gain * blur + offset
    offset: float = 128.0
    mask_ratio: float = 0.9  # outside mask_ratio * radius -> offset grey; 0 disables the mask
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))

    def validate(self) -> None:
        if not 0 < self.sigma_ratio < 1:
            raise ConfigError(f"loader.preprocess.sigma_ratio={self.sigma_ratio!r} must be in (0, 1)")
        if not 0 <= self.mask_ratio <= 1.5:
            raise ConfigError(f"loader.preprocess.mask_ratio={self.mask_ratio!r} must be in [0, 1.5]")
        if self.radius < 0 or 0 < self.radius < 4:
            raise ConfigError(f"loader.preprocess.radius={self.radius!r} must be 0 (= size / 2) or >= 4 pixels")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("loader.preprocess.mean/std need 3 values each, std > 0")

    @property
    def filter_on(self) -> bool:
        return self.enabled and not self.applied_offline

    def work_size(self, size: int) -> int:
        """Side of the square the filter runs on: 2R, or the model size when radius is 0 or the filter is off."""
        return 2 * self.radius if (self.radius and self.filter_on) else size


@dataclass
class AugmentConfig:
    """Training-time augmentation (evaluation is deterministic: none of this applies)."""

    hflip: float = 0.5  # probability
    vflip: float = 0.0
    rotate_deg: float = 180.0  # uniform in [-rotate_deg, rotate_deg]; fundus photos have no canonical rotation
    crop_scale: list[float] = field(default_factory=lambda: [0.85, 1.0])  # disc-square side kept (random crop)
    brightness: float = 0.2  # multiplicative jitter range
    contrast: float = 0.2
    saturation: float = 0.2

    def validate(self) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"loader.augment.crop_scale={list(self.crop_scale)} must satisfy 0 < lo <= hi <= 1")


def validate_dtype(name: str) -> None:
    if name not in DTYPE_NAMES:
        raise choices_error("loader.dtype", name, DTYPE_NAMES)
