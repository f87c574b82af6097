"""What a new user met on the public datasets (#25), each fixed and kept fixed: one-line errors before anything
starts, predicting into a new folder, the DALI preset on a CPU trainer, a card for a run without a test split
(that one is checked in test_export.py)."""
from __future__ import annotations

import subprocess
import time

import pytest

from conftest import TLTRAIN, one_line, tiny_run_overrides

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("args, key", [(["prepare", "out=OUT"], "source.root"),
                                       (["prepare", "source.root=ROOT"], "out")])
def test_a_missing_required_key_is_one_line_naming_it(args, key, tmp_path):
    args = [a.replace("OUT", str(tmp_path / "out")).replace("ROOT", str(tmp_path)) for a in args]
    done = subprocess.run([TLTRAIN, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert f"{key} is required" in line and f"({key}=...)" in line
    assert not (tmp_path / "out").exists()


def test_a_split_the_shards_lack_is_refused_before_start_up(fundus_shards, tmp_path):
    started = time.monotonic()
    done = subprocess.run([TLTRAIN, "train", *tiny_run_overrides(fundus_shards, tmp_path / "run"),
                           "data.val_split=valid"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert "data.val_split='valid' is not a split of" in line and "its splits: test, train, val" in line
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert time.monotonic() - started < 120  # no model, loader or checksum pass was started


def test_predict_writes_into_a_folder_that_does_not_exist_yet(trained_run, fundus_raw, tmp_path):
    package = tmp_path / "pkg"
    done = subprocess.run([TLTRAIN, "export", str(trained_run), str(package)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    images = fundus_raw / "train"
    out = tmp_path / "new" / "deeper" / "predictions.csv"
    done = subprocess.run([TLTRAIN, "predict", str(package), str(images), "--out", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = out.read_text().splitlines()
    assert len(rows) - 1 == len(list(images.iterdir())) and rows[0].startswith("image,p_0")


def test_the_dali_loader_preset_trains_with_the_cpu_trainer(fundus_shards, tmp_path):
    """loader=dali gives bf16 batches; trainer=cpu is an fp32 model: the batches are cast, the run completes."""
    from tltrain.train_app import train_from_overrides

    result = train_from_overrides(tiny_run_overrides(fundus_shards, tmp_path / "run", "loader=dali",
                                                     "loader.size=32", "loader.batch_size=8",
                                                     "schedule.epochs_per_phase=1", "data.test_split="))
    assert result["status"] == "completed" and result["final"]["count"] > 0


def test_prepare_from_relative_paths_records_absolute_ones(fundus_raw, tmp_path, monkeypatch):
    import json
    import shutil

    from tltrain.data.prepare import PrepareConfig, run_prepare
    from tltrain.data.shards import iter_tar_samples
    from tltrain.data.sources import SourceConfig

    shutil.copytree(fundus_raw, tmp_path / "raw")
    monkeypatch.chdir(tmp_path)
    manifest = run_prepare(PrepareConfig(source=SourceConfig(kind="eyepacs", root="raw"), out="shards",
                                         shard_samples=40, workers=1, progress=False))
    assert manifest["options"]["out"] == str(tmp_path / "shards")
    assert manifest["source"]["root"] == str((tmp_path / "raw").resolve())
    sample = next(iter_tar_samples(tmp_path / "shards" / manifest["shards"][0]["tar"]))
    meta = json.loads(sample["json"])
    assert meta["source"].startswith(str(tmp_path / "raw")) and not meta["file"].startswith("/")
