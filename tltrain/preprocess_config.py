"""The preprocessing and augmentation configs (loader.preprocess, loader.augment), torch-free so a run's config
can be checked in a fraction of a second; the preprocessing itself is tltrain/preprocess.py."""
from __future__ import annotations

from dataclasses import dataclass, field

from tltrain.checks import check_number
from tltrain.errors import ConfigError, choices_error
from tltrain.safe_io import printable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DTYPE_NAMES = ("fp32", "fp16", "bf16")  # preprocess.DTYPES maps them to torch dtypes
#: The filter runs on a (2R)^2 square; R <= sqrt(decode.MAX_PIXELS) / 2 (3535, prepare's radius:N limit too)
#: keeps it within the 50 MP any decoded image may have (a larger one would only upsample, at up to 3 x 4 bytes
#: a pixel per image) and within export's preprocessing.radius <= 4096. decode imports PIL: the value is kept here
#: and tests/test_config_ranges.py checks it against decode.MAX_PIXELS.
MAX_RADIUS = 3535
#: The rest mirror the bounds export.validate_metadata puts on a package's preprocessing, so a run exports.
MIN_SIGMA_RATIO, MAX_SIGMA_RATIO = 1e-6, 0.999999
MAX_GAIN = 1e4  # gain and offset
MAX_MEAN = 1e3  # mean in [-1e3, 1e3], std in [1e-6, 1e3]
MIN_STD = 1e-6
MAX_ROTATE_DEG = 360.0  # uniform in [-rotate_deg, rotate_deg]: 180 already reaches every angle


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
        """Each value finite and within the bounds a model package may hold (export.validate_metadata), so a run
        that trains also exports, and the filter's working image stays within what tltrain decodes."""
        if not 0 < self.sigma_ratio < 1:
            raise ConfigError(f"loader.preprocess.sigma_ratio={self.sigma_ratio!r} must be in (0, 1)")
        check_number("loader.preprocess.sigma_ratio", self.sigma_ratio, MIN_SIGMA_RATIO, MAX_SIGMA_RATIO)
        if not 0 <= self.mask_ratio <= 1.5:
            raise ConfigError(f"loader.preprocess.mask_ratio={self.mask_ratio!r} must be in [0, 1.5]")
        if self.radius < 0 or 0 < self.radius < 4:
            raise ConfigError(f"loader.preprocess.radius={self.radius!r} must be 0 (= size / 2) or >= 4 pixels")
        check_number("loader.preprocess.radius", self.radius, 0, MAX_RADIUS, integer=True)
        for key in ("gain", "offset"):
            check_number(f"loader.preprocess.{key}", getattr(self, key), -MAX_GAIN, MAX_GAIN)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("loader.preprocess.mean/std need 3 values each, std > 0")
        for index, (mean, std) in enumerate(zip(self.mean, self.std)):
            check_number(f"loader.preprocess.mean[{index}]", mean, -MAX_MEAN, MAX_MEAN)
            check_number(f"loader.preprocess.std[{index}]", std, MIN_STD, MAX_MEAN)

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
        """Probabilities in [0, 1], jitter below 1 (the factor 1 - jitter stays positive), a finite rotation and
        exactly one (lo, hi) crop range: each is drawn from every training batch, so a bad one would fail (or
        quietly do something else) mid-run."""
        for key in ("hflip", "vflip"):
            check_number(f"loader.augment.{key}", getattr(self, key), 0, 1)
        check_number("loader.augment.rotate_deg", self.rotate_deg, 0, MAX_ROTATE_DEG)
        for key in ("brightness", "contrast", "saturation"):
            check_number(f"loader.augment.{key}", getattr(self, key), 0, 1, below=True)
        if len(self.crop_scale) != 2:
            raise ConfigError(f"loader.augment.crop_scale={printable(repr(list(self.crop_scale)), 100)} must be 2 "
                              "values [lo, hi]")
        for index, scale in enumerate(self.crop_scale):
            check_number(f"loader.augment.crop_scale[{index}]", scale, 0, 1, above=True)
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"loader.augment.crop_scale={list(self.crop_scale)} must satisfy 0 < lo <= hi <= 1")


def validate_dtype(name: str) -> None:
    if name not in DTYPE_NAMES:
        raise choices_error("loader.dtype", name, DTYPE_NAMES)
