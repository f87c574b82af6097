"""The training loop: one loop for single/DDP/DeepSpeed, transfer phases, checkpoints, preemption, metrics.

Entry point: `train(cfg, model, train_loader, val_loader, run_dir, schedule=None) -> result dict`.

Shape (torchtitan's): `_fit` loops over epochs and phases; `_train_epoch` loops over optimizer steps;
`train_step(micro_batches)` does forward/backward/update. The policies live in small components: StepFeed
(engine/feed.py: resume skipping, the interruptible data wait), ThroughputMeter and SkippedSamples
(engine/meters.py), CheckpointManager (engine/checkpoint.py: when and how to save), TrainState (engine/state.py:
everything besides weights, saved and restored by one object), and the Strategy (engine/strategies.py: whatever
differs between single device, DDP and DeepSpeed).

Resume policy: checkpoints are written at epoch ends, every `checkpoint_every_steps` optimizer steps if set, and
at the step boundary after a preemption signal. Each records the epoch and how many batches of it were consumed;
a resumed run re-seeds the loader with set_epoch(epoch) (same order) and skips the consumed batches, so it
continues with the same step count and LR curve. A SIGKILL loses at most the steps since the last checkpoint.
Within one optimizer step the micro-batches (grad_accum) are never split across a checkpoint. The checkpoint also
holds every rank's RNG state and the running train-loss sum and skipped samples of the unfinished epoch, so a
resumed run is bit-identical to an uninterrupted one on the CPU (reproducibility.py) and its epoch's train_loss
covers the whole epoch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tltrain.contracts import Loader, Schedule, sample_sources
from tltrain.engine import distributed as D
from tltrain.engine.checkpoint import CheckpointManager, consolidate_checkpoint
from tltrain.engine.config import BEST_METRICS, TrainerConfig
from tltrain.engine.feed import Fetched, StepFeed, StopBeforeStep
from tltrain.engine.logging import Progress, TensorBoardLogger, scalar_metrics
from tltrain.engine.losses import build_loss, outputs_to_probs, tune_thresholds
from tltrain.engine.meters import SkippedSamples, ThroughputMeter, gather_union
from tltrain.engine.optim import build_ema, default_param_groups, lr_factor, set_lr
from tltrain.engine.records import RunRecords
from tltrain.engine.reproducibility import configure_determinism, seed_everything
from tltrain.engine.rundir import claim_run_dir
from tltrain.engine.signals import NONFINITE_EXIT_CODE, PREEMPTED_EXIT_CODE, StopRequest
from tltrain.engine.state import TrainState
from tltrain.engine.strategies import build_strategy
from tltrain.errors import ConfigError, TltrainError
from tltrain.metrics import (REFERABLE_METRICS, PredictionGatherer, compute_metrics, per_source_metrics,
                             referable_threshold_for, run_metrics, write_predictions_csv)
from tltrain.run_folder import RunFolder
from tltrain.safe_io import atomic_write_text, csv_cell


class NonFiniteLoss(TltrainError):
    """The loss became NaN/inf; the run stops before that batch updates the weights."""

    exit_code = NONFINITE_EXIT_CODE


class _Preempted(Exception):
    pass


class _WholeModelSchedule:
    """The schedule used when none is given: one phase, all parameters trainable at trainer.lr."""

    def __init__(self, cfg: TrainerConfig):
        if cfg.epochs is None:
            raise ConfigError("trainer.epochs is needed when train() gets no transfer schedule")
        self.cfg, self.total_epochs = cfg, cfg.epochs

    def phase_index(self, epoch: int) -> int:
        return 0

    def apply(self, model: nn.Module, phase_index: int) -> list[dict]:
        return default_param_groups(model, self.cfg)

    def set_train_mode(self, model: nn.Module, phase_index: int) -> None:
        pass

    def describe(self, phase_index: int) -> str:
        return f"all layers trainable, lr {self.cfg.lr:g}"


def train(cfg: TrainerConfig, model: nn.Module, train_loader: Loader, val_loader: Loader | None,
          run_dir: str | Path, schedule: Schedule | None = None, *, device: str = "auto",
          num_classes: int | None = None, batch_size: int | None = None, config_to_save=None,
          hparams: dict | None = None, test_loader: Loader | None = None) -> dict:
    """Train (or resume) a run in run_dir; returns {"status", "exit_code", "step", "epoch", "final", "best", ...}.

    status/exit_code: completed/0, preempted/75 (checkpoint written: requeue and call again to resume).
    A NaN/inf loss raises NonFiniteLoss (status.json says failed; the last good checkpoint is kept).
    With a test_loader, the best checkpoint (by cfg.best_metric on validation) is evaluated on it at the end.
    """
    trainer = Trainer(cfg, model, train_loader, val_loader, run_dir, schedule, device=device,
                      num_classes=num_classes, batch_size=batch_size, config_to_save=config_to_save, hparams=hparams,
                      test_loader=test_loader)
    return trainer.fit()


def check_loader(loader, what: str) -> None:
    """ConfigError naming what a loader lacks of the contract the trainer relies on (tltrain.contracts.Loader)."""
    missing = [name for name in ("num_classes", "batch_size", "__len__", "__iter__", "set_epoch")
               if not hasattr(loader, name)]
    if missing:
        raise ConfigError(f"the {what} loader ({type(loader).__name__}) lacks {', '.join(missing)}: a loader "
                          "must meet tltrain.contracts.Loader")


def check_best_metric(cfg: TrainerConfig, num_classes: int) -> None:
    """trainer.best_metric and trainer.referable_threshold against the run's class count (known from the data)."""
    referable = referable_threshold_for(num_classes, cfg.referable_threshold)
    if referable is not None and not 1 <= referable < num_classes:
        raise ConfigError(f"trainer.referable_threshold={referable} must be a grade in [1, "
                          f"{num_classes - 1}] for a {num_classes}-class run")
    reported = run_metrics(num_classes, cfg.referable_threshold)
    if cfg.best_metric in REFERABLE_METRICS and cfg.best_metric not in reported:
        raise ConfigError(f"trainer.best_metric={cfg.best_metric!r} is a referable-DR metric, which a "
                          f"{num_classes}-class run does not compute (5 grades, or set "
                          "trainer.referable_threshold); choose one of "
                          f"{', '.join(m for m in BEST_METRICS if m not in REFERABLE_METRICS)}")
    if cfg.best_metric == "top2_accuracy" and cfg.best_metric not in reported:
        raise ConfigError(f"trainer.best_metric='top2_accuracy' means nothing for a {num_classes}-class run "
                          "(the top two classes are all of them); choose kappa, accuracy, auc or cross_entropy")


class Trainer:
    """One run's training: set-up, resume, the epoch and step loops, validation, test and the run's records."""

    def __init__(self, cfg: TrainerConfig, model: nn.Module, train_loader: Loader, val_loader: Loader | None,
                 run_dir, schedule: Schedule | None = None, *, device: str = "auto", num_classes: int | None = None,
                 batch_size: int | None = None, config_to_save=None, hparams: dict | None = None,
                 test_loader: Loader | None = None):
        cfg.validate()
        check_loader(train_loader, "training")
        self.cfg, self.train_loader, self.val_loader, self.test_loader = cfg, train_loader, val_loader, test_loader
        self.started = time.time()
        self.run = RunFolder(run_dir)
        self.run_dir = self.run.path
        self.schedule = schedule or _WholeModelSchedule(cfg)
        self.env = D.read_env()
        self.device = D.device_for(self.env, device)
        if cfg.strategy == "single" and self.env.world_size > 1:
            raise ConfigError(f"trainer.strategy=single but WORLD_SIZE={self.env.world_size}; use ddp or deepspeed")
        configure_determinism(cfg.deterministic)
        D.init_process_group(self.env, self.device)
        self.is_main = self.env.is_main
        seed_everything(cfg.seed + self.env.rank)
        self.num_classes = num_classes or train_loader.num_classes
        check_best_metric(cfg, self.num_classes)
        self.batch_size = batch_size or train_loader.batch_size
        self.steps_per_epoch = len(train_loader) // cfg.grad_accum
        if self.steps_per_epoch < 1:
            raise ConfigError(f"trainer.grad_accum={cfg.grad_accum} exceeds the {len(train_loader)} batches per epoch")
        self.total_epochs = self.schedule.total_epochs
        self.phase_starts = self._phase_starts()

        self.strategy = build_strategy(cfg, self.env, self.device)
        self.raw_model = self.strategy.prepare_model(model)
        self.loss_fn = build_loss(cfg, self.num_classes).to(self.device)
        self.ema = build_ema(self.raw_model, cfg.ema_decay)
        self.checkpoints = CheckpointManager(self.run_dir, cfg.keep_last, cfg.best_metric, cfg.best_mode, self.is_main,
                                             every_steps=cfg.checkpoint_every_steps)
        self.tb = TensorBoardLogger(self.run.tensorboard, enabled=self.is_main)
        self.progress = Progress(enabled=self.is_main, bar=cfg.progress)
        self.config_to_save, self.hparams = config_to_save, hparams or {}

        self.state = TrainState()
        self.records = RunRecords(self.run, cfg, self.checkpoints, self.state, is_main=self.is_main,
                                  total_epochs=self.total_epochs, steps_per_epoch=self.steps_per_epoch,
                                  world_size=self.env.world_size)
        self.meter = ThroughputMeter(self.env.world_size)
        self.stop: StopRequest | None = None
        self.test_metrics: dict = {}
        self.last_predictions: tuple = ([], np.zeros(0, np.int64), np.zeros((0, 0)))
        self._grid_logged = False
        #: (loss on the device, batch keys, optimizer step, batch in epoch) of each micro-batch since check()
        self._pending_losses: list[tuple[torch.Tensor, list, int, int]] = []

    # -- phases and the learning rate -----------------------------------------------------------------------
    def _phase_starts(self) -> list[int]:
        starts, last = [], None
        for epoch in range(self.total_epochs):
            index = self.schedule.phase_index(epoch)
            if index != last:
                starts.append(epoch)
                last = index
        return starts + [self.total_epochs]

    def _enter_phase(self, phase: int) -> None:
        """Apply the phase's trainable groups and LRs; the strategy builds the phase's optimizer and re-wraps."""
        groups = self.schedule.apply(self.strategy.unwrap(), phase)
        self.strategy.enter_phase(groups, self.batch_size)
        self.state.phase = phase
        if self.is_main:
            self.progress.line(f"phase {phase}: {self.schedule.describe(phase)}")

    def _lr_factor(self) -> float:
        phase = self.state.phase
        start = self.phase_starts[phase] * self.steps_per_epoch
        end = self.phase_starts[phase + 1] * self.steps_per_epoch
        warmup = int(round(self.cfg.warmup_epochs * self.steps_per_epoch))
        return lr_factor(self.cfg, self.state.step - start, end - start, warmup)

    # -- checkpoints ----------------------------------------------------------------------------------------
    @functools.cached_property
    def _config_yaml(self) -> str | None:
        """The run's resolved config as YAML (written to config.yaml and into every checkpoint): made once."""
        if self.config_to_save is None:
            return None
        from omegaconf import OmegaConf

        node = self.config_to_save
        node = OmegaConf.structured(node) if dataclasses.is_dataclass(node) else node
        return OmegaConf.to_yaml(node, resolve=True)

    def _save(self, metrics: dict | None = None) -> str:
        if self._pending_losses:  # a stop before a step: the losses since the last check join the saved state
            self.check()  # (the same on every rank: each took the same steps)
        state = self.state.state_dict(self.env.world_size, self.steps_per_epoch, dataclasses.asdict(self.cfg),
                                      self._config_yaml)
        extra = {"ema": self.ema.state_dict()} if self.ema is not None else {}
        return self.checkpoints.save(self.strategy, state, metrics, extra)

    def _resume(self) -> bool:
        entry = self.checkpoints.latest()
        if entry is None:
            return False
        content = self.checkpoints.read(entry)
        saved = content["trainer"]
        self._enter_phase(saved["phase"])
        self.strategy.restore(self.checkpoints, entry, content)
        if self.ema is not None and content.get("ema"):
            self.ema.load_state_dict(content["ema"])
        self.state.load_state_dict(saved, self.env.rank, self.env.world_size)
        self.checkpoints.saved_step = self.state.step
        if saved["steps_per_epoch"] != self.steps_per_epoch and self.is_main:
            self.progress.line(f"warning: steps per epoch changed from {saved['steps_per_epoch']} to "
                               f"{self.steps_per_epoch} (different world size or batch size); the LR curve shifts")
        if self.is_main:
            self.progress.line(f"resumed from {entry['name']} (epoch {self.state.epoch}, step {self.state.step})")
        return True

    # -- the run --------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        # rank 0 holds the run_dir for the run's life (a no-op when train_app.run already holds it)
        with claim_run_dir(self.run_dir) if self.is_main else contextlib.nullcontext():
            return self._fit()

    def _fit(self) -> dict:
        stop = self.stop = StopRequest()  # also adopts a stop signal that arrived while the run was starting up
        state = self.state
        try:
            pruned = D.broadcast_object(self.checkpoints.index().get("after_run") if self.is_main else None)
            if pruned:  # completed before, checkpoints pruned: nothing to resume from, and nothing left to do
                return self._completed_before(pruned)
            self._start()
            if D.any_rank([stop.is_set], self.device)[0]:  # stopped during start-up: nothing new to save
                raise _Preempted()
            if state.pending_epoch_end is not None:  # preempted during that epoch's validation: redo it
                self._validate_and_record(state.pending_epoch_end["epoch"], state.pending_epoch_end["train"])
            while state.epoch < self.total_epochs:
                phase = self.schedule.phase_index(state.epoch)
                if phase != state.phase:
                    self._enter_phase(phase)
                record = self._train_epoch()
                finished, state.epoch, state.batch_in_epoch = state.epoch, state.epoch + 1, 0
                self._validate_and_record(finished, record)
            if self.test_loader is not None:
                skipped = SkippedSamples(self.test_loader, self.env.world_size)
                self.test_metrics = self._evaluate_best(self.test_loader)
                state.skipped["test"] = skipped.gathered()
            result = self._finish()
            self.strategy.close()
            return result
        except _Preempted:
            self.strategy.close()
            self.records.status("preempted", signal=stop.requested)
            return {"status": "preempted", "exit_code": PREEMPTED_EXIT_CODE, "step": state.step,
                    "epoch": state.epoch, "run_dir": str(self.run_dir)}
        except BaseException as exc:
            self.records.failed(exc)
            raise
        finally:
            stop.close()
            self.progress.end()
            self.tb.close()

    def _start(self) -> None:
        """The run's config on disk, then resume from the latest checkpoint if there is one."""
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self._config_yaml is not None:  # a new file renamed into place: a link there is replaced
                atomic_write_text(self.run.config, self._config_yaml)
        D.barrier()
        resumed = self._resume()
        self.records.status("running", resumed=resumed)

    def _train_epoch(self) -> dict:
        """The epoch's optimizer steps (what is left of it after a resume); returns its record for the history."""
        cfg, state = self.cfg, self.state
        used_batches = self.steps_per_epoch * cfg.grad_accum
        self.train_loader.set_epoch(state.epoch)
        self.strategy.train(True)
        self.schedule.set_train_mode(self.strategy.unwrap(), state.phase)
        self.progress.start(used_batches, f"epoch {state.epoch + 1}/{self.total_epochs}", initial=state.batch_in_epoch)
        self.meter = ThroughputMeter(self.env.world_size)
        skipped = SkippedSamples(self.train_loader, self.env.world_size)
        feed = StepFeed(self.train_loader, used_batches, cfg.grad_accum, self.stop,
                        after_fetch=lambda: self._note_skipped(skipped),
                        checks_before=lambda: (cfg.stop_check_every_step or self.env.world_size == 1
                                               or state.step % cfg.check_every_steps == 0))
        try:
            for micro_batches in feed.steps(consumed=state.batch_in_epoch):
                self.train_step(micro_batches)
                state.step += 1
                if self.ema is not None:
                    self.ema.update(self.raw_model, step=state.step)
                stop_requested = self.check() if self._check_due(used_batches) else False
                if state.step % cfg.log_every_steps == 0:
                    self._log_step()
                if stop_requested:  # the step is complete: checkpoint it and stop
                    self._save()
                    raise _Preempted()
                if self.checkpoints.due(state.step, mid_epoch=state.batch_in_epoch < used_batches):
                    self._save()
        except StopBeforeStep:  # the state after the last step is complete (saved already, unless it is new)
            if not self.checkpoints.has(state.step):
                self._save()
            raise _Preempted() from None
        self.progress.end()
        self._note_skipped(skipped)
        epoch_skipped = gather_union(state.epoch_skipped, self.env.world_size)
        state.skipped["train"] = sorted(set(state.skipped["train"]) | set(epoch_skipped))
        return {"train_loss": state.mean_loss, **self.meter.epoch_figures(), "lr": self.strategy.param_groups[0]["lr"],
                "skipped_samples": len(epoch_skipped)}

    def train_step(self, micro_batches: Iterator[Fetched]) -> None:
        """Forward and backward over one optimizer step's micro-batches, then the update. Nothing here waits for
        the device or the other ranks: each loss stays on the device until the next check (check())."""
        for index, (batch, waited) in enumerate(micro_batches):
            boundary = index == self.cfg.grad_accum - 1
            images = self.strategy.prepare_inputs(batch.images)
            labels = batch.labels.to(self.device, non_blocking=True)
            valid = batch.valid.to(self.device, non_blocking=True) if batch.valid is not None else None
            if not self._grid_logged and self.is_main:
                self.tb.image_grid(batch.images, self.state.step, self.cfg.image_grid)
                self._grid_logged = True
            with self.strategy.micro_batch(boundary):
                loss = self.loss_fn(self.strategy.forward(images), labels, valid)
                self._pending_losses.append((loss.detach(), list(batch.keys)[:16], self.state.step + 1,
                                             self.state.batch_in_epoch))
                if boundary:
                    set_lr(self.strategy.param_groups, self._lr_factor())
                self.strategy.backward(loss)
            self.strategy.step(boundary)
            self.state.batch_in_epoch += 1
            self.meter.add(len(batch.labels), waited)
            self.progress.update(self.state.mean_loss, self.meter.window_rate(),
                                 self.strategy.param_groups[0]["lr"])

    def _check_due(self, used_batches: int) -> bool:
        """Whether the step just taken ends with check(): every trainer.check_every_steps steps, and wherever the
        loss is read or the state saved (a log step, a due checkpoint, the epoch's end). The same on every rank."""
        step, cfg = self.state.step, self.cfg
        return (step % cfg.check_every_steps == 0 or step % cfg.log_every_steps == 0
                or self.checkpoints.due(step, mid_epoch=self.state.batch_in_epoch < used_batches)
                or self.state.batch_in_epoch >= used_batches)

    def check(self) -> bool:
        """The losses since the last check, read from the device at once and added to the epoch's mean in step
        order (the same sums as reading each one at its step: resumes stay bit-identical); then one collective
        asks every rank whether a loss was not finite or a stop was requested. A non-finite loss raises
        NonFiniteLoss naming its step and batch (found before any checkpoint is written: the last checkpoint is a
        good one). Returns whether a stop was requested on any rank."""
        pending, self._pending_losses = self._pending_losses, []
        values = torch.stack([loss for loss, *_ in pending]).float().tolist() if pending else []  # one read-back
        bad = next((i for i, value in enumerate(values) if not math.isfinite(value)), None)
        for value in values[:bad]:
            self.state.add_loss(value)
        nonfinite, stop_requested = D.any_rank([bad is not None, self.stop.is_set], self.device)
        if nonfinite:
            where = pending[bad] if bad is not None else None
            self._nonfinite(values[bad] if bad is not None else None, where)
        return stop_requested

    def _log_step(self) -> None:
        step = self.state.step
        self.tb.scalars({"train/loss": self.state.mean_loss, **self.meter.window_scalars()}, step)
        self.tb.learning_rates(self.strategy.param_groups, step)
        self.tb.gpu_memory(self.device, step)

    def _note_skipped(self, skipped: SkippedSamples) -> None:
        """The training loader's newly skipped samples join the epoch's (a set: a resume re-reads batches)."""
        fresh = skipped.new()
        if fresh:
            self.state.epoch_skipped = sorted(set(self.state.epoch_skipped) | fresh)

    def _nonfinite(self, loss_value: float | None, where) -> None:
        """NonFiniteLoss on every rank: the first non-finite loss of this rank (or that another rank had one)."""
        last = self.checkpoints.latest() if self.is_main else None
        kept = f"; last good checkpoint: {last['name']}" if last else "; no checkpoint was written yet"
        if where is None:
            raise NonFiniteLoss(f"another rank's loss is not finite (found at optimizer step {self.state.step}); "
                                f"rank {self.env.rank}'s losses are finite{kept}")
        _, keys, step, batch_in_epoch = where
        self.state.step = step - 1  # status.json names the last step whose loss was finite (later ones ran on)
        raise NonFiniteLoss(f"loss is {loss_value} at optimizer step {step} (epoch {self.state.epoch}, "
                            f"batch {batch_in_epoch}) on rank {self.env.rank}; batch keys: "
                            f"{', '.join(map(str, keys))}{kept}")

    # -- epoch ends: validation and the records -------------------------------------------------------------
    def _validate_and_record(self, finished_epoch: int, epoch_train: dict) -> None:
        """Validation, history, TensorBoard and the epoch-end checkpoint. A preemption signal during validation
        checkpoints at once (the epoch's training is kept) and the resumed run validates that epoch again."""
        state = self.state
        validate = (state.epoch % self.cfg.eval_every == 0) or state.epoch == self.total_epochs
        skipped = SkippedSamples(self.val_loader, self.env.world_size)
        try:
            val = self.evaluate(self.val_loader) if (validate and self.val_loader is not None) else {}
        except _Preempted:
            state.pending_epoch_end = {"epoch": finished_epoch, "train": epoch_train}
            self._save()
            raise
        state.pending_epoch_end = None
        if val:
            state.last_val = val
            state.skipped["val"] = skipped.gathered()
        state.finish_epoch({"epoch": finished_epoch, "step": state.step, "phase": state.phase, **epoch_train,
                            "val": val})
        self.tb.scalars(scalar_metrics(epoch_train), state.step, prefix="epoch/")
        if val:
            self.tb.scalars(scalar_metrics(val), state.step, prefix="val/")
            self.tb.confusion(val["confusion"], state.step)
        self.tb.flush()
        self._save(val or None)
        summary = ", ".join(f"{k} {val[k]:.4f}" for k in ("accuracy", "kappa", "cross_entropy") if k in val)
        self.progress.line(f"epoch {finished_epoch + 1}/{self.total_epochs} step {state.step}: loss "
                           f"{epoch_train['train_loss']:.4f}, {epoch_train['images_per_s']:.0f} img/s, "
                           f"data wait {epoch_train['wait_fraction']:.0%}" + (f" | val {summary}" if summary else ""))
        self.records.write_metrics()
        self.records.status("running")

    @torch.no_grad()
    def evaluate(self, loader: Loader, tune: bool = True) -> dict:
        """Metrics over the whole loader, gathered from every rank (padding dropped); EMA weights when enabled.

        Ordinal runs tune their thresholds on validation (tune=True); the test split reuses the tuned ones.
        The per-image predictions stay in self.last_predictions (keys, labels, probabilities)."""
        model = self.ema.module if self.ema is not None else self.strategy.model
        was_training = model.training
        model.eval()
        gatherer = PredictionGatherer()
        for batch in loader:
            if self.stop is not None and D.any_rank([self.stop.is_set], self.device)[0]:
                model.train(was_training)
                raise _Preempted()  # a long validation must not outlast SLURM's grace period
            images = self.strategy.prepare_inputs(batch.images)
            with self.strategy.autocast():
                outputs = model(images)
            outputs = outputs.float()
            scores = outputs if self.cfg.loss == "ordinal" else outputs.softmax(dim=1)
            gatherer.add(scores, batch.labels, list(batch.keys), batch.valid)
        model.train(was_training)
        scores, labels, keys = gatherer.gather()
        if len(labels) == 0:
            return {}
        if self.cfg.loss == "ordinal":
            values = scores.reshape(-1)
            if tune:
                self.state.thresholds = tune_thresholds(values, labels, self.num_classes)
            scores = outputs_to_probs(torch.from_numpy(values), "ordinal", self.num_classes,
                                      self.state.thresholds).numpy()
        self.last_predictions = (keys, labels, scores)
        metrics = compute_metrics(scores, labels, self.cfg.referable_threshold)
        if sample_sources(loader):  # several sources: each one's metrics beside the pooled ones
            metrics["per_source"] = per_source_metrics(scores, labels, keys, sample_sources(loader),
                                                       self.cfg.referable_threshold)
        if self.state.thresholds is not None:
            metrics["thresholds"] = [float(t) for t in self.state.thresholds]
        return metrics

    def _evaluate_best(self, loader: Loader) -> dict:
        """Test metrics of the best checkpoint by validation (the weights a paper would report), on every rank.

        metrics["checkpoint"] names the checkpoint whose weights were tested. A strategy that cannot reload them
        (DeepSpeed: ZeRO partitions are not reloaded here) keeps its final weights, which are the latest
        checkpoint's; an export of the best checkpoint then says it has no test metrics of its own. Per-image
        predictions: predictions_test.csv."""
        index = D.broadcast_object(self.checkpoints.index() if self.is_main else None)
        tested = index.get("latest")
        if index.get("best") and self.strategy.reloads_weights:
            state = consolidate_checkpoint(self.run_dir, "best")  # the evaluated weights (EMA when enabled)
            target = self.ema.module if self.ema is not None else self.strategy.unwrap()
            target.load_state_dict(state)
            tested = index["best"]
        if self.state.thresholds is not None and index.get("best"):  # ordinal: the cut points tuned with those
            best_val = self.records.history_val(next(c["step"] for c in index["checkpoints"] if c["name"] == tested))
            if best_val.get("thresholds"):
                self.state.thresholds = np.asarray(best_val["thresholds"])
        metrics = self.evaluate(loader, tune=False)
        metrics["checkpoint"] = tested or "final"
        if self.is_main:
            keys, labels, scores = self.last_predictions  # keys come from the shards: no spreadsheet formulas
            write_predictions_csv(self.run.predictions_test, [csv_cell(k) for k in keys], labels, scores)
            self.tb.scalars({f"test/{k}": v for k, v in scalar_metrics(metrics).items()}, self.state.step)
            for source, part in (metrics.get("per_source") or {}).items():
                self.tb.scalars({f"test_{source}/{k}": v for k, v in scalar_metrics(part).items()}, self.state.step)
            self.progress.line("test: " + ", ".join(f"{k} {v:.4f}" for k, v in scalar_metrics(metrics).items()
                                                     if k != "count"))
        return metrics

    def _finish(self) -> dict:
        state = self.state
        best = self.checkpoints.index() if self.is_main else {}
        best = D.broadcast_object({"name": best.get("best"), "value": best.get("best_value")})
        perf = {"images_per_s": float(np.mean([h["images_per_s"] for h in state.history if "images_per_s" in h]))
                if state.history else None, "wall_time_s": time.time() - self.started}
        result = {"status": "completed", "exit_code": 0, "step": state.step, "epoch": state.epoch,
                  "run_dir": str(self.run_dir), "final": state.last_val, "test": self.test_metrics, "perf": perf,
                  "best": best, "history": state.history}
        self.records.write_metrics(test=self.test_metrics, perf=perf)
        if self.is_main:
            best_record = self.records.best()
            # runs are ranked by what a paper reports: the best checkpoint's validation and test metrics
            self.tb.hparams({**{k: v for k, v in dataclasses.asdict(self.cfg).items() if k != "deepspeed"},
                             **self.hparams}, {"best_val": best_record.get("val") or state.last_val,
                                               "test": self.test_metrics})
        self.records.status("completed")
        if self.is_main and self.cfg.keep_after_run != "all":  # every rank is past its last checkpoint read
            removed = self.checkpoints.prune_after_run(self.cfg.keep_after_run)
            kept = "the best checkpoint's weights" if self.cfg.keep_after_run == "best" else "no checkpoint"
            self.progress.line(f"trainer.keep_after_run={self.cfg.keep_after_run}: kept {kept}, removed "
                               f"{len(removed)} checkpoint(s)")
        return result

    def _completed_before(self, pruned: str) -> dict:
        """The recorded result of a run that completed and then pruned its checkpoints (trainer.keep_after_run):
        a relaunch (a sweep started again to finish its failed runs) neither retrains it nor changes its results."""
        result = None
        if self.is_main:
            result = self.records.completed_before()
            self.progress.line(f"{self.run_dir}: completed before (checkpoints pruned, trainer.keep_after_run="
                               f"{pruned}); nothing to do")
        return D.broadcast_object(result)
