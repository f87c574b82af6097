"""Shared fixtures: one small synthetic dataset and its shards per test session (real files, real prepare)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def fundus_raw(tmp_path_factory) -> Path:
    from tltrain.data.synth import generate_eyepacs

    root = tmp_path_factory.mktemp("fundus_raw")
    generate_eyepacs(root, n_patients=40, width=160, seed=3, min_per_class=6, workers=2, progress=False)
    return root


@pytest.fixture(scope="session")
def fundus_shards(fundus_raw, tmp_path_factory) -> Path:
    from tltrain.data.prepare import PrepareConfig, run_prepare
    from tltrain.data.sources import SourceConfig

    out = tmp_path_factory.mktemp("fundus_shards")
    run_prepare(PrepareConfig(source=SourceConfig(kind="eyepacs", root=str(fundus_raw)), out=str(out),
                              shard_samples=12, workers=2, progress=False))
    return out


@pytest.fixture(scope="session")
def target_shards(tmp_path_factory) -> Path:
    from tltrain.data.prepare import PrepareConfig, run_prepare
    from tltrain.data.sources import SourceConfig
    from tltrain.data.synth import generate_target_domain

    raw = tmp_path_factory.mktemp("target_raw")
    generate_target_domain(raw, n_per_class=24, size=96, seed=5, workers=2, progress=False)
    out = tmp_path_factory.mktemp("target_shards")
    run_prepare(PrepareConfig(source=SourceConfig(kind="imagefolder", root=str(raw)), out=str(out),
                              val_fraction=0.2, test_fraction=0.2, shard_samples=16, workers=2, progress=False))
    return out


def tiny_run_overrides(shards, run_dir, *extra):
    """A fast real training run (resnet10t at 32 px, CPU): the base of end-to-end tests."""
    return [f"data.shards={shards}", "model.arch=resnet10t", "loader.size=32", "loader.batch_size=8",
            "loader.workers=0", "trainer=cpu", "trainer.progress=false", "schedule=finetune_all",
            "schedule.epochs_per_phase=2", f"run_dir={run_dir}", *extra]


@pytest.fixture(scope="session")
def trained_run(fundus_shards, tmp_path_factory) -> Path:
    from tltrain.train_app import train_from_overrides

    run_dir = tmp_path_factory.mktemp("run") / "fundus"
    result = train_from_overrides(tiny_run_overrides(fundus_shards, run_dir))
    assert result["status"] == "completed"
    return run_dir
