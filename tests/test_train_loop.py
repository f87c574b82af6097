"""The training loop's parts on their own (one process): the step feed, the meters, the training state, the
checkpoint policy, the loader contract and the strategies' phase and input handling. The whole loop is tested by
test_engine_runs.py and test_reproducible.py (bit-identical resume)."""
from __future__ import annotations

import random
import signal

import numpy as np
import pytest
import torch

from tltrain.contracts import Batch, Loader, Schedule
from tltrain.engine.checkpoint import CheckpointManager
from tltrain.engine.config import TrainerConfig
from tltrain.engine.distributed import DistEnv
from tltrain.engine.feed import StepFeed, StopBeforeStep
from tltrain.engine.meters import SkippedSamples, ThroughputMeter
from tltrain.engine.optim import default_param_groups
from tltrain.engine.signals import StopRequest
from tltrain.engine.state import TrainState
from tltrain.engine.strategies import build_strategy
from tltrain.engine.synthetic import InMemoryLoader, TinyConvNet, make_dataset
from tltrain.engine.trainer import check_best_metric, check_loader
from tltrain.errors import ConfigError
from tltrain.transfer.schedule import build_schedule
from tltrain.transfer.schedule_config import ScheduleConfig


class CountingLoader:
    """Ten numbered batches of 2; samples 3 and 7 are 'skipped' (decode errors) when their batch is read."""

    num_classes, batch_size = 5, 2

    def __init__(self):
        self.decode_errors: list[str] = []
        self.fetched = 0

    def __len__(self):
        return 10

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        for index in range(10):
            self.fetched += 1
            if index in (3, 7):
                self.decode_errors.append(f"shard-{index}.tar:key{index}: cannot decode (test)")
            yield Batch(torch.full((2, 3, 4, 4), float(index)), torch.tensor([index % 5, 0]), [f"k{index}", "x"],
                        torch.ones(2, dtype=torch.bool))


def _feed(loader, batches=10, grad_accum=2, stop=None, after_fetch=lambda: None):
    return StepFeed(loader, batches, grad_accum, stop or StopRequest(signals=()), after_fetch)


def test_feed_groups_micro_batches_by_step_in_loader_order():
    steps = [[int(b.images[0, 0, 0, 0]) for b, _ in step] for step in _feed(CountingLoader()).steps(consumed=0)]
    assert steps == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


def test_feed_after_a_resume_reads_and_drops_the_consumed_batches():
    loader, fetches = CountingLoader(), []
    feed = _feed(loader, after_fetch=lambda: fetches.append(loader.fetched))
    steps = [[int(b.images[0, 0, 0, 0]) for b, _ in step] for step in feed.steps(consumed=6)]
    assert steps == [[6, 7], [8, 9]]
    assert fetches == list(range(1, 11))  # every fetch, dropped ones too, reaches the hook (skipped samples)


def test_feed_uses_only_whole_steps_and_never_starts_a_finished_epoch():
    loader = CountingLoader()
    assert [len(list(step)) for step in _feed(loader, batches=9, grad_accum=3).steps(0)] == [3, 3, 3]
    finished = CountingLoader()
    assert list(_feed(finished).steps(consumed=10)) == [] and finished.fetched == 0


def test_a_stop_signal_during_a_steps_first_wait_stops_before_that_step():
    stop = StopRequest(signals=(signal.SIGUSR2,))
    try:
        loader = CountingLoader()
        steps = _feed(loader, stop=stop).steps(consumed=0)
        first = list(next(steps))
        signal.raise_signal(signal.SIGUSR2)  # arrives between steps: the next step's wait is cut short
        with pytest.raises(StopBeforeStep):
            next(steps)
        assert len(first) == 2 and stop.is_set
    finally:
        stop.close()


def test_a_stop_signal_never_splits_a_steps_micro_batches():
    stop = StopRequest(signals=(signal.SIGUSR2,))
    try:
        step = next(_feed(CountingLoader(), stop=stop).steps(consumed=0))
        next(step)
        signal.raise_signal(signal.SIGUSR2)  # during the step: its second micro-batch still comes
        assert int(next(step)[0].images[0, 0, 0, 0]) == 1
    finally:
        stop.close()


def test_throughput_meter_counts_images_of_every_rank_and_restarts_its_window():
    meter = ThroughputMeter(world_size=4)
    meter.add(8, waited=0.0)
    meter.add(8, waited=0.0)
    assert meter.window_images == meter.epoch_images == 64
    scalars = meter.window_scalars()
    assert scalars["perf/images_per_s"] > 0 and 0 <= scalars["perf/wait_fraction"] <= 1
    assert meter.window_images == 0 and meter.epoch_images == 64
    assert set(meter.epoch_figures()) == {"images_per_s", "wait_fraction"}


def test_skipped_samples_counts_a_sample_once_from_where_it_started():
    loader = CountingLoader()
    loader.decode_errors.append("old.tar:k: cannot decode (before)")
    skipped = SkippedSamples(loader, world_size=1)
    for _ in loader:
        pass
    assert skipped.new() == {"shard-3.tar:key3", "shard-7.tar:key7"} and skipped.new() == set()
    loader.decode_errors.append("shard-3.tar:key3: cannot decode (read again after a resume)")
    assert skipped.gathered() == ["shard-3.tar:key3", "shard-7.tar:key7"]
    assert SkippedSamples(None, 1).gathered() == []  # no validation loader: nothing skipped


def test_train_state_round_trip_restores_position_records_and_rng():
    state = TrainState(epoch=2, step=17, batch_in_epoch=4, phase=1, history=[{"epoch": 0}, {"epoch": 1}],
                       thresholds=np.array([0.5, 1.5]), last_val={"kappa": 0.5}, epoch_loss=[3.0, 4],
                       epoch_skipped=["a.tar:k"], skipped={"train": ["a.tar:k"], "val": [], "test": []})
    saved = state.state_dict(world_size=1, steps_per_epoch=9, config={"lr": 1.0}, run_config="seed: 1\n")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    restored = TrainState()
    restored.load_state_dict(saved, rank=0, world_size=1)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected  # this rank's RNG came back
    for name in ("epoch", "step", "batch_in_epoch", "phase", "history", "last_val", "epoch_loss", "epoch_skipped",
                 "skipped", "pending_epoch_end"):
        assert getattr(restored, name) == getattr(state, name), name
    assert np.array_equal(restored.thresholds, state.thresholds)
    assert saved["steps_per_epoch"] == 9 and saved["world_size"] == 1 and saved["run_config"] == "seed: 1\n"


def test_train_state_on_another_world_size_restarts_the_unfinished_epochs_sums():
    saved = TrainState(step=3, epoch_loss=[2.0, 2], epoch_skipped=["x"]).state_dict(1, 5, {}, None)
    restored = TrainState()
    restored.load_state_dict(saved, rank=1, world_size=2)  # two ranks now: rank 0's RNG, fresh sums
    assert restored.step == 3 and restored.epoch_loss == [0.0, 0] and restored.epoch_skipped == []


def test_finishing_an_epoch_records_it_and_resets_the_running_sums():
    state = TrainState()
    state.add_loss(1.0)
    state.add_loss(3.0)
    assert state.mean_loss == 2.0
    state.finish_epoch({"epoch": 0, "train_loss": state.mean_loss})
    assert state.history == [{"epoch": 0, "train_loss": 2.0}] and state.epoch_loss == [0.0, 0]


def test_checkpoint_policy_saves_every_n_steps_inside_an_epoch_only(tmp_path):
    manager = CheckpointManager(tmp_path / "run", every_steps=3)
    assert [step for step in range(1, 10) if manager.due(step, mid_epoch=True)] == [3, 6, 9]
    assert not manager.due(6, mid_epoch=False)  # the epoch end saves it, with its validation metrics
    assert not CheckpointManager(tmp_path / "other").due(3, mid_epoch=True)
    manager.saved_step = 6
    assert manager.has(6) and not manager.has(7)


def test_loaders_meet_the_contract_and_a_loader_that_does_not_is_named():
    images, labels, keys = make_dataset(8, num_classes=5, size=8)
    loader = InMemoryLoader(images, labels, keys, batch_size=4, num_classes=5, train=True)
    assert isinstance(loader, Loader) and isinstance(CountingLoader(), Loader)
    check_loader(loader, "training")

    class NoEpochs:
        num_classes, batch_size = 5, 4

        def __len__(self):
            return 1

        def __iter__(self):
            return iter(())

    with pytest.raises(ConfigError, match="the training loader \\(NoEpochs\\) lacks set_epoch"):
        check_loader(NoEpochs(), "training")


def test_the_shipped_schedule_meets_the_schedule_contract():
    from tltrain.models import create_model

    schedule = build_schedule(ScheduleConfig(name="layerwise"), create_model("test_resnet", num_classes=5))
    assert isinstance(schedule, Schedule) and schedule.total_epochs >= 2


@pytest.mark.parametrize("classes, metric, ok", [(5, "sensitivity", True), (2, "sensitivity", False),
                                                 (5, "top2_accuracy", True), (2, "top2_accuracy", False),
                                                 (2, "kappa", True)])
def test_best_metric_must_be_one_the_run_reports(classes, metric, ok):
    cfg = TrainerConfig(best_metric=metric)
    if ok:
        check_best_metric(cfg, classes)
    else:
        with pytest.raises(ConfigError, match=f"trainer.best_metric='{metric}'"):
            check_best_metric(cfg, classes)


def test_a_new_phase_keeps_adam_moments_of_parameters_trainable_in_both():
    cfg = TrainerConfig(strategy="single", precision="fp32", channels_last=False, lr=0.1)
    strategy = build_strategy(cfg, DistEnv(), torch.device("cpu"))
    model = strategy.prepare_model(TinyConvNet(5))
    strategy.enter_phase(default_param_groups(model, cfg), micro_batch_size=4)
    model(torch.rand(4, 3, 8, 8)).sum().backward()
    strategy.step(boundary=True)
    moments = {id(p): strategy.optimizer.state[p]["exp_avg"].clone() for p in model.fc.parameters()}
    strategy.enter_phase([{"params": list(model.fc.parameters()), "lr": 0.01}], micro_batch_size=4)
    assert all(torch.equal(strategy.optimizer.state[p]["exp_avg"], moments[id(p)]) for p in model.fc.parameters())
    assert strategy.param_groups[0]["lr"] == 0.01


def test_low_precision_batches_reach_an_fp32_model_as_fp32():
    cfg = TrainerConfig(strategy="single", precision="fp32", channels_last=False)
    strategy = build_strategy(cfg, DistEnv(), torch.device("cpu"))
    model = strategy.prepare_model(TinyConvNet(5))
    strategy.enter_phase(default_param_groups(model, cfg), micro_batch_size=2)
    images = strategy.prepare_inputs(torch.rand(2, 3, 8, 8, dtype=torch.bfloat16))  # loader.dtype=bf16
    assert images.dtype == torch.float32 and strategy.forward(images).shape == (2, 5)
