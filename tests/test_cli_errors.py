"""Every error a user can fix is one line with exit status 2: Hydra's composition errors, missing or damaged
shards, a full disk; and a sweep goes on past a failed run, lists it at the end and exits non-zero."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tltrain.cli import _hydra_argv, main

from conftest import tiny_run_overrides

# (overrides, words the one error line must contain)
MALFORMED = [
    (["model=resnet181"], ["model='resnet181'", "did you mean model=resnet18", "resnet50"]),
    (["lr=abc"], ["unknown key 'lr'", "valid keys of the run config", "trainer"]),
    (["trainer.weight_decai=0.1"], ["unknown key 'trainer.weight_decai'", "did you mean trainer.weight_decay"]),
    (["loader.preprocess.sigmaratio=0.1"], ["did you mean loader.preprocess.sigma_ratio"]),
    (["schedule.epochs_per_phase=abc"], ["schedule.epochs_per_phase=abc", "could not be converted to Integer"]),
    (["seed=x"], ["seed=x", "Integer"]),
    (["loader=nope"], ["loader='nope'", "dali, torch"]),
    (["+experiment=nope"], ["experiment='nope'", "li2017"]),
    (["schedule="], ["schedule=''", "swft"]),
    (["data.shards=[1,"], ["cannot parse the override"]),
    (["hydra.foo=1"], ["unknown key 'hydra.foo'"]),
    (["-m", "seed=0,1", "nosuch=1"], ["unknown key 'nosuch'"]),
    (["data.fraction=0.33"], ["data.fraction=0.33 was not prepared", "0.1"]),
    (["model.arch=resnet99"], ["model.arch='resnet99' is not a timm model"]),
    (["data.shards=/nonexistent/shards"], ["no manifest.json"]),
    (["model.weights=/nonexistent/w.pth"], ["model.weights='/nonexistent/w.pth'", "no such file"]),
    (["model.arch="], ["model.arch is empty"]),
    (["trainer.best_metric=kapa"], ["trainer.best_metric='kapa' is not valid", "kappa, referable_auc"]),
]


@pytest.mark.parametrize("overrides,words", MALFORMED, ids=[" ".join(o) for o, _ in MALFORMED])
def test_malformed_train_invocation_is_one_line_exit_2(overrides, words, fundus_shards, tmp_path, capsys,
                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = [] if any(o.startswith("data.shards=") for o in overrides) else [f"data.shards={fundus_shards}"]
    code = main(["train", *base, "trainer=cpu", f"run_dir={tmp_path / 'run'}", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


def test_referable_best_metric_on_a_two_class_run_is_one_line_before_training(target_shards, tmp_path, capsys):
    """Otherwise no checkpoint would ever be "best": the test split and export would silently use another one."""
    run_dir = tmp_path / "run"
    code = main(["train", *tiny_run_overrides(target_shards, run_dir), "trainer.best_metric=sensitivity"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "trainer.best_metric='sensitivity' is a referable-DR metric, which a 2-class run does not" in err
    assert _status(run_dir)["state"] == "failed" and not list(run_dir.glob("checkpoints/step-*"))


def test_top2_best_metric_on_a_two_class_run_is_one_line(target_shards, tmp_path, capsys):
    code = main(["train", *tiny_run_overrides(target_shards, tmp_path / "run"), "trainer.best_metric=top2_accuracy"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "trainer.best_metric='top2_accuracy' means nothing for a 2-class run" in err


def test_hydra_flags_may_follow_overrides():
    assert _hydra_argv(["a=1", "-m", "b=1,2", "--cfg", "job"]) == ["-m", "--cfg", "job", "a=1", "b=1,2"]


def _copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def test_missing_index_is_one_line_and_status_failed(fundus_shards, tmp_path, capsys):
    shards = _copy_shards(fundus_shards, tmp_path / "shards")
    victim = sorted(shards.glob("train-*.idx"))[0]
    victim.unlink()
    run_dir = tmp_path / "run"
    code = main(["train", *tiny_run_overrides(shards, run_dir)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert victim.name in err and "missing" in err
    status = _status(run_dir)
    assert status["state"] == "failed" and victim.name in status["error"]


def test_damaged_shard_on_dali_is_one_line(fundus_shards, tmp_path, capsys):
    shards = _copy_shards(fundus_shards, tmp_path / "shards")
    victim = sorted(shards.glob("train-*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[:3000])  # truncated after writing: the index points past the end
    run_dir = tmp_path / "run"
    code = main(["train", *tiny_run_overrides(shards, run_dir), "loader=dali", "loader.size=32",
                 "loader.batch_size=8", "loader.workers=0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert victim.name in err
    assert _status(run_dir)["state"] == "failed"
    # Hydra's log file handler does not outlive the in-process app (it pointed later runs' logs at this run_dir)
    import logging

    assert not [h for h in logging.getLogger().handlers if str(run_dir) in str(getattr(h, "baseFilename", ""))]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a small tmpfs needs root")
def test_full_disk_is_one_line_exit_2(fundus_shards, tmp_path):
    """A real full file system (2 MiB tmpfs): the checkpoint cannot be written."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("tmpfs mount refused here")
    try:
        run_dir = mnt / "run"
        proc = subprocess.run([sys.executable, "-m", "tltrain.cli", "train",
                               *tiny_run_overrides(fundus_shards, run_dir), "schedule.epochs_per_phase=1"],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert err and "no space left on the device" in err[-1] and str(run_dir) in err[-1]
        assert not any(line.startswith("Traceback") for line in err)
        status = _status(run_dir)
        assert status["state"] == "failed" and "no space left" in status["error"]
        assert not list(run_dir.rglob("*.tmp"))  # the half-written checkpoint is gone
    finally:
        subprocess.run(["umount", str(mnt)])


def test_sweep_goes_on_past_a_failed_run(fundus_shards, tmp_path):
    """Run 0 fails on a clear DataError, run 1 trains; the sweep lists the failure and exits 1."""
    overrides = [o for o in tiny_run_overrides(fundus_shards, "x") if not o.startswith("run_dir=")]
    proc = subprocess.run([sys.executable, "-m", "tltrain.cli", "train", "-m", *overrides,
                           "schedule.epochs_per_phase=1", "data.fraction=0.33,1.0",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "1 of 2 runs failed" in proc.stderr and "data.fraction=0.33 was not prepared" in proc.stderr
    assert "Traceback" not in proc.stderr
    runs = sorted((tmp_path / "sweep").glob("[0-9]_*"))
    assert len(runs) == 2
    assert _status(runs[0])["state"] == "failed" and "0.33" in _status(runs[0])["error"]
    assert _status(runs[1])["state"] == "completed"
