"""TrainerConfig: every knob of the training engine, typed and validated before anything runs."""
from __future__ import annotations

from dataclasses import dataclass, field

from tltrain.checks import check_number, validate_once  # check_number stays importable from here (tests)
from tltrain.errors import ConfigError, choices_error

STRATEGIES = ("single", "ddp", "deepspeed")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("cosine", "onecycle", "constant")
LOSSES = ("cross_entropy", "ordinal")
MODES = ("max", "min")
#: Validation metrics a best checkpoint can be chosen by (tltrain.metrics.compute_metrics; the referable ones
#: exist for the 5-grade DR scale or an explicit trainer.referable_threshold).
BEST_METRICS = ("kappa", "accuracy", "top2_accuracy", "auc", "cross_entropy", "sensitivity", "specificity",
                "referable_auc")
#: What a completed run keeps of its checkpoints (CheckpointManager.prune_after_run).
KEEP_AFTER_RUN = ("all", "best", "none")
MAX_SEED = 2**63 - 2**20  # torch.manual_seed takes up to 2**64 - 1; seed + rank must stay below it


@dataclass
class DeepSpeedConfig:
    """ZeRO options passed through to DeepSpeed's JSON config (see deepspeed.readthedocs.io/en/latest/zero3.html)."""

    zero_stage: int = 2  # 1: optimizer state sharded, 2: + gradients, 3: + parameters
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer state to CPU memory
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise choices_error("trainer.deepspeed.zero_stage", self.zero_stage, (0, 1, 2, 3))
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            check_number(f"trainer.deepspeed.{key}", getattr(self, key), 1, integer=True)


@dataclass
class TrainerConfig:
    """How to train: strategy, numerics, optimizer, LR curve, loss, checkpoints and logging."""

    # engine API only (train() without a schedule); `tltrain train` rejects it: the schedule sets the run's length
    epochs: int | None = None
    strategy: str = "single"  # single | ddp | deepspeed
    precision: str = "bf16"  # fp32 | bf16 | fp16 (fp16 uses a GradScaler, or DeepSpeed's loss scaling)
    channels_last: bool = True
    compile: bool = False  # torch.compile the model (first steps are slow while it compiles)
    grad_accum: int = 1  # micro-batches per optimizer step; a trailing remainder of an epoch is skipped
    clip_grad_norm: float = 0.0  # 0 = no clipping
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3  # base LR (a schedule's per-group LRs replace it)
    weight_decay: float = 0.05
    momentum: float = 0.9  # SGD only
    lr_schedule: str = "cosine"  # cosine (linear warm-up then cosine) | onecycle | constant; per optimizer step
    warmup_epochs: float = 1.0  # cosine: warm-up length; onecycle: rising part = warmup_epochs / phase epochs
    min_lr_ratio: float = 0.01  # LR at the end of the curve, as a fraction of the base LR
    ema_decay: float = 0.0  # >0 keeps an exponential moving average of the weights, evaluated instead of the raw model
    loss: str = "cross_entropy"  # cross_entropy | ordinal (regression on one output, thresholds tuned for kappa)
    label_smoothing: float = 0.0
    class_weights: list[float] | None = None  # per-class loss weights; "inverse frequency" is computed by the caller
    eval_every: int = 1  # epochs between validations (the last epoch is always validated)
    best_metric: str = "kappa"  # metric that picks the best checkpoint
    best_mode: str = "max"
    keep_last: int = 2  # last N checkpoints kept, plus the best one
    keep_after_run: str = "all"  # once the run completes: all (can be extended) | best (its weights only) | none
    checkpoint_every_steps: int = 0  # 0 = epoch ends only (and on preemption); >0 also every N optimizer steps
    log_every_steps: int = 10  # TensorBoard scalars interval
    #: the loss, the non-finite check and the stop signal are read every N optimizer steps (and at every log,
    #: checkpoint and epoch end): between them a step never waits for the device or the other ranks
    check_every_steps: int = 10
    #: several ranks agree before every step whether to stop (one small CPU all-reduce, no device wait), so a rank
    #: stuck waiting for data can be interrupted by SLURM's signal; false: only at check steps (a stalled rank then
    #: delays the stop until its batch comes). One rank: always every step (it costs nothing there)
    stop_check_every_step: bool = True
    image_grid: int = 16  # images in the TensorBoard input grid (0 = none)
    progress: bool = True  # rank-0 progress bar
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms + cuDNN/cuBLAS settings (docs/architecture.md)
    referable_threshold: int | None = 2
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def validate(self) -> None:
        """ConfigError for a bad value; free when these values were already validated (validate_once)."""
        validate_once(self, self._validate)

    def _validate(self) -> None:
        for key, value, valid in (("strategy", self.strategy, STRATEGIES), ("precision", self.precision, PRECISIONS),
                                  ("optimizer", self.optimizer, OPTIMIZERS),
                                  ("lr_schedule", self.lr_schedule, LR_SCHEDULES),
                                  ("loss", self.loss, LOSSES), ("best_mode", self.best_mode, MODES),
                                  ("best_metric", self.best_metric, BEST_METRICS),
                                  ("keep_after_run", self.keep_after_run, KEEP_AFTER_RUN)):
            if value not in valid:
                raise choices_error(f"trainer.{key}", value, valid)
        self._check_numbers()
        if self.strategy == "deepspeed" and (self.compile or self.ema_decay):
            raise ConfigError("trainer.strategy=deepspeed does not support trainer.compile or trainer.ema_decay here; "
                              "set them to false/0")
        self.deepspeed.validate()

    def _check_numbers(self) -> None:
        """Every numeric field in its range (whole numbers where counts go, probabilities below 1)."""
        for key in ("epochs", "grad_accum", "keep_last", "eval_every", "log_every_steps", "check_every_steps"):
            if getattr(self, key) is not None:
                check_number(f"trainer.{key}", getattr(self, key), 1, integer=True)
        for key in ("checkpoint_every_steps", "image_grid"):
            check_number(f"trainer.{key}", getattr(self, key), 0, integer=True)
        for key in ("lr", "weight_decay", "clip_grad_norm", "warmup_epochs"):
            check_number(f"trainer.{key}", getattr(self, key), 0)
        for key in ("momentum", "ema_decay", "label_smoothing"):  # 1 would stop learning (or learn nothing)
            check_number(f"trainer.{key}", getattr(self, key), 0, 1, below=True)
        check_number("trainer.min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_number("trainer.seed", self.seed, 0, MAX_SEED, integer=True)
        if self.referable_threshold is not None:
            check_number("trainer.referable_threshold", self.referable_threshold, 1, integer=True)
        if self.class_weights is not None:
            for index, weight in enumerate(self.class_weights):
                check_number(f"trainer.class_weights[{index}]", weight, 0)
            if not any(weight > 0 for weight in self.class_weights):
                raise ConfigError("trainer.class_weights: at least one weight must be > 0")
