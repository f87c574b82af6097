"""LoaderConfig: which backend, batch geometry, decoding and preprocessing options."""
from __future__ import annotations

from dataclasses import dataclass, field

from tltrain.checks import check_number, validate_once
from tltrain.errors import ConfigError, choices_error
from tltrain.preprocess_config import AugmentConfig, PreprocessConfig, validate_dtype

BACKENDS = ("torch", "dali")
DECODE_ERRORS = ("skip", "fail")
DALI_DEVICES = ("auto", "gpu", "cpu")
FILTER_KERNELS = ("auto", "torch", "triton", "triton_dot", "triton_direct", "dali")
#: Model input side: the range export.validate_metadata accepts for a package (export.MIN_SIZE, MAX_SIZE; export
#: imports timm, so the values are kept here and tests/test_config_ranges.py checks they agree).
MIN_SIZE, MAX_SIZE = 8, 4096
MAX_BATCH_SIZE = 65_536  # per rank
MAX_WORKERS = 1024  # worker processes (torch) or CPU threads (dali)
#: Samples held for shuffling (encoded, ~0.1-3 MB each for fundus photos): 10^5 is already tens of GB.
MAX_SHUFFLE_BUFFER = 100_000
MAX_PREFETCH_FACTOR = 64  # batches prefetched per worker


@dataclass
class LoaderConfig:
    backend: str = "torch"  # torch (PIL decode in DataLoader workers) | dali (nvJPEG on GPU, or DALI CPU ops)
    batch_size: int = 32  # per rank
    size: int = 512  # model input side; the disc fills it (radius = size / 2)
    workers: int = 4  # torch: DataLoader worker processes; dali: CPU threads
    shuffle_buffer: int = 1000  # training shuffle buffer in samples (dali: reader initial_fill; torch: wds.shuffle)
    balanced: bool = False  # training: every class the same share of an epoch (Sallam et al.); both backends
    #: training: class c's share of an epoch is weight_c / sum(weights) (balanced = all equal); both backends
    class_weights: list[float] | None = None
    # torch: skip = log the key, count it, drop the sample | fail: stop (dali: fails). A missing or damaged shard
    # (not one sample) always stops the run, naming it
    on_decode_error: str = "skip"
    dtype: str = "fp32"  # fp32 | fp16 | bf16 model input
    channels_last: bool = False
    pin_memory: bool = True  # torch backend, when the device is CUDA
    prefetch_factor: int = 2  # torch backend: batches prefetched per worker
    # torch backend, evaluation loaders (validation every epoch): keep the worker processes between passes rather
    # than start `workers` new ones each time; idle workers keep their memory until the loader is dropped
    persistent_workers: bool = True
    # torch backend, opt-in speed option: libjpeg decodes at a reduced DCT scale when the crop allows it. Off by
    # default: DALI, predict and load_pretrained decode at full size and cannot match it (warned when on)
    draft_decode: bool = False
    dali_device: str = "auto"  # auto (gpu when CUDA is available) | gpu | cpu
    hw_decoder_load: float = 0.65  # dali on GPU: share of images sent to the hardware JPEG decoder (A100/H100)
    # where the Ben Graham filter runs: auto | torch | dali | triton (CUDA; tensor-core kernel where the window fits,
    # else direct) | triton_dot | triton_direct (force one Triton kernel; kernels/ben_graham.py)
    filter_kernel: str = "auto"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def checked_class_weights(self, num_classes: int) -> list[float] | None:
        """loader.class_weights against the data's class count (known once the manifest is read)."""
        if self.class_weights is not None and len(self.class_weights) != num_classes:
            raise ConfigError(f"loader.class_weights has {len(self.class_weights)} weights for {num_classes} "
                              "classes: give one per class")
        return None if self.class_weights is None else [float(w) for w in self.class_weights]

    def validate(self) -> None:
        """ConfigError for a bad value; free when these values were already validated (build_loader calls it for
        every loader of a run whose config was validated when it was loaded)."""
        validate_once(self, self._validate)

    def _validate(self) -> None:
        for key, value, valid in (("backend", self.backend, BACKENDS),
                                  ("on_decode_error", self.on_decode_error, DECODE_ERRORS),
                                  ("dali_device", self.dali_device, DALI_DEVICES),
                                  ("filter_kernel", self.filter_kernel, FILTER_KERNELS)):
            if value not in valid:
                raise choices_error(f"loader.{key}", value, valid)
        validate_dtype(self.dtype)
        if self.batch_size < 1 or self.size < 8 or self.workers < 0 or self.shuffle_buffer < 1:
            raise ConfigError("loader.batch_size >= 1, loader.size >= 8, loader.workers >= 0 and "
                              "loader.shuffle_buffer >= 1 are required")
        self._check_numbers()
        if self.balanced and self.class_weights is not None:
            raise ConfigError("loader.balanced=true and loader.class_weights both set the classes' shares: give one")
        if self.class_weights is not None:
            if not self.class_weights or len(self.class_weights) > 10_000:
                raise ConfigError("loader.class_weights must be a list of one weight per class")
            for number, weight in enumerate(self.class_weights):
                check_number(f"loader.class_weights[{number}]", weight, 0, 1e6)
            if not sum(self.class_weights) > 0:
                raise ConfigError("loader.class_weights: at least one class needs a weight above 0")
        if self.filter_kernel == "dali" and self.backend != "dali":
            raise ConfigError("loader.filter_kernel=dali needs loader.backend=dali")
        self.preprocess.validate()
        self.augment.validate()

    def _check_numbers(self) -> None:
        """Whole numbers within bounds for everything that sizes memory or processes, checked before anything is
        built: a batch of 10^9 images or a 10^6-pixel side would otherwise fail only once allocation starts."""
        check_number("loader.batch_size", self.batch_size, 1, MAX_BATCH_SIZE, integer=True)
        check_number("loader.size", self.size, MIN_SIZE, MAX_SIZE, integer=True)
        check_number("loader.workers", self.workers, 0, MAX_WORKERS, integer=True)
        check_number("loader.shuffle_buffer", self.shuffle_buffer, 1, MAX_SHUFFLE_BUFFER, integer=True)
        check_number("loader.prefetch_factor", self.prefetch_factor, 1, MAX_PREFETCH_FACTOR, integer=True)
        check_number("loader.hw_decoder_load", self.hw_decoder_load, 0, 1)
