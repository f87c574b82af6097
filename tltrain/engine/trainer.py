"""The training loop: one loop for single/DDP/DeepSpeed, transfer phases, checkpoints, preemption, metrics.

Entry point: `train(cfg, model, train_loader, val_loader, run_dir, schedule=None) -> result dict`.

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
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tltrain.engine import distributed as D
from tltrain.engine.checkpoint import CheckpointManager
from tltrain.engine.config import BEST_METRICS, TrainerConfig
from tltrain.engine.logging import Progress, TensorBoardLogger, scalar_metrics, write_metrics, write_status
from tltrain.engine.losses import build_loss, outputs_to_probs, tune_thresholds
from tltrain.engine.optim import (build_ema, build_optimizer, carry_optimizer_state, default_param_groups,
                                  lr_factor, set_lr)
from tltrain.engine.reproducibility import configure_determinism, rng_state, seed_everything, set_rng_state
from tltrain.engine.rundir import claim_run_dir
from tltrain.engine.signals import NONFINITE_EXIT_CODE, PREEMPTED_EXIT_CODE, StopRequest, StopWhileWaiting
from tltrain.engine.strategies import build_strategy
from tltrain.errors import ConfigError, DataError, TltrainError, os_error
from tltrain.metrics import PredictionGatherer, compute_metrics, referable_threshold_for
from tltrain.safe_io import atomic_write_text, csv_cell, load_json


#: Validation metrics that exist only where the referable-DR threshold applies (metrics.referable_threshold_for).
REFERABLE_METRICS = ("sensitivity", "specificity", "referable_auc")


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


def train(cfg: TrainerConfig, model: nn.Module, train_loader, val_loader, run_dir: str | Path, schedule=None, *,
          device: str = "auto", num_classes: int | None = None, batch_size: int | None = None,
          config_to_save=None, hparams: dict | None = None, test_loader=None) -> dict:
    """Train (or resume) a run in run_dir; returns {"status", "exit_code", "step", "epoch", "final", "best", ...}.

    status/exit_code: completed/0, preempted/75 (checkpoint written: requeue and call again to resume).
    A NaN/inf loss raises NonFiniteLoss (status.json says failed; the last good checkpoint is kept).
    With a test_loader, the best checkpoint (by cfg.best_metric on validation) is evaluated on it at the end.
    """
    trainer = Trainer(cfg, model, train_loader, val_loader, run_dir, schedule, device=device,
                      num_classes=num_classes, batch_size=batch_size, config_to_save=config_to_save, hparams=hparams,
                      test_loader=test_loader)
    return trainer.fit()


class Trainer:
    def __init__(self, cfg: TrainerConfig, model: nn.Module, train_loader, val_loader, run_dir, schedule=None, *,
                 device: str = "auto", num_classes: int | None = None, batch_size: int | None = None,
                 config_to_save=None, hparams: dict | None = None, test_loader=None):
        cfg.validate()
        self.cfg, self.train_loader, self.val_loader = cfg, train_loader, val_loader
        self.test_loader = test_loader
        self.test_metrics: dict = {}
        self.started = time.time()
        self.run_dir = Path(run_dir)
        self.schedule = schedule or _WholeModelSchedule(cfg)
        self.env = D.read_env()
        self.device = D.device_for(self.env, device)
        if cfg.strategy == "single" and self.env.world_size > 1:
            raise ConfigError(f"trainer.strategy=single but WORLD_SIZE={self.env.world_size}; use ddp or deepspeed")
        configure_determinism(cfg.deterministic)
        D.init_process_group(self.env, self.device)
        self.is_main = self.env.is_main
        seed_everything(cfg.seed + self.env.rank)
        self.num_classes = num_classes or getattr(train_loader, "num_classes", None)
        if not self.num_classes:
            raise ConfigError("num_classes unknown: pass num_classes= or give the loader a num_classes attribute")
        referable = referable_threshold_for(self.num_classes, cfg.referable_threshold)
        if referable is not None and not 1 <= referable < self.num_classes:
            raise ConfigError(f"trainer.referable_threshold={referable} must be a grade in [1, "
                              f"{self.num_classes - 1}] for a {self.num_classes}-class run")
        if cfg.best_metric in REFERABLE_METRICS and referable is None:
            raise ConfigError(f"trainer.best_metric={cfg.best_metric!r} is a referable-DR metric, which a "
                              f"{self.num_classes}-class run does not compute (5 grades, or set "
                              "trainer.referable_threshold); choose one of "
                              f"{', '.join(m for m in BEST_METRICS if m not in REFERABLE_METRICS)}")
        if cfg.best_metric == "top2_accuracy" and self.num_classes <= 2:
            raise ConfigError(f"trainer.best_metric='top2_accuracy' means nothing for a {self.num_classes}-class run "
                              "(the top two classes are all of them); choose kappa, accuracy, auc or cross_entropy")
        self.batch_size = batch_size or getattr(train_loader, "batch_size", None) or len(next(iter(train_loader)).labels)
        self.steps_per_epoch = len(train_loader) // cfg.grad_accum
        if self.steps_per_epoch < 1:
            raise ConfigError(f"trainer.grad_accum={cfg.grad_accum} exceeds the {len(train_loader)} batches per epoch")
        self.total_epochs = self.schedule.total_epochs
        self.phase_starts = self._phase_starts()

        self.strategy = build_strategy(cfg, self.env, self.device)
        self.raw_model = self.strategy.prepare_model(model)
        self.loss_fn = build_loss(cfg, self.num_classes).to(self.device)
        self.ema = build_ema(self.raw_model, cfg.ema_decay)
        self.checkpoints = CheckpointManager(self.run_dir, cfg.keep_last, cfg.best_metric, cfg.best_mode, self.is_main)
        self.tb = TensorBoardLogger(self.run_dir / "tb", enabled=self.is_main)
        self.progress = Progress(enabled=self.is_main, bar=cfg.progress)
        self.config_to_save, self.hparams = config_to_save, hparams or {}

        self.phase = -1
        self.epoch = 0  # the epoch being (or next to be) trained
        self.step = 0  # optimizer steps done
        self.batch_in_epoch = 0  # batches of `epoch` already consumed
        self.history: list[dict] = []
        self.thresholds: np.ndarray | None = None  # ordinal cut points tuned on validation
        self.last_val: dict = {}
        self.last_predictions: tuple = ([], np.zeros(0, np.int64), np.zeros((0, 0)))
        self._grid_logged = False
        # The unfinished epoch's running train loss [sum, count] and skipped samples, checkpointed with it.
        self.epoch_loss: list = [0.0, 0]
        self.epoch_skipped: list[str] = []
        self.skipped = {"train": [], "val": [], "test": []}  # distinct skipped samples (all ranks)
        self._stop: StopRequest | None = None
        # An epoch whose training finished but whose validation a preemption interrupted: {"epoch", "train"}.
        self._pending_epoch_end: dict | None = None
        self._saved_step: int | None = None  # optimizer step of the latest checkpoint written or resumed from

    # -- set-up helpers -------------------------------------------------------------------------------------
    def _phase_starts(self) -> list[int]:
        starts, last = [], None
        for epoch in range(self.total_epochs):
            index = self.schedule.phase_index(epoch)
            if index != last:
                starts.append(epoch)
                last = index
        return starts + [self.total_epochs]

    def _enter_phase(self, phase: int) -> None:
        """Apply the phase's trainable groups and LRs, rebuild the optimizer (carrying state), re-wrap."""
        old_optimizer = self.strategy.optimizer if self.strategy.name != "deepspeed" else None
        module = self.strategy.unwrap() if self.strategy.model is not None else self.raw_model
        groups = self.schedule.apply(module, phase)
        optimizer = build_optimizer(groups, self.cfg)
        carry_optimizer_state(old_optimizer, optimizer)
        self.strategy.wrap(module, optimizer, self.batch_size)
        self.phase = phase
        if self.is_main:
            self.progress.line(f"phase {phase}: {self.schedule.describe(phase)}")

    def _lr_factor(self) -> float:
        start = self.phase_starts[self.phase] * self.steps_per_epoch
        end = self.phase_starts[self.phase + 1] * self.steps_per_epoch
        warmup = int(round(self.cfg.warmup_epochs * self.steps_per_epoch))
        return lr_factor(self.cfg, self.step - start, end - start, warmup)

    # -- state ----------------------------------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        """What resuming needs besides the weights; per-rank parts (RNG, unfinished epoch) gathered from all ranks.
        Tensors, numbers, strings, lists and dicts only (weights_only-loadable)."""
        local = {"rng": rng_state(), "epoch_loss": list(self.epoch_loss), "epoch_skipped": list(self.epoch_skipped)}
        ranks = [local]
        if D.is_distributed():
            ranks = [None] * self.env.world_size
            torch.distributed.all_gather_object(ranks, local)
        return {"epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch, "phase": self.phase,
                "steps_per_epoch": self.steps_per_epoch, "world_size": self.env.world_size,
                "rng": [r["rng"] for r in ranks], "epoch_loss": [r["epoch_loss"] for r in ranks],
                "epoch_skipped": [r["epoch_skipped"] for r in ranks], "skipped": self.skipped,
                "history": self.history, "thresholds": self.thresholds, "last_val": self.last_val,
                "pending_epoch_end": self._pending_epoch_end,
                "config": dataclasses.asdict(self.cfg), "run_config": self._config_yaml()}

    def _config_yaml(self) -> str | None:
        if self.config_to_save is None:
            return None
        from omegaconf import OmegaConf

        node = self.config_to_save
        node = OmegaConf.structured(node) if dataclasses.is_dataclass(node) else node
        return OmegaConf.to_yaml(node, resolve=True)

    def _save(self, metrics: dict | None = None) -> str:
        extra = {"ema": self.ema.state_dict()} if self.ema is not None else {}
        name = self.checkpoints.save(self.strategy, self._trainer_state(), metrics, extra)
        self._saved_step = self.step
        return name

    def _preempt_before_step(self) -> None:
        """A stop signal came while a rank waited for data: checkpoint the state after the last optimizer step
        (unless the latest checkpoint already is that state) and stop."""
        if self._saved_step != self.step:
            self._save()
        raise _Preempted()

    def _resume(self) -> bool:
        entry = self.checkpoints.latest()
        if entry is None:
            return False
        content = self.checkpoints.read(entry)
        state = content["trainer"]
        self._enter_phase(state["phase"])
        if self.strategy.saves_with_engine:
            self.strategy.load(self.checkpoints.dir, entry["name"])
        else:
            self.strategy.load_state_dict(content)
        if self.ema is not None and content.get("ema"):
            self.ema.load_state_dict(content["ema"])
        self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        self.history, self.thresholds, self.last_val = state["history"], state["thresholds"], state["last_val"]
        self._pending_epoch_end = state.get("pending_epoch_end")
        same_world = len(state["rng"]) == self.env.world_size
        mine = self.env.rank if same_world else 0
        set_rng_state(state["rng"][mine])
        if same_world and "epoch_loss" in state:
            self.epoch_loss = list(state["epoch_loss"][mine])
            self.epoch_skipped = list(state["epoch_skipped"][mine])
        self.skipped = state.get("skipped", self.skipped)
        if state["steps_per_epoch"] != self.steps_per_epoch and self.is_main:
            self.progress.line(f"warning: steps per epoch changed from {state['steps_per_epoch']} to "
                               f"{self.steps_per_epoch} (different world size or batch size); the LR curve shifts")
        if self.is_main:
            self.progress.line(f"resumed from {entry['name']} (epoch {self.epoch}, step {self.step})")
        self._saved_step = self.step
        return True

    # -- the run --------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        # rank 0 holds the run_dir for the run's life (a no-op when train_app.run already holds it)
        with claim_run_dir(self.run_dir) if self.is_main else contextlib.nullcontext():
            return self._fit()

    def _fit(self) -> dict:
        stop = self._stop = StopRequest()  # also adopts a stop signal that arrived while the run was starting up
        try:
            pruned = D.broadcast_object(self.checkpoints.index().get("after_run") if self.is_main else None)
            if pruned:  # completed before, checkpoints pruned: nothing to resume from, and nothing left to do
                return self._completed_before(pruned)
            if self.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                if self._config_yaml() is not None:  # a new file renamed into place: a link there is replaced
                    atomic_write_text(self.run_dir / "config.yaml", self._config_yaml())
            D.barrier()
            resumed = self._resume()
            self._status("running", resumed=resumed)
            if D.any_rank([stop.is_set], self.device)[0]:  # stopped during start-up: nothing new to save
                raise _Preempted()
            if self._pending_epoch_end is not None:  # preempted during that epoch's validation: redo it
                self._validate_and_record(self._pending_epoch_end["epoch"], self._pending_epoch_end["train"])
            while self.epoch < self.total_epochs:
                phase = self.schedule.phase_index(self.epoch)
                if phase != self.phase:
                    self._enter_phase(phase)
                self._train_epoch(stop)
                self._end_epoch()
            if self.test_loader is not None:
                seen = self._errors_seen(self.test_loader)
                self.test_metrics = self._evaluate_best(self.test_loader)
                self.skipped["test"] = self._gather_skipped(self.test_loader, seen)
            result = self._finish()
            self.strategy.close()
            return result
        except _Preempted:
            self.strategy.close()
            self._status("preempted", signal=stop.requested)
            return {"status": "preempted", "exit_code": PREEMPTED_EXIT_CODE, "step": self.step, "epoch": self.epoch,
                    "run_dir": str(self.run_dir)}
        except BaseException as exc:
            self._status("failed", error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            stop.close()
            self.progress.end()
            self.tb.close()

    def _train_epoch(self, stop: StopRequest) -> None:
        cfg = self.cfg
        used_batches = self.steps_per_epoch * cfg.grad_accum
        skip = self.batch_in_epoch
        self.train_loader.set_epoch(self.epoch)
        self.strategy.train(True)
        self.schedule.set_train_mode(self.strategy.unwrap(), self.phase)
        self.progress.start(used_batches, f"epoch {self.epoch + 1}/{self.total_epochs}", initial=skip)
        window_start, window_wait, window_images = time.perf_counter(), 0.0, 0
        epoch_start, epoch_wait, epoch_images = window_start, 0.0, 0
        errors_seen = self._errors_seen(self.train_loader)
        # a checkpoint on the epoch's last batch (preemption) leaves nothing to read: do not start the loader
        left = skip < used_batches
        iterator = iter(self.train_loader) if left else iter(())
        for batch_index in range(used_batches if left else 0):
            fetch_start = time.perf_counter()
            # the first micro-batch of an optimizer step may be abandoned for a stop signal: the state after the
            # previous step is complete, and a resumed run reads this batch again
            step_start = batch_index >= skip and batch_index % cfg.grad_accum == 0
            batch = None  # stays None when a stop signal ended the wait
            try:
                with stop.interrupting() if step_start else contextlib.nullcontext():
                    batch = next(iterator)
            except StopWhileWaiting:
                pass
            if step_start and D.any_rank_on_cpu([batch is None])[0]:  # every rank stops before this step's forward
                self._preempt_before_step()
            waited = time.perf_counter() - fetch_start
            errors_seen = self._note_skipped(errors_seen)
            if batch_index < skip:  # consumed before the checkpoint we resumed from
                continue
            boundary = (batch_index + 1) % cfg.grad_accum == 0
            images = self.strategy.prepare_inputs(batch.images)
            labels = batch.labels.to(self.device, non_blocking=True)
            valid = batch.valid.to(self.device, non_blocking=True) if batch.valid is not None else None
            if not self._grid_logged and self.is_main:
                self.tb.image_grid(batch.images, self.step, cfg.image_grid)
                self._grid_logged = True
            with self.strategy.micro_batch(boundary):
                outputs = self.strategy.forward(images)
                loss = self.loss_fn(outputs, labels, valid)
                loss_value = loss.item()
                nonfinite, stop_now = D.any_rank([not math.isfinite(loss_value), stop.is_set], self.device)
                if nonfinite:
                    self._nonfinite(loss_value, batch)
                if boundary:
                    set_lr(self.strategy.param_groups, self._lr_factor())
                self.strategy.backward(loss)
            self.strategy.step(boundary)
            self.batch_in_epoch = batch_index + 1
            self.epoch_loss = [self.epoch_loss[0] + loss_value, self.epoch_loss[1] + 1]
            images_here = len(batch.labels) * self.env.world_size
            window_wait, window_images = window_wait + waited, window_images + images_here
            epoch_wait, epoch_images = epoch_wait + waited, epoch_images + images_here
            elapsed = time.perf_counter() - window_start
            self.progress.update(loss_value, window_images / max(elapsed, 1e-9), self.strategy.param_groups[0]["lr"])
            if not boundary:
                continue
            self.step += 1
            if self.ema is not None:
                self.ema.update(self.raw_model, step=self.step)
            if self.step % cfg.log_every_steps == 0:
                self.tb.scalars({"train/loss": self.epoch_loss[0] / self.epoch_loss[1],
                                 "perf/images_per_s": window_images / elapsed,
                                 "perf/wait_fraction": window_wait / elapsed}, self.step)
                self.tb.learning_rates(self.strategy.param_groups, self.step)
                self.tb.gpu_memory(self.device, self.step)
                window_start, window_wait, window_images = time.perf_counter(), 0.0, 0
            if stop_now:
                self._save()
                raise _Preempted()
            if cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0 \
                    and self.batch_in_epoch < used_batches:
                self._save()
        self.progress.end()
        self._note_skipped(errors_seen)
        elapsed = max(time.perf_counter() - epoch_start, 1e-9)
        epoch_skipped = self._gather_union(self.epoch_skipped)
        self.skipped["train"] = sorted(set(self.skipped["train"]) | set(epoch_skipped))
        self._epoch_train = {"train_loss": self.epoch_loss[0] / max(self.epoch_loss[1], 1),
                             "images_per_s": epoch_images / elapsed, "wait_fraction": epoch_wait / elapsed,
                             "lr": self.strategy.param_groups[0]["lr"], "skipped_samples": len(epoch_skipped)}

    # -- samples the loaders skipped (undecodable, loader.on_decode_error=skip) ------------------------------
    @staticmethod
    def _errors_seen(loader) -> int:
        return len(getattr(loader, "decode_errors", None) or [])

    @staticmethod
    def _sample_ids(messages: list[str]) -> set[str]:
        """'shard.tar:key: cannot decode (...)' -> 'shard.tar:key' (the same sample met twice counts once)."""
        return {message.split(": ", 1)[0] for message in messages}

    def _note_skipped(self, seen: int) -> int:
        """Adds the training loader's newly skipped samples to the epoch's (a set: a resume re-reads batches)."""
        errors = getattr(self.train_loader, "decode_errors", None) or []
        if len(errors) > seen:
            self.epoch_skipped = sorted(set(self.epoch_skipped) | self._sample_ids(errors[seen:]))
        return len(errors)

    def _gather_union(self, items: list[str]) -> list[str]:
        if not D.is_distributed():
            return sorted(set(items))
        lists = [None] * self.env.world_size
        torch.distributed.all_gather_object(lists, list(items))
        return sorted({item for part in lists for item in part})

    def _gather_skipped(self, loader, seen: int) -> list[str]:
        errors = getattr(loader, "decode_errors", None) or []
        return self._gather_union(sorted(self._sample_ids(errors[seen:])))

    def _skipped_summary(self) -> dict:
        examples = [m for part in self.skipped.values() for m in part][:20]
        return {**{split: len(messages) for split, messages in self.skipped.items()}, "examples": examples}

    def _nonfinite(self, loss_value: float, batch) -> None:
        keys = list(batch.keys)[:16]
        last = self.checkpoints.latest() if self.is_main else None
        kept = f"; last good checkpoint: {last['name']}" if last else "; no checkpoint was written yet"
        raise NonFiniteLoss(f"loss is {loss_value} at optimizer step {self.step + 1} (epoch {self.epoch}, batch "
                            f"{self.batch_in_epoch}) on rank {self.env.rank}; batch keys: {', '.join(map(str, keys))}"
                            f"{kept}")

    def _end_epoch(self) -> None:
        finished_epoch = self.epoch
        self.epoch += 1
        self.batch_in_epoch = 0
        self._validate_and_record(finished_epoch, self._epoch_train)

    def _validate_and_record(self, finished_epoch: int, epoch_train: dict) -> None:
        """Validation, history, TensorBoard and the epoch-end checkpoint. A preemption signal during validation
        checkpoints at once (the epoch's training is kept) and the resumed run validates that epoch again."""
        self._epoch_train = epoch_train
        validate = (self.epoch % self.cfg.eval_every == 0) or self.epoch == self.total_epochs
        seen = self._errors_seen(self.val_loader)
        try:
            val = self.evaluate(self.val_loader) if (validate and self.val_loader is not None) else {}
        except _Preempted:
            self._pending_epoch_end = {"epoch": finished_epoch, "train": epoch_train}
            self._save()
            raise
        self._pending_epoch_end = None
        if val:
            self.last_val = val
            self.skipped["val"] = self._gather_skipped(self.val_loader, seen)
        record = {"epoch": finished_epoch, "step": self.step, "phase": self.phase, **self._epoch_train, "val": val}
        self.history.append(record)
        self.epoch_loss, self.epoch_skipped = [0.0, 0], []
        self.tb.scalars(scalar_metrics(self._epoch_train), self.step, prefix="epoch/")
        if val:
            self.tb.scalars(scalar_metrics(val), self.step, prefix="val/")
            self.tb.confusion(val["confusion"], self.step)
        self.tb.flush()
        self._save(val or None)
        summary = ", ".join(f"{k} {val[k]:.4f}" for k in ("accuracy", "kappa", "cross_entropy") if k in val)
        self.progress.line(f"epoch {finished_epoch + 1}/{self.total_epochs} step {self.step}: loss "
                           f"{self._epoch_train['train_loss']:.4f}, {self._epoch_train['images_per_s']:.0f} img/s, "
                           f"data wait {self._epoch_train['wait_fraction']:.0%}" + (f" | val {summary}" if summary else ""))
        if self.is_main:
            write_metrics(self.run_dir, self.last_val, self.history, best=self._best_record(),
                          skipped=self._skipped_summary())
        self._status("running")

    @torch.no_grad()
    def evaluate(self, loader, tune: bool = True) -> dict:
        """Metrics over the whole loader, gathered from every rank (padding dropped); EMA weights when enabled.

        Ordinal runs tune their thresholds on validation (tune=True); the test split reuses the tuned ones.
        The per-image predictions stay in self.last_predictions (keys, labels, probabilities)."""
        model = self.ema.module if self.ema is not None else self.strategy.model
        was_training = model.training
        model.eval()
        gatherer = PredictionGatherer()
        for batch in loader:
            if self._stop is not None and D.any_rank([self._stop.is_set], self.device)[0]:
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
                self.thresholds = tune_thresholds(values, labels, self.num_classes)
            scores = outputs_to_probs(torch.from_numpy(values), "ordinal", self.num_classes, self.thresholds).numpy()
        self.last_predictions = (keys, labels, scores)
        metrics = compute_metrics(scores, labels, self.cfg.referable_threshold)
        if self.thresholds is not None:
            metrics["thresholds"] = [float(t) for t in self.thresholds]
        return metrics

    def _evaluate_best(self, loader) -> dict:
        """Test metrics of the best checkpoint by validation (the weights a paper would report), on every rank.

        metrics["checkpoint"] names the checkpoint whose weights were tested. DeepSpeed keeps its final weights
        (ZeRO partitions are not reloaded here), which are the latest checkpoint's; an export of the best
        checkpoint then says it has no test metrics of its own. Per-image predictions: predictions_test.csv."""
        index = D.broadcast_object(self.checkpoints.index() if self.is_main else None)
        tested = index.get("latest")
        if index.get("best") and self.cfg.strategy != "deepspeed":
            from tltrain.engine.checkpoint import consolidate_checkpoint

            state = consolidate_checkpoint(self.run_dir, "best")  # the evaluated weights (EMA when enabled)
            target = self.ema.module if self.ema is not None else self.strategy.unwrap()
            target.load_state_dict(state)
            tested = index["best"]
        if self.thresholds is not None and index.get("best"):  # ordinal: the cut points tuned with those weights
            best_val = self._history_val(next(c["step"] for c in index["checkpoints"] if c["name"] == tested))
            if best_val.get("thresholds"):
                self.thresholds = np.asarray(best_val["thresholds"])
        metrics = self.evaluate(loader, tune=False)
        metrics["checkpoint"] = tested or "final"
        if self.is_main:
            from tltrain.metrics import write_predictions_csv

            keys, labels, scores = self.last_predictions  # keys come from the shards: no spreadsheet formulas
            write_predictions_csv(self.run_dir / "predictions_test.csv", [csv_cell(k) for k in keys], labels, scores)
            self.tb.scalars({f"test/{k}": v for k, v in scalar_metrics(metrics).items()}, self.step)
            self.progress.line("test: " + ", ".join(f"{k} {v:.4f}" for k, v in scalar_metrics(metrics).items()
                                                     if k != "count"))
        return metrics

    def _history_val(self, step: int) -> dict:
        """The validation metrics recorded at an optimizer step (an epoch end), or {}."""
        return next((h["val"] for h in reversed(self.history) if h["step"] == step and h.get("val")), {})

    def _best_record(self) -> dict:
        """Which checkpoint is the best so far, chosen how, and its validation metrics (main rank only)."""
        index = self.checkpoints.index()
        entry = next((c for c in index["checkpoints"] if c["name"] == index.get("best")), None)
        if entry is None:
            return {}
        return {"checkpoint": entry["name"], "metric": self.cfg.best_metric, "mode": self.cfg.best_mode,
                "value": index.get("best_value"), "step": entry["step"], "epoch": entry["epoch"],
                "chosen_by": f"{'highest' if self.cfg.best_mode == 'max' else 'lowest'} validation "
                             f"{self.cfg.best_metric}, evaluated at every validated epoch end",
                "val": self._history_val(entry["step"])}

    def _finish(self) -> dict:
        best = self.checkpoints.index() if self.is_main else {}
        best = D.broadcast_object({"name": best.get("best"), "value": best.get("best_value")})
        perf = {"images_per_s": float(np.mean([h["images_per_s"] for h in self.history if "images_per_s" in h]))
                if self.history else None, "wall_time_s": time.time() - self.started}
        result = {"status": "completed", "exit_code": 0, "step": self.step, "epoch": self.epoch,
                  "run_dir": str(self.run_dir), "final": self.last_val, "test": self.test_metrics, "perf": perf,
                  "best": best, "history": self.history}
        if self.is_main:
            best_record = self._best_record()
            write_metrics(self.run_dir, self.last_val, self.history, test=self.test_metrics, perf=perf,
                          best=best_record, skipped=self._skipped_summary())
            # runs are ranked by what a paper reports: the best checkpoint's validation and test metrics
            self.tb.hparams({**{k: v for k, v in dataclasses.asdict(self.cfg).items() if k != "deepspeed"},
                             **self.hparams}, {"best_val": best_record.get("val") or self.last_val,
                                               "test": self.test_metrics})
        self._status("completed")
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
            metrics, status = (self._recorded(name) for name in ("metrics.json", "status.json"))
            index = self.checkpoints.index()
            result = {"status": "completed", "exit_code": 0, "step": status.get("step"),
                      "epoch": status.get("epoch"), "run_dir": str(self.run_dir), "final": metrics.get("final", {}),
                      "test": metrics.get("test") or None, "perf": metrics.get("perf", {}),
                      "best": {"name": index.get("best"), "value": index.get("best_value")},
                      "history": metrics.get("history", []), "completed_before": True}
            self.progress.line(f"{self.run_dir}: completed before (checkpoints pruned, trainer.keep_after_run="
                               f"{pruned}); nothing to do")
        return D.broadcast_object(result)

    def _recorded(self, name: str) -> dict:
        """A JSON object the completed run left in its folder (bounded: a regular file of limited size)."""
        path = self.run_dir / name
        try:
            value = load_json(path, what=f"the completed run's {name}")
        except OSError as exc:
            raise os_error(exc, f"reading the completed run's {name}") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}: expected a JSON object, found {type(value).__name__}")
        return value

    def _status(self, state: str, **extra) -> None:
        if not self.is_main:
            return
        last = {k: v for k, v in self.last_val.items() if k != "confusion"}
        write_status(self.run_dir, state, step=self.step, epoch=self.epoch, total_epochs=self.total_epochs,
                     steps_per_epoch=self.steps_per_epoch, strategy=self.cfg.strategy,
                     world_size=self.env.world_size, metrics=last, **extra)
