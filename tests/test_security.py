"""Loading weights never runs code: a malicious pickle is refused on every path that reads files others wrote.

The malicious file is real: its pickle calls os.system("touch <marker>") when unpickled (checked once with plain
pickle below). Each path must refuse it with one line naming the file, and the marker must not exist afterwards.
Plain state dicts (torch.save(model.state_dict()), as torchvision and timm ship them) still load, checkpoints
load with weights_only=True and nothing else allowed, and a run killed with SIGKILL resumes to bit-identical
weights.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, TLTRAIN, TORCHRUN, clean_env, free_port, tiny_run_overrides
from tltrain.engine.checkpoint import CheckpointManager, consolidate_checkpoint
from tltrain.errors import DataError
from tltrain.safe_load import PickleRefused, deepspeed_weights_only


class RunsCommand:
    """Unpickling this runs a shell command (what an attacker would put in a shared .pth)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def write_evil(path: Path, marker: Path) -> Path:
    """A torch file that looks like a checkpoint (a real state dict inside) and runs `touch marker` when loaded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "payload": RunsCommand(f"touch {marker}")}, path)
    return path


def assert_refused(exc_info, path: Path, marker: Path) -> None:
    message = str(exc_info.value)
    assert len(message.splitlines()) == 1, message
    assert str(path) in message and "refused to load" in message and "could run code" in message
    assert "tltrain convert-weights" in message and "--trust-pickle" in message
    assert not marker.exists(), "the pickle ran"


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "PWNED"


def test_the_malicious_file_is_real(tmp_path, marker):
    evil = write_evil(tmp_path / "evil.pth", marker)
    torch.load(evil, weights_only=False)  # what tltrain did before: the command runs
    assert marker.exists()


def test_weights_file_refused(fundus_shards, tmp_path, marker):
    from tltrain.train_app import train_from_overrides

    evil = write_evil(tmp_path / "evil.pth", marker)
    with pytest.raises(PickleRefused) as info:
        train_from_overrides(tiny_run_overrides(fundus_shards, tmp_path / "run", f"model.weights={evil}"))
    assert_refused(info, evil, marker)


@pytest.mark.slow
def test_weights_file_refused_through_the_train_command(fundus_shards, tmp_path, marker):
    evil = write_evil(tmp_path / "evil.pth", marker)
    overrides = tiny_run_overrides(fundus_shards, tmp_path / "run", f"model.weights={evil}")
    done = subprocess.run([TLTRAIN, "train", *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(evil) in errors[0] and "global posix.system" in errors[0], errors
    assert "tltrain convert-weights" in errors[0]
    assert not marker.exists()


def test_run_dir_as_weights_refused(tmp_path, marker):
    from tltrain.models import create_model

    run_dir = tmp_path / "someone_elses_run"
    evil = write_evil(run_dir / "checkpoints" / "step-00000007.pt", marker)
    CheckpointManager(run_dir)._record("step-00000007", "file", {"step": 7, "epoch": 1}, None)
    with pytest.raises(PickleRefused) as info:
        create_model("resnet10t", 5, weights=str(run_dir))
    assert_refused(info, evil, marker)


def test_deepspeed_run_dir_as_weights_refused(tmp_path, marker):
    """DeepSpeed's zero_to_fp32 calls torch.load(weights_only=False) itself: that call is made weights-only too."""
    run_dir = tmp_path / "ds_run"
    tag = run_dir / "checkpoints" / "step-00000003"
    write_evil(tag / "mp_rank_00_model_states.pt", marker)
    write_evil(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    CheckpointManager(run_dir)._record("step-00000003", "deepspeed", {"step": 3, "epoch": 1}, None)
    with pytest.raises(PickleRefused) as info:
        consolidate_checkpoint(run_dir)
    assert_refused(info, tag, marker)
    assert f"convert-weights {run_dir} " in str(info.value)


def test_deepspeed_loads_are_forced_weights_only(tmp_path, marker):
    """What DeepSpeed's TorchCheckpointEngine.load does, inside the block: refused; the setting is undone after."""
    evil = write_evil(tmp_path / "optim_states.pt", marker)
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    with pytest.raises(PickleRefused) as info:
        with deepspeed_weights_only(tmp_path):
            torch.load(evil, map_location="cpu", weights_only=False)
    assert_refused(info, tmp_path, marker)
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == before


def test_package_refused(tmp_path, marker):
    from tltrain.data.shards import sha256_file
    from tltrain.export import FORMAT, load_pretrained
    from tltrain.models import create_model

    package = tmp_path / "package"
    evil = write_evil(package / "model.pth", marker)
    meta = {"format": FORMAT, "architecture": "resnet10t", "num_classes": 5, "num_outputs": 5,
            "weights": {"file": "model.pth", "sha256": sha256_file(evil)},
            "preprocessing": {"size": 32}}
    (package / "tltrain.json").write_text(json.dumps(meta))
    with pytest.raises(PickleRefused) as info:
        load_pretrained(package)
    assert_refused(info, evil, marker)
    with pytest.raises(PickleRefused) as info:  # the same folder given as model.weights
        create_model("resnet10t", 5, weights=str(package))
    assert_refused(info, evil, marker)


def test_resume_from_someone_elses_checkpoint_refused(fundus_shards, tmp_path, marker):
    from tltrain.train_app import train_from_overrides

    run_dir = tmp_path / "shared_run"
    evil = write_evil(run_dir / "checkpoints" / "step-00000002.pt", marker)
    CheckpointManager(run_dir)._record("step-00000002", "file", {"step": 2, "epoch": 0}, None)
    with pytest.raises(PickleRefused) as info:
        train_from_overrides(tiny_run_overrides(fundus_shards, run_dir))
    assert_refused(info, evil, marker)
    assert f"convert-weights {run_dir} " in str(info.value)  # the run, which convert-weights consolidates


def test_deepspeed_trainer_state_refused_with_the_run_to_convert(tmp_path, marker):
    """Resuming a DeepSpeed run reads our tltrain_trainer.pt first: refused, and the hint converts the run (the
    trainer file alone holds no weights)."""
    run_dir = tmp_path / "ds_run"
    trainer_file = write_evil(run_dir / "checkpoints" / "step-00000003" / "tltrain_trainer.pt", marker)
    manager = CheckpointManager(run_dir)
    manager._record("step-00000003", "deepspeed", {"step": 3, "epoch": 1}, None)
    with pytest.raises(PickleRefused) as info:
        manager.read(manager.latest())
    assert_refused(info, trainer_file, marker)
    assert f"convert-weights {run_dir} {run_dir.name}.safetensors --trust-pickle" in str(info.value)


def test_features_head_refused_and_saved_without_pickle(tmp_path, marker):
    import joblib

    from tltrain.transfer.features import fit_classifier, load_classifier

    run_dir = tmp_path / "svm_run"
    run_dir.mkdir()
    joblib.dump(RunsCommand(f"touch {marker}"), run_dir / "classifier.joblib")  # a legacy head
    with pytest.raises(PickleRefused) as info:
        load_classifier(run_dir)
    assert len(str(info.value).splitlines()) == 1 and "classifier.joblib" in str(info.value)
    assert not marker.exists()

    rng = np.random.default_rng(0)
    labels = np.arange(60) % 3
    feats = rng.normal(size=(60, 8)) + labels[:, None]
    for kind, kernel in (("svm", "rbf"), ("svm", "linear"), ("logreg", "rbf")):
        head = fit_classifier(feats, labels, kind=kind, kernel=kernel)
        head.save(run_dir / "classifier")
        assert sorted(p.name for p in run_dir.glob("classifier.*")) == [
            "classifier.joblib", "classifier.json", "classifier.safetensors"]
        back = load_classifier(run_dir)
        test = rng.normal(size=(25, 8)) + rng.integers(0, 3, 25)[:, None]
        assert np.array_equal(back.predict_proba(test, 5), head.predict_proba(test, 5))  # exactly
        assert np.array_equal(back.predict(test), head.predict(test))


@pytest.mark.parametrize("kind,kernel", [("svm", "rbf"), ("svm", "linear"), ("logreg", "rbf")])
@pytest.mark.parametrize("n_classes", [2, 4])
def test_features_head_predicts_as_scikit_learn(kind, kernel, n_classes):
    """The numpy head reproduces the scikit-learn estimators it was copied from (scaler, SVC/LinearSVC/logistic
    regression, Platt calibration), to rounding."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, LinearSVC

    from tltrain.transfer.features import fit_classifier

    rng = np.random.default_rng(n_classes)
    labels = rng.integers(0, n_classes, 120)
    feats = rng.normal(size=(120, 12)) + 0.5 * labels[:, None]
    test = rng.normal(size=(40, 12)) + 0.5 * rng.integers(0, n_classes, 40)[:, None]
    head = fit_classifier(feats, labels, kind=kind, kernel=kernel, C=0.7, seed=3)
    scaler = StandardScaler().fit(feats)
    if kind == "logreg":
        reference = LogisticRegression(C=0.7, max_iter=5000, class_weight="balanced")
    else:
        svm = (SVC(C=0.7, kernel="rbf", gamma=head.meta["gamma"], class_weight="balanced", random_state=3)
               if kernel == "rbf" else LinearSVC(C=0.7, class_weight="balanced", random_state=3, max_iter=5000))
        folds = StratifiedKFold(min(5, np.bincount(labels).min()), shuffle=True, random_state=3)
        reference = CalibratedClassifierCV(svm, method="sigmoid", cv=folds, ensemble=False)
    reference.fit(scaler.transform(feats), labels)
    expected = reference.predict_proba(scaler.transform(test))
    np.testing.assert_allclose(head.predict_proba(test, n_classes), expected, rtol=0, atol=1e-12)
    assert np.array_equal(head.predict(test), reference.predict(scaler.transform(test)))


def test_plain_state_dicts_still_load(tmp_path):
    """torch.save(model.state_dict()) files, as torchvision and timm publish them, load without any opt-in."""
    import timm
    import torchvision

    from tltrain.models import create_model

    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), tmp_path / "resnet18_torchvision.pth")
    model = create_model("resnet18", 5, weights=str(tmp_path / "resnet18_torchvision.pth"))
    report = model.tltrain_load_report
    assert len(report.matched) == len(tv.state_dict()) - 2 and not report.unused  # all but the 1000-class head
    assert torch.equal(model.state_dict()["layer4.1.conv2.weight"], tv.state_dict()["layer4.1.conv2.weight"])

    source = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "timm_ckpt.pth.tar")  # timm's train.py layout
    model = create_model("resnet10t", 5, weights=str(tmp_path / "timm_ckpt.pth.tar"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())


def test_legacy_pickle_needs_the_opt_in_and_converts(tmp_path, capsys):
    """A trusted legacy checkpoint (numpy objects inside): refused by default, read with trust_pickle, and
    `tltrain convert-weights --trust-pickle` turns it into a .safetensors file that loads like any other."""
    import timm

    from tltrain.models import create_model, read_state_dict

    source = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    legacy = tmp_path / "legacy.pt"
    torch.save({"model": source.state_dict(), "trainer": {"rng": np.random.get_state()}}, legacy)
    with pytest.raises(PickleRefused, match="global numpy"):
        read_state_dict(legacy)
    assert torch.equal(read_state_dict(legacy, trust_pickle=True)["fc.weight"], source.fc.weight)

    from tltrain.cli import main

    out = tmp_path / "converted.safetensors"
    assert main(["convert-weights", str(legacy), str(out)]) == 2 and not out.exists()
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: {legacy}: refused to load"), err
    assert main(["convert-weights", str(legacy), str(out), "--trust-pickle"]) == 0
    model = create_model("resnet10t", 5, weights=str(out))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())


@pytest.mark.slow  # a whole tiny run: 31-93 s measured on the shared 2-core machine
def test_trust_pickle_opt_in_through_a_run(fundus_shards, tmp_path):
    """model.trust_pickle=true (the config opt-in) lets a run start from a trusted legacy checkpoint."""
    import timm

    from tltrain.train_app import train_from_overrides

    source = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    legacy = tmp_path / "legacy.pt"
    torch.save({"model": source.state_dict(), "trainer": {"rng": np.random.get_state()}}, legacy)
    run_dir = tmp_path / "run"
    result = train_from_overrides(tiny_run_overrides(fundus_shards, run_dir, f"model.weights={legacy}",
                                                     "model.trust_pickle=true"))
    assert result["status"] == "completed"
    report = json.loads((run_dir / "weights_report.json").read_text())
    assert len(report["matched"]) + len(report["mismatched"]) == len(source.state_dict()) and not report["unused"]
    assert {k for k, _, _ in report["mismatched"]} <= {"fc.weight", "fc.bias"}  # only the head, if classes differ


def test_checkpoints_load_weights_only_with_nothing_allowed(tmp_path):
    """Full training state (model, optimizer, scaler, EMA, RNG of python/numpy/torch, loader position) goes
    through torch.load(weights_only=True) with no extra global, and comes back exactly."""
    from tltrain.engine.config import TrainerConfig
    from tltrain.engine.distributed import DistEnv
    from tltrain.engine.optim import build_ema, build_optimizer, default_param_groups
    from tltrain.engine.strategies import build_strategy
    from tltrain.engine.synthetic import TinyConvNet

    allowed_before = list(torch.serialization.get_safe_globals())  # torch registers its own; we add none
    cfg = TrainerConfig(precision="fp32", channels_last=False, ema_decay=0.9)
    strategy = build_strategy(cfg, DistEnv(), torch.device("cpu"))
    model = strategy.prepare_model(TinyConvNet(5))
    strategy.wrap(model, build_optimizer(default_param_groups(model, cfg), cfg), micro_batch_size=2)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    strategy.step(True)  # Adam moments exist
    ema = build_ema(model, 0.9)
    import random

    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": None}
    state = {"step": 1, "epoch": 0, "batch_in_epoch": 4, "phase": 0, "rng": [rng], "thresholds": np.array([0.5, 1.5]),
             "history": [{"val": {"kappa": np.float64(0.25), "confusion": [[1, 0], [0, 1]]}}]}
    manager = CheckpointManager(tmp_path)
    manager.save(strategy, state, extra={"ema": ema.state_dict()})
    path = manager.path_of(manager.latest())
    raw = torch.load(path, weights_only=True)
    assert set(raw) >= {"model", "optimizer", "scaler", "ema", "trainer"}
    back = manager.read(manager.latest())["trainer"]
    np_state = back["rng"][0]["numpy"]
    assert np_state[0] == "MT19937" and np.array_equal(np_state[1], rng["numpy"][1])
    assert np_state[1].dtype == rng["numpy"][1].dtype and tuple(np_state[2:]) == tuple(rng["numpy"][2:])
    assert back["rng"][0]["python"] == rng["python"] and torch.equal(back["rng"][0]["torch"], rng["torch"])
    assert np.array_equal(back["thresholds"], state["thresholds"]) and back["batch_in_epoch"] == 4
    assert back["history"][0]["val"]["kappa"] == 0.25
    restored = manager.read(manager.latest())
    assert restored["optimizer"]["state"][0]["exp_avg"].shape == next(model.parameters()).shape
    assert restored["model"]._metadata == model.state_dict()._metadata  # module versions kept
    assert list(torch.serialization.get_safe_globals()) == allowed_before  # nothing registered process-wide


class WritesAtLoad(torch.nn.Module):
    """A TorchScript module whose __setstate__ writes a file: it runs while torch loads the archive."""

    def __init__(self, target: str):
        super().__init__()
        self.register_buffer("weight", torch.ones(2, 2))
        self.target = target

    def forward(self, x):
        return x @ self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return self.weight, self.target, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        torch.save(torch.zeros(1), state[1])  # code from the file, run at load
        self.weight, self.target, self.training = state[0], state[1], state[2]


def write_torchscript(path: Path, marker: Path) -> Path:
    import warnings

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch >= 2.10: torch.jit.script is deprecated (still loadable)
        torch.jit.script(WritesAtLoad(str(marker))).save(str(path))
    return path


def test_torchscript_archive_refused(tmp_path, marker):
    """torch.load hands a TorchScript archive to torch.jit.load, which runs its code; torch < 2.6 did so even with
    weights_only=True (CVE-2025-32434). tltrain refuses such archives itself, on every torch, on every path."""
    from tltrain.models import create_model, read_state_dict

    evil = write_torchscript(tmp_path / "scripted.pt", marker)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.load(evil, weights_only=False)  # the archive is real: loading it writes the marker
    assert marker.exists()
    marker.unlink()

    with pytest.raises(PickleRefused) as info:  # model.weights as a file
        create_model("resnet10t", 5, weights=str(evil))
    assert_refused(info, evil, marker)
    assert "TorchScript" in str(info.value)

    run_dir = tmp_path / "ds_run"  # a DeepSpeed run dir whose shard is an archive: refused before DeepSpeed reads
    tag = run_dir / "checkpoints" / "step-00000003"
    write_torchscript(tag / "mp_rank_00_model_states.pt", marker)
    CheckpointManager(run_dir)._record("step-00000003", "deepspeed", {"step": 3, "epoch": 1}, None)
    with pytest.raises(PickleRefused) as info:
        consolidate_checkpoint(run_dir)
    assert_refused(info, tag / "mp_rank_00_model_states.pt", marker)
    assert f"convert-weights {run_dir} " in str(info.value)

    assert torch.equal(read_state_dict(evil, trust_pickle=True)["weight"], torch.ones(2, 2))  # opted in: read
    assert marker.exists()  # ... and its code ran, as the opt-in says it may


def test_corrupt_file_is_a_read_error_not_a_refusal(tmp_path):
    from tltrain.models import read_state_dict

    bad = tmp_path / "truncated.pth"
    bad.write_bytes(b"truncated")
    with pytest.raises(DataError, match="cannot read weights") as info:
        read_state_dict(bad)
    assert not isinstance(info.value, PickleRefused)


# -- resume after kill -9 -------------------------------------------------------------------------------------
def _synthetic(run_dir, *extra):
    return [sys.executable, "-m", "tltrain.engine.synthetic", "--run-dir", str(run_dir), "--epochs", "2",
            "--train-size", "160", "--batch-size", "16", "--checkpoint-every", "3", *extra]


@pytest.mark.slow  # three real training processes (~1.5 min on 2 shared cores); CI runs it with `make test-slow`
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(_synthetic(straight), cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]

    proc = subprocess.Popen(_synthetic(killed, "--step-sleep", "0.2"), cwd=ROOT, env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill -9 in the second epoch, after a mid-epoch checkpoint
        entry = CheckpointManager(killed, is_main=False).latest() if (killed / "checkpoints" / "index.json").exists() \
            else None
        if entry and entry["step"] >= 13:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    resumed_from = CheckpointManager(killed, is_main=False).latest()
    assert 13 <= resumed_from["step"] < 20 and resumed_from["batch_in_epoch"] > 0
    done = subprocess.run(_synthetic(killed), cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = consolidate_checkpoint(straight), consolidate_checkpoint(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"


@pytest.mark.slow  # two 2-rank DeepSpeed runs (torchrun, gloo, DS_ACCELERATOR=cpu)
def test_deepspeed_resume_and_consolidation_run_weights_only(tmp_path):
    """DeepSpeed's own load_checkpoint (resume) and zero_to_fp32 (consolidation) read real ZeRO-2 files with
    torch.load forced weights-only: both still work."""
    def torchrun(epochs):
        cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
               "tltrain.engine.synthetic", "--run-dir", str(tmp_path), "--epochs", str(epochs), "--batch-size", "8",
               "--strategy", "deepspeed", "--precision", "bf16", "--zero-stage", "2"]
        return subprocess.run(cmd, cwd=ROOT, env={**clean_env(), "DS_ACCELERATOR": "cpu"}, capture_output=True,
                              text=True, timeout=600)

    first = torchrun(1)
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step-00000020" in second.stdout + second.stderr
    assert CheckpointManager(tmp_path, is_main=False).latest()["step"] == 40
    state = consolidate_checkpoint(tmp_path)
    assert set(state) == {"features.0.weight", "features.0.bias", "fc.weight", "fc.bias"}
