"""A run folder someone else made is data: nothing outside it is touched, nothing hangs, errors are one line.

Each hostile file is crafted here; the proof is a victim file or folder outside the run folder that keeps its
bytes, a marker file a pickle would create, or a time bound on a read that would otherwise never end.
Items of issue 23 covered: checkpoints/index.json names, outputs written through planted links, the lock file,
bounded reads of status/metrics/index, Hydra's pickle flag, multirun + run_dir, values checked before training,
read-only folders and escaped error text.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import one_line, tiny_run_overrides
from tltrain.cli import main
from tltrain.engine.checkpoint import CheckpointManager, consolidate_checkpoint, remove_stale_writes
from tltrain.engine.rundir import LOCK_NAME, claim_run_dir, is_stale, lock_state, read_owner
from tltrain.errors import ConfigError, DataError

VICTIM_BYTES = b"ssh-ed25519 AAAA... the user's own key\n"


def finishes_within(seconds: float, fn, *args):
    """fn(*args) in a thread; (finished, result or exception). A read that blocks for ever leaves finished False."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), outcome


def victim_file(tmp_path: Path, name: str = "authorized_keys") -> Path:
    path = tmp_path / "victim" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(VICTIM_BYTES)
    return path


def victim_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "victim_dir"
    (folder / "sub").mkdir(parents=True)
    (folder / "precious.txt").write_bytes(VICTIM_BYTES)
    (folder / ".notes.tmp").write_bytes(VICTIM_BYTES)  # what remove_stale_writes deletes in folders it cleans
    (folder / "sub" / "step-00000001.pt").write_bytes(VICTIM_BYTES)
    return folder


def intact(folder: Path) -> bool:
    return all((folder / name).read_bytes() == VICTIM_BYTES
               for name in ("precious.txt", ".notes.tmp", "sub/step-00000001.pt"))


def train_cli(capsys, *overrides) -> tuple[int, str]:
    code = main(["train", *overrides])
    return code, capsys.readouterr().err


# -- 1. checkpoints/index.json --------------------------------------------------------------------------------
HOSTILE_ENTRIES = [
    {"name": "../../victim_dir", "kind": "deepspeed", "step": 1, "epoch": 0},
    {"name": "step-00000001/../../../victim_dir", "kind": "deepspeed", "step": 1, "epoch": 0},
    {"name": "/tmp", "kind": "deepspeed", "step": 1, "epoch": 0},
    {"name": "step-00000001", "kind": "../../victim_dir", "step": 1, "epoch": 0},
    {"name": "step-00000001", "kind": "file", "step": "1; rm -rf /", "epoch": 0},
]


def hostile_run_dir(tmp_path: Path, entry: dict, extra: dict | None = None) -> Path:
    """<tmp>/shared: a run folder whose index lists `entry` twice (kept, and pruned by keep_last=1); from its
    checkpoints folder, ../../victim_dir is <tmp>/victim_dir."""
    run_dir = tmp_path / "shared"
    (run_dir / "checkpoints").mkdir(parents=True)
    index = {"checkpoints": [entry, dict(entry)], "latest": entry["name"], "best": None, "best_value": None,
             **(extra or {})}
    (run_dir / "checkpoints" / "index.json").write_text(json.dumps(index))
    return run_dir


@pytest.mark.parametrize("entry", HOSTILE_ENTRIES, ids=lambda e: f"{e['name']}|{e['kind']}|{e['step']}")
def test_hostile_index_names_never_lead_outside_the_checkpoints_folder(entry, tmp_path):
    from test_checkpoint import make_strategy

    victim = victim_dir(tmp_path)
    run_dir = hostile_run_dir(tmp_path, entry)
    index_path = run_dir / "checkpoints" / "index.json"
    with claim_run_dir(run_dir):  # remove_stale_writes: a bad index names nothing it may delete
        pass
    assert remove_stale_writes(run_dir) == []
    manager = CheckpointManager(run_dir, keep_last=1)
    calls = [manager.index, manager.latest, lambda: manager.prune_after_run("none"),
             lambda: manager.prune_after_run("best"), lambda: consolidate_checkpoint(run_dir),
             lambda: manager.save(make_strategy(), {"step": 2, "epoch": 1, "batch_in_epoch": 0}, {"kappa": 1.0})]
    outcomes = []
    for call in calls:  # every path that builds a file name from the index: prune, claim, resume, weights
        try:
            outcomes.append(call())
        except Exception as exc:  # noqa: BLE001 - judged below, after the victim
            outcomes.append(exc)
    assert intact(victim) and index_path.is_file()
    for outcome in outcomes:
        assert isinstance(outcome, DataError), outcome
        message = one_line(str(outcome))
        assert str(index_path) in message and ("refused" in message or "must be a whole number" in message)
    assert json.loads(index_path.read_text())["checkpoints"][0] == entry  # the index was not rewritten


def test_hostile_latest_and_best_names_are_refused(tmp_path):
    good = {"name": "step-00000001", "kind": "file", "step": 1, "epoch": 0}
    for key in ("latest", "best"):
        run_dir = hostile_run_dir(tmp_path / key, good, {key: "../../victim_dir"})
        with pytest.raises(DataError, match=f"{key} checkpoint '../../victim_dir' is not a valid name"):
            CheckpointManager(run_dir).index()


def test_links_in_the_checkpoints_folder_are_never_followed(tmp_path):
    victim = victim_dir(tmp_path)
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "index.json").write_text(json.dumps({"checkpoints": [], "latest": None, "best": None}))
    (ckpt / "step-00000007").symlink_to(victim, target_is_directory=True)  # unlisted: removed, not what it names
    with claim_run_dir(run_dir):
        pass
    assert intact(victim) and not (ckpt / "step-00000007").is_symlink()
    # checkpoints/ itself a link to the victim: refused before anything is read, written or deleted there
    shutil.rmtree(ckpt)
    ckpt.symlink_to(victim, target_is_directory=True)
    with claim_run_dir(run_dir):
        pass
    with pytest.raises(DataError, match="checkpoints folder is a symbolic link .*refused"):
        CheckpointManager(run_dir)
    with pytest.raises(DataError, match="checkpoints folder is a symbolic link"):
        consolidate_checkpoint(run_dir)
    assert intact(victim)


def test_a_listed_checkpoint_that_is_a_link_or_fifo_is_never_read(tmp_path):
    from test_checkpoint import make_strategy

    victim = victim_file(tmp_path, "secret.pt")
    run_dir = tmp_path / "run"
    manager = CheckpointManager(run_dir)
    manager.save(make_strategy(), {"step": 1, "epoch": 0, "batch_in_epoch": 0})
    path = manager.dir / "step-00000001.pt"
    for make in (lambda: path.symlink_to("/dev/zero"), lambda: path.symlink_to(victim), lambda: os.mkfifo(path)):
        path.unlink()
        make()
        finished, outcome = finishes_within(20, manager.read, manager.latest())
        assert finished, "reading the checkpoint blocked"
        error = outcome.get("error")
        assert isinstance(error, DataError) and "symbolic link or not a regular file; refused" in str(error), outcome
    assert victim.read_bytes() == VICTIM_BYTES


def test_is_stale_takes_only_a_real_pid_from_status_json():
    import socket

    host = socket.gethostname()
    for pid in ("1; kill", 2**80, -1, 0, True, [1]):
        assert is_stale("/nonexistent", {"state": "running", "pid": pid, "host": host}) is False


def test_index_json_as_dev_zero_or_fifo_is_refused_at_once(tmp_path):
    for name, make in (("zero", lambda p: p.symlink_to("/dev/zero")), ("fifo", lambda p: os.mkfifo(p))):
        run_dir = tmp_path / name
        (run_dir / "checkpoints").mkdir(parents=True)
        make(run_dir / "checkpoints" / "index.json")
        finished, outcome = finishes_within(20, lambda: CheckpointManager(run_dir).index())
        assert finished, f"index.json as {name} blocked"
        assert isinstance(outcome.get("error"), DataError) and "not a regular file" in str(outcome["error"])
        finished, outcome = finishes_within(20, remove_stale_writes, run_dir)
        assert finished and outcome.get("value") == []


def test_a_real_run_in_a_hostile_folder_stops_with_one_escaped_line(fundus_shards, tmp_path, capsys):
    """The whole `tltrain train` path (claim, clean-up, resume): one line, the victim folder intact, and the
    terminal escape in the name shown as text."""
    victim = victim_dir(tmp_path)
    entry = {"name": "../../victim_dir\x1b]0;owned\x07", "kind": "deepspeed", "step": 1, "epoch": 0}
    run_dir = hostile_run_dir(tmp_path, entry)
    code, err = train_cli(capsys, *tiny_run_overrides(fundus_shards, run_dir, "schedule.epochs_per_phase=1"))
    line = one_line(err)
    assert code == 2 and "index.json" in line and "is not a valid name; refused" in line
    assert "\x1b" not in err and "\x07" not in err and "\\x1b]0;owned\\x07" in line
    assert intact(victim)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"


# -- 2. outputs never written through a planted link ----------------------------------------------------------
PLANTED = ("config.yaml", "status.json", "metrics.json", "predictions_test.csv", "weights_report.json",
           "train_app.log")


def test_outputs_replace_planted_links_and_leave_their_targets_alone(fundus_shards, tmp_path, capsys):
    import timm

    weights = tmp_path / "init.pth"
    torch.save(timm.create_model("resnet10t", num_classes=5).state_dict(), weights)  # -> weights_report.json
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    victims = {name: victim_file(tmp_path, f"victim_{name}") for name in PLANTED}
    for name, victim in victims.items():
        (run_dir / name).symlink_to(victim)
    code, err = train_cli(capsys, *tiny_run_overrides(fundus_shards, run_dir, "schedule.epochs_per_phase=1",
                                                      f"model.weights={weights}"))
    assert code == 0, err[-3000:]
    assert all(victim.read_bytes() == VICTIM_BYTES for victim in victims.values())
    for name in PLANTED:
        path = run_dir / name
        assert path.is_file() and not path.is_symlink(), name
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    assert "arch: resnet10t" in (run_dir / "config.yaml").read_text()


def test_a_linked_tensorboard_folder_is_refused_before_training(fundus_shards, tmp_path, capsys):
    victim = victim_dir(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "tb").symlink_to(victim, target_is_directory=True)
    code, err = train_cli(capsys, *tiny_run_overrides(fundus_shards, run_dir, "schedule.epochs_per_phase=1"))
    assert code == 2 and "TensorBoard folder is a symbolic link" in one_line(err)
    assert intact(victim) and sorted(p.name for p in victim.iterdir()) == [".notes.tmp", "precious.txt", "sub"]
    assert not list(run_dir.glob("checkpoints/step-*"))


# -- 3. the lock file -----------------------------------------------------------------------------------------
def _claim(run_dir):
    with claim_run_dir(run_dir):
        return "claimed"


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "victim_link", "hard_link"])
def test_a_hostile_lock_file_is_refused_at_once_and_readers_do_not_hang(kind, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / LOCK_NAME
    victim = victim_file(tmp_path)
    {"fifo": lambda: os.mkfifo(lock), "dev_zero": lambda: lock.symlink_to("/dev/zero"),
     "victim_link": lambda: lock.symlink_to(victim), "hard_link": lambda: os.link(victim, lock)}[kind]()
    finished, outcome = finishes_within(20, _claim, run_dir)
    assert finished, "claim_run_dir blocked"
    error = outcome.get("error")
    assert isinstance(error, DataError), outcome
    assert str(lock) in one_line(str(error)) and "refused" in str(error)
    assert victim.read_bytes() == VICTIM_BYTES  # never truncated, never written
    # what `tltrain report` and `tltrain jobs` call: answers at once, reads nothing unbounded
    for reader, args in ((read_owner, (run_dir,)), (lock_state, (run_dir,)),
                         (is_stale, (run_dir, {"state": "running", "pid": 1, "host": "elsewhere"}))):
        started = time.monotonic()
        finished, outcome = finishes_within(20, reader, *args)
        assert finished and time.monotonic() - started < 5, reader.__name__
        assert "error" not in outcome, outcome
    assert read_owner(run_dir) == {}
    assert victim.read_bytes() == VICTIM_BYTES


# -- 4. bounded reads of the run's own JSON files ------------------------------------------------------------
@pytest.fixture(scope="module")
def pruned_run(fundus_shards, tmp_path_factory) -> Path:
    """A completed run that kept no checkpoints: a relaunch reads its status.json and metrics.json."""
    from tltrain.train_app import train_from_overrides

    run_dir = tmp_path_factory.mktemp("pruned") / "run"
    result = train_from_overrides(tiny_run_overrides(fundus_shards, run_dir, "schedule.epochs_per_phase=1",
                                                     "trainer.keep_after_run=none"))
    assert result["status"] == "completed"
    return run_dir


@pytest.mark.parametrize("name", ["metrics.json", "status.json"])
def test_relaunch_with_dev_zero_as_a_json_file_is_one_line_not_a_hang(name, pruned_run, fundus_shards, tmp_path,
                                                                      capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(pruned_run, run_dir, symlinks=True)
    (run_dir / name).unlink()
    (run_dir / name).symlink_to("/dev/zero")
    finished, outcome = finishes_within(120, train_cli, capsys, *tiny_run_overrides(
        fundus_shards, run_dir, "schedule.epochs_per_phase=1", "trainer.keep_after_run=none"))
    assert finished, f"{name} -> /dev/zero: the relaunch did not end"
    code, err = outcome["value"]
    assert code == 2 and f"{run_dir / name}" in one_line(err) and "not a regular file" in err


def test_mark_failed_reads_status_json_bounded(tmp_path):
    from tltrain.train_app import mark_failed

    for name, make in (("zero", lambda p: p.symlink_to("/dev/zero")), ("fifo", lambda p: os.mkfifo(p))):
        run_dir = tmp_path / name
        run_dir.mkdir()
        make(run_dir / "status.json")
        finished, _ = finishes_within(20, mark_failed, run_dir, "boom")
        assert finished, f"status.json as {name} blocked mark_failed"
        status = json.loads((run_dir / "status.json").read_text())  # the link/FIFO replaced by a new file
        assert status["state"] == "failed" and status["error"] == "boom"


# -- 5. Hydra's pickle flag -----------------------------------------------------------------------------------
class TouchesMarker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("form", ["--experimental-rerun {}", "--experimental-rerun={}", "--experimental {}",
                                  "--exp={}"])
def test_experimental_rerun_is_refused_before_hydra_unpickles(form, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "config.pickle"
    evil.write_bytes(pickle.dumps(TouchesMarker(marker)))
    pickle.loads(evil.read_bytes())  # the file is real: loading it creates the marker
    assert marker.exists()
    marker.unlink()
    code, err = train_cli(capsys, *form.format(evil).split(" "))
    line = one_line(err)
    assert code == 2 and "--experimental-rerun loads a pickle file" in line and "refused" in line
    assert not marker.exists(), "the pickle ran"


# -- 6. multirun + run_dir ------------------------------------------------------------------------------------
def test_multirun_with_run_dir_refuses_and_writes_nothing_there(fundus_shards, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "one_folder"
    code, err = train_cli(capsys, "-m", *tiny_run_overrides(fundus_shards, run_dir, "schedule.epochs_per_phase=1"),
                          "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert code == 2, err[-3000:]  # refused before any job started (the sweep's start callback)
    refusals = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(refusals) == 1 and all("a multirun (-m) runs several" in line and "hydra.sweep.dir" in line
                                      for line in refusals), err[-3000:]
    assert "Traceback" not in err and not (tmp_path / "sweep").exists()
    assert not run_dir.exists()  # no status, no checkpoint, nothing trained there


def test_each_job_refuses_run_dir_too(monkeypatch):
    """The backstop when the start callback could not tell (a run_dir interpolation resolved per job)."""
    from omegaconf import OmegaConf

    from tltrain.train_app import refuse_multirun_run_dir

    refuse_multirun_run_dir(OmegaConf.create({"run_dir": ""}))
    with pytest.raises(ConfigError, match="hydra.sweep.dir"):
        refuse_multirun_run_dir(OmegaConf.create({"run_dir": "runs/x"}))


# -- 7. values checked before training starts ------------------------------------------------------------------
BAD_VALUES = [
    ("model.drop_rate=2", "model.drop_rate=2.0 must be a finite number >= 0 and < 1"),
    ("trainer.label_smoothing=1.5", "trainer.label_smoothing=1.5 must be a finite number >= 0 and < 1"),
    ("trainer.lr=nan", "trainer.lr=nan must be a finite number >= 0"),
    ("trainer.weight_decay=inf", "trainer.weight_decay=inf must be a finite number"),
    ("trainer.momentum=1", "trainer.momentum=1.0 must be a finite number >= 0 and < 1"),
    ("trainer.ema_decay=1", "trainer.ema_decay=1.0 must be"),
    ("trainer.clip_grad_norm=-1", "trainer.clip_grad_norm=-1.0 must be"),
    ("trainer.image_grid=-1", "trainer.image_grid=-1 must be a whole number >= 0"),
    ("trainer.class_weights=[0,0,0,0,0]", "trainer.class_weights: at least one weight must be > 0"),
    ("trainer.class_weights=[1,1,nan,1,1]", "trainer.class_weights[2]=nan"),
    ("trainer.referable_threshold=0", "trainer.referable_threshold=0 must be a whole number >= 1"),
    ("trainer.referable_threshold=7", "trainer.referable_threshold=7 must be a grade in [1, 4] for a 5-class run"),
    ("trainer.deepspeed.reduce_bucket_size=0", "trainer.deepspeed.reduce_bucket_size=0 must be"),
    ("data.fraction=0", "data.fraction=0.0 must be a finite number > 0 and <= 1"),
    ("seed=-1", "seed=-1 must be a whole number >= 0"),
    ("device=tpu", "device='tpu' is not valid; choose one of: auto, cpu, cuda"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_out_of_range_values_are_one_line_before_training(override, message, fundus_shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, err = train_cli(capsys, *tiny_run_overrides(fundus_shards, run_dir), override)
    line = one_line(err)
    assert code == 2 and message in line, line
    assert not list(run_dir.glob("checkpoints/step-*")) and not (run_dir / "metrics.json").exists()


def test_the_schema_checks_hold_outside_the_command_line_too():
    from tltrain.engine.config import TrainerConfig

    for bad in ({"label_smoothing": 1.0}, {"lr": float("inf")}, {"grad_accum": 0}, {"seed": 2**64}):
        with pytest.raises(ConfigError):
            TrainerConfig(**bad).validate()
    TrainerConfig(label_smoothing=0.1, momentum=0.0, lr=0.0, class_weights=[0.0, 1.0]).validate()


# -- 8. read-only file systems --------------------------------------------------------------------------------
@pytest.fixture
def read_only_view(tmp_path):
    """(writable folder, the same folder mounted read-only): a real read-only file system (root ignores chmod)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a read-only bind mount needs root")
    source, view = tmp_path / "rw", tmp_path / "ro"
    source.mkdir()
    view.mkdir()
    if subprocess.run(["mount", "--bind", str(source), str(view)], capture_output=True).returncode != 0:
        pytest.skip("bind mounts are not permitted here")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], capture_output=True).returncode != 0:
            pytest.skip("read-only remount not permitted here")
        yield source, view
    finally:
        subprocess.run(["umount", str(view)], capture_output=True)


def test_train_into_a_read_only_folder_is_one_line(read_only_view, fundus_shards, capsys):
    _, view = read_only_view
    run_dir = view / "run"
    code, err = train_cli(capsys, *tiny_run_overrides(fundus_shards, run_dir, "schedule.epochs_per_phase=1"))
    line = one_line(err)
    assert code == 2 and str(run_dir) in line and "read-only file system" in line


def test_rerun_of_a_finished_run_made_read_only_is_one_line(read_only_view, pruned_run, fundus_shards, capsys):
    source, view = read_only_view
    shutil.copytree(pruned_run, source / "run", symlinks=True)
    before = {p.name: p.read_bytes() for p in (source / "run").iterdir() if p.is_file()}
    code, err = train_cli(capsys, *tiny_run_overrides(fundus_shards, view / "run", "schedule.epochs_per_phase=1",
                                                      "trainer.keep_after_run=none"))
    line = one_line(err)
    assert code == 2 and str(view / "run") in line and "read-only file system" in line
    assert {p.name: p.read_bytes() for p in (source / "run").iterdir() if p.is_file()} == before


# -- a checkpoint's tagged numpy arrays (RNG state) are checked before they are built -----------------------------
@pytest.mark.parametrize("tagged, why", [
    ({"dtype": "<u4", "shape": [10**12]}, "needs"),
    ({"dtype": "|O", "shape": [2]}, "plain numpy dtype"),
    ({"dtype": "not-a-dtype", "shape": [2]}, "plain numpy dtype"),
    ({"dtype": "<u4", "shape": [-1]}, "whole numbers"),
    ({"dtype": "<u4", "shape": "2"}, "whole numbers"),
])
def test_tagged_array_declaring_other_bytes_is_refused(tagged, why):
    from tltrain.engine.checkpoint import NDARRAY_TAG, from_plain, to_plain

    state = {"rng": {NDARRAY_TAG: torch.zeros(8, dtype=torch.uint8), **tagged}}
    with pytest.raises(DataError, match=why):
        from_plain(state)
    array = np.arange(6, dtype=np.uint32).reshape(2, 3)
    assert np.array_equal(from_plain(to_plain({"a": array}))["a"], array)
