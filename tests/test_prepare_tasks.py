"""A prepare split over K tasks (check, write, finish) gives the same bytes as a one-process prepare."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tltrain.data.prepare import PrepareConfig, run_prepare
from tltrain.data.sources import SourceConfig
from tltrain.errors import ConfigError, DataError


def same_result(single: Path, split: Path) -> None:
    """Every shard/index/done file byte-identical; manifests equal except their creation time."""
    names = sorted(p.name for p in single.iterdir() if p.name != "manifest.json")
    assert names == sorted(p.name for p in split.iterdir() if p.name != "manifest.json")
    assert any(n.endswith(".tar") for n in names)
    for name in names:
        assert (single / name).read_bytes() == (split / name).read_bytes(), name
    first, second = (json.loads((d / "manifest.json").read_text()) for d in (single, split))
    for manifest in (first, second):
        manifest.pop("created"), manifest["options"].pop("out")
    assert first == second


def test_three_tasks_match_one_process(fundus_raw, tmp_path):
    """K=3 tasks as plain calls (the SLURM test runs them as array tasks); tasks of a phase in reverse order."""
    cfg = dict(source=SourceConfig(kind="eyepacs", root=str(fundus_raw)), shard_samples=7, resize="radius:24",
               progress=False)
    run_prepare(PrepareConfig(**cfg, out=str(tmp_path / "one"), workers=2))
    split = str(tmp_path / "split")
    for phase in ("check", "write"):
        for i in (2, 1, 0):
            assert run_prepare(PrepareConfig(**cfg, out=split, workers=1, phase=phase, task=f"{i}/3")) is None
    run_prepare(PrepareConfig(**cfg, out=split, workers=1, phase="finish"))
    assert not (tmp_path / "split" / ".prepare").exists()
    same_result(tmp_path / "one", tmp_path / "split")


def test_write_phase_needs_every_check_task(fundus_raw, tmp_path):
    cfg = dict(source=SourceConfig(kind="eyepacs", root=str(fundus_raw)), out=str(tmp_path), workers=1, progress=False)
    run_prepare(PrepareConfig(**cfg, phase="check", task="0/2"))
    with pytest.raises(DataError, match=r"check-00001-of-00002.json: missing.*task=1/2"):
        run_prepare(PrepareConfig(**cfg, phase="write", task="0/2"))
    with pytest.raises(ConfigError, match="prepare.task='2/2'"):
        run_prepare(PrepareConfig(**cfg, phase="write", task="2/2"))
