"""Checkpoint files: atomic writes, pruning to last N + best, and reading back / consolidating."""
import json
import os

import pytest
import torch

from tltrain.engine.checkpoint import CheckpointManager, atomic_write_json, consolidate_checkpoint
from tltrain.engine.config import TrainerConfig
from tltrain.engine.distributed import DistEnv
from tltrain.engine.optim import build_optimizer, default_param_groups
from tltrain.engine.strategies import build_strategy
from tltrain.engine.synthetic import TinyConvNet
from tltrain.errors import DataError


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "status.json"
    atomic_write_json(target, {"state": "running"})
    atomic_write_json(target, {"state": "completed", "value": float("nan")})
    assert json.loads(target.read_text())["state"] == "completed"
    assert os.listdir(tmp_path) == ["status.json"]


def make_strategy():
    cfg = TrainerConfig(precision="fp32", channels_last=False)
    strategy = build_strategy(cfg, DistEnv(), torch.device("cpu"))
    model = strategy.prepare_model(TinyConvNet(5))
    strategy.wrap(model, build_optimizer(default_param_groups(model, cfg), cfg), micro_batch_size=2)
    return strategy


def test_keeps_last_n_plus_best_and_consolidates(tmp_path):
    strategy = make_strategy()
    manager = CheckpointManager(tmp_path, keep_last=2, best_metric="kappa", best_mode="max")
    kappas = [0.2, 0.9, 0.4, 0.5, float("nan")]
    for step, kappa in enumerate(kappas, start=1):
        with torch.no_grad():
            strategy.raw_model.fc.bias.fill_(step)  # makes each checkpoint recognisable
        manager.save(strategy, {"step": step, "epoch": step, "batch_in_epoch": 0}, {"kappa": kappa})
    index = manager.index()
    assert [c["step"] for c in index["checkpoints"]] == [2, 4, 5]  # best (step 2) + last two
    assert index["best"] == "step-00000002" and index["latest"] == "step-00000005"
    assert sorted(p.name for p in manager.dir.iterdir()) == ["index.json", "step-00000002.pt",
                                                             "step-00000004.pt", "step-00000005.pt"]
    assert torch.all(consolidate_checkpoint(tmp_path)["fc.bias"] == 5)
    assert torch.all(consolidate_checkpoint(tmp_path, which="best")["fc.bias"] == 2)
    content = manager.read(manager.latest())
    assert content["trainer"]["step"] == 5 and "optimizer" in content and "scaler" in content


def test_half_written_checkpoint_is_ignored_and_missing_run_is_clear(tmp_path):
    strategy = make_strategy()
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(strategy, {"step": 1, "epoch": 0, "batch_in_epoch": 3})
    (manager.dir / "step-00000002.pt").write_bytes(b"truncated")  # a kill during the next write
    assert manager.latest()["name"] == "step-00000001"
    with pytest.raises(DataError, match="no latest checkpoint"):
        consolidate_checkpoint(tmp_path / "elsewhere")


def test_prune_after_run_keeps_the_best_weights_and_stale_files_go(tmp_path):
    from tltrain.engine.checkpoint import remove_stale_writes

    strategy = make_strategy()
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step, kappa in enumerate([0.3, 0.8, 0.5], start=1):
        with torch.no_grad():
            strategy.raw_model.fc.bias.fill_(step)
        manager.save(strategy, {"step": step, "epoch": step, "batch_in_epoch": 0}, {"kappa": kappa})
    best = consolidate_checkpoint(tmp_path, "best")
    assert manager.prune_after_run("best") == ["step-00000002", "step-00000003"]
    assert sorted(p.name for p in manager.dir.iterdir()) == ["index.json", "step-00000002.weights.pt"]
    kept = manager.read(manager.best())
    assert set(kept) == {"model", "trainer"}  # no optimizer state
    assert all(torch.equal(best[k], v) for k, v in consolidate_checkpoint(tmp_path, "best").items())
    assert manager.prune_after_run("none") == []  # pruned once: a second call changes nothing
    # a weights file written by a prune that was killed before index.json committed is removed on the next claim
    (manager.dir / "step-00000003.weights.pt").write_bytes(b"half")
    assert [p.name for p in remove_stale_writes(tmp_path)] == ["step-00000003.weights.pt"]
    assert (manager.dir / "step-00000002.weights.pt").is_file()
