"""Engine pieces in one process: config validation, distributed env, LR curves, losses, thresholds, strategy step."""
import numpy as np
import pytest
import torch
from sklearn.metrics import cohen_kappa_score

from tltrain.engine.config import TrainerConfig
from tltrain.engine.distributed import DistEnv, first_host, read_env
from tltrain.engine.losses import apply_thresholds, build_loss, outputs_to_probs, tune_thresholds
from tltrain.engine.optim import build_optimizer, default_param_groups, lr_factor
from tltrain.engine.strategies import build_strategy
from tltrain.engine.synthetic import TinyConvNet
from tltrain.errors import ConfigError


def test_config_errors_name_key_and_choices():
    with pytest.raises(ConfigError, match=r"trainer.strategy='fsdp'.*ddp, deepspeed, single"):
        TrainerConfig(strategy="fsdp").validate()
    with pytest.raises(ConfigError, match="trainer.grad_accum"):
        TrainerConfig(grad_accum=0).validate()
    with pytest.raises(ConfigError, match="zero_stage"):
        cfg = TrainerConfig(strategy="deepspeed")
        cfg.deepspeed.zero_stage = 4
        cfg.validate()
    TrainerConfig().validate()


def test_env_from_torchrun_then_slurm():
    env = read_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert env == DistEnv(3, 8, 1, "n1", 1234)
    slurm = read_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "77",
                      "SLURM_JOB_NODELIST": "gpu[03-05,07],cpu1"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_addr) == (5, 8, 1, "gpu03")
    assert slurm.master_port == 20077
    assert read_env({}) == DistEnv()
    assert first_host("node1,node2") == "node1" and first_host("a-b[1-2]") == "a-b1"


def test_cosine_curve_warms_up_peaks_and_decays_to_floor():
    cfg = TrainerConfig(lr_schedule="cosine", min_lr_ratio=0.01)
    curve = [lr_factor(cfg, s, 100, 10) for s in range(100)]
    assert curve[0] == pytest.approx(1 / 11) and curve[9] < curve[10] == pytest.approx(1.0)
    assert curve[-1] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(curve[10:], curve[11:]))


def test_onecycle_curve_starts_low_peaks_at_warmup_and_ends_at_floor():
    cfg = TrainerConfig(lr_schedule="onecycle", min_lr_ratio=0.001)
    curve = [lr_factor(cfg, s, 100, 30) for s in range(100)]
    assert curve[0] == pytest.approx(1 / 25) and max(curve) == pytest.approx(1.0) == curve[30]
    assert curve[-1] == pytest.approx(0.001)


def test_masked_loss_ignores_padding_and_matches_torch():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 5), torch.randint(0, 5, (6,))
    cfg = TrainerConfig(label_smoothing=0.1, class_weights=[1, 2, 3, 4, 5])
    loss = build_loss(cfg, 5)
    valid = torch.tensor([True, True, True, True, False, False])
    expected = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2, 3, 4, 5]), label_smoothing=0.0)
    plain = build_loss(TrainerConfig(class_weights=[1, 2, 3, 4, 5]), 5)
    assert plain(logits, labels, valid).item() == pytest.approx(expected(logits[:4], labels[:4]).item(), rel=1e-6)
    assert torch.isfinite(loss(logits, labels, valid))
    ordinal = build_loss(TrainerConfig(loss="ordinal"), 5)
    values = torch.randn(6, 1)
    assert ordinal(values, labels, valid).item() == pytest.approx(
        torch.nn.functional.smooth_l1_loss(values[:4, 0], labels[:4].float()).item(), rel=1e-6)
    with pytest.raises(ConfigError, match="class_weights"):
        build_loss(TrainerConfig(class_weights=[1.0, 2.0]), 5)


def test_thresholds_tuned_for_kappa_beat_default_cuts():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 400)
    values = 0.6 * labels + 0.8 + rng.normal(0, 0.3, 400)  # a biased, compressed regressor
    default = cohen_kappa_score(labels, apply_thresholds(values, np.array([0.5, 1.5, 2.5, 3.5])), weights="quadratic")
    cuts = tune_thresholds(values, labels, 5)
    tuned = cohen_kappa_score(labels, apply_thresholds(values, cuts), weights="quadratic")
    assert tuned > default + 0.05 and np.all(np.diff(cuts) >= 0)
    probs = outputs_to_probs(torch.from_numpy(values).float(), "ordinal", 5, cuts).numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs.argmax(1) == apply_thresholds(values, cuts)).mean() > 0.99  # argmax agrees with the cuts


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_single_strategy_accumulation_and_clipping_step(precision):
    torch.manual_seed(0)
    cfg = TrainerConfig(precision=precision, grad_accum=2, clip_grad_norm=0.01, channels_last=True)
    strategy = build_strategy(cfg, DistEnv(), torch.device("cpu"))
    model = strategy.prepare_model(TinyConvNet(5))
    before = [p.detach().clone() for p in model.parameters()]
    strategy.wrap(model, build_optimizer(default_param_groups(model, cfg), cfg), micro_batch_size=4)
    loss_fn = build_loss(cfg, 5)
    for micro in range(2):
        images, labels = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
        with strategy.micro_batch(boundary=micro == 1):
            strategy.backward(loss_fn(strategy.forward(strategy.prepare_inputs(images)), labels))
        norm = strategy.step(boundary=micro == 1)
        if micro == 0:
            assert norm is None and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert norm is not None and norm > 0.01  # clipped: the pre-clip norm is reported
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())  # zeroed after the step


def test_stop_signal_interrupts_only_a_marked_wait_and_restores_handlers():
    """interrupting(): a stop signal raises StopWhileWaiting out of the wait (at once if one came already);
    elsewhere it only sets the flag; close() puts the previous handlers back."""
    import os
    import signal
    import time

    from tltrain.engine.signals import StopRequest, StopWhileWaiting

    before = signal.getsignal(signal.SIGUSR2)
    stop = StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGUSR2)  # outside a wait: a flag, no exception
        time.sleep(0.05)
        assert stop.is_set and stop.requested == signal.SIGUSR2
        with pytest.raises(StopWhileWaiting):  # flag already set: no wait at all
            with stop.interrupting():
                raise AssertionError("the block must not run")
        stop.requested = None
        started = time.monotonic()
        with pytest.raises(StopWhileWaiting):
            with stop.interrupting():
                os.kill(os.getpid(), signal.SIGUSR2)
                time.sleep(30)  # a long data wait
        assert time.monotonic() - started < 5 and stop.is_set
        os.kill(os.getpid(), signal.SIGUSR2)  # after the wait: a flag again
        time.sleep(0.05)
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGUSR2) == before


def test_determinism_switches_follow_the_config_both_ways():
    """An in-process sweep over trainer.deterministic=true,false: the second run must not stay deterministic."""
    from tltrain.engine.reproducibility import configure_determinism

    try:
        configure_determinism(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        configure_determinism(False)
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    finally:
        configure_determinism(False)
