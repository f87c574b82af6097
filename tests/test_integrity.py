"""No silent corruption: one label member for both backends, and training checks every shard's size and sha256
against manifest.json before its first epoch (a flag skips it). Real shards, real DALI CPU pipelines, real ranks.
"""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, TORCHRUN, free_port, tiny_run_overrides
from tltrain.data.integrity import check_checksums, run_shards
from tltrain.data.loaders import LoaderConfig, build_loader
from tltrain.data.loaders.plan import sample_refs, select_shards
from tltrain.data.verify import verify_shards
from tltrain.errors import DataError
from tltrain.train_app import train_from_overrides


def _flip_jpeg_scan_bytes(shard_dir: Path, shard_name: str, n: int = 200) -> str:
    """Flip n bytes inside one sample's JPEG entropy-coded data (size unchanged); returns the sample key."""
    _, shards = select_shards(shard_dir, shard_name.split("-")[0])
    shard = next(s for s in shards if s["name"] == shard_name)
    ref = sample_refs(shard_dir, [shard])[0]
    offset, size, _ = ref.members["jpg"]
    with open(ref.tar, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(size))
        start = data.find(b"\xff\xda") + 40  # past the start-of-scan header: only coded image data changes
        for i in np.random.default_rng(0).choice(np.arange(start, size - 2), min(n, size - 2 - start), replace=False):
            data[i] ^= 0x55 if data[i] ^ 0x55 != 0xFF else 0x33
        f.seek(offset)
        f.write(bytes(data))
    return ref.key


@pytest.fixture()
def damaged(fundus_shards, tmp_path):
    copy = tmp_path / "damaged"
    shutil.copytree(fundus_shards, copy)
    name = json.loads((copy / "manifest.json").read_text())["fractions"]["1"]["shards"][0]
    key = _flip_jpeg_scan_bytes(copy, name)
    return copy, f"{name}.tar", key


def test_dali_decodes_a_jpeg_with_flipped_scan_bytes_without_error(damaged):
    """Why the checksum check exists: DALI's decoder cannot see this damage (documented in docs/architecture.md)."""
    from nvidia.dali import fn, pipeline_def, types

    copy, tar, key = damaged
    ref = next(r for r in sample_refs(copy, select_shards(copy, "train", 1.0)[1]) if r.key == key)
    with open(ref.tar, "rb") as f:
        f.seek(ref.members["jpg"][0])
        data = np.frombuffer(f.read(ref.members["jpg"][1]), np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        return fn.decoders.image(fn.external_source(source=lambda: [data], batch=True, dtype=types.UINT8),
                                 device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    decoded = np.asarray(p.run()[0].at(0))
    assert decoded.ndim == 3 and decoded.shape[:2] == Image.open(io.BytesIO(data.tobytes())).size[::-1]
    with pytest.raises(DataError, match=tar):
        verify_shards(copy)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_training_refuses_a_damaged_shard_naming_it(damaged, tmp_path, backend):
    copy, tar, _ = damaged
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match=f"{tar}: sha256 differs from manifest.json") as info:
        train_from_overrides(tiny_run_overrides(copy, run_dir, f"loader.backend={backend}"))
    assert "\n" not in str(info.value) and "data.verify_checksums=false" in str(info.value)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and tar in status["error"]  # written by train_app.run for rank 0
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


@pytest.mark.slow  # a fresh `tltrain train` process (~10-30 s of imports); the in-process test above is fast
def test_cli_exits_2_with_one_line_naming_the_shard(damaged, tmp_path):
    copy, tar, _ = damaged
    proc = subprocess.run([sys.executable, "-m", "tltrain.cli", "train",
                           *tiny_run_overrides(copy, tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and tar in errors[0], proc.stderr[-2000:]


def test_skip_flag_skips_the_check(damaged, tmp_path):
    """Skipped, the run gets past the check to the next error (a batch too big for the data): fast to show."""
    copy, tar, _ = damaged
    with pytest.raises(Exception) as info:
        train_from_overrides(tiny_run_overrides(copy, tmp_path / "run", "data.verify_checksums=false",
                                                "loader.batch_size=4096"))
    assert "batch" in str(info.value) and tar not in str(info.value)


@pytest.mark.slow
def test_skip_flag_trains_on_the_damaged_shard(damaged, tmp_path):
    copy, _, _ = damaged
    result = train_from_overrides(tiny_run_overrides(copy, tmp_path / "run", "data.verify_checksums=false",
                                                     "schedule.epochs_per_phase=1", "data.test_split="))
    assert result["status"] == "completed"


def test_each_rank_hashes_its_own_slice(fundus_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fundus_shards, copy)
    shards = run_shards(copy, ["train", "val", "test"], 1.0)
    assert len(shards) >= 4 and check_checksums(copy, shards) == []
    for victim in (shards[0], shards[3]):  # one per rank of two
        with open(copy / victim["tar"], "r+b") as f:
            f.seek(2000)
            byte = f.read(1)
            f.seek(2000)
            f.write(bytes([byte[0] ^ 1]))
    found = [check_checksums(copy, shards, rank, 2, threads=2) for rank in (0, 1)]
    assert [len(f) for f in found] == [1, 1]
    assert shards[0]["tar"] in found[0][0] and shards[3]["tar"] in found[1][0]
    (copy / shards[1]["tar"]).unlink()
    assert any("missing" in p for p in check_checksums(copy, shards, 1, 2))


@pytest.mark.slow
def test_two_ranks_both_stop_on_a_damaged_shard(damaged, tmp_path):
    copy, tar, _ = damaged
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "tltrain.cli",
                           "train", *tiny_run_overrides(copy, tmp_path / "run", "trainer.strategy=ddp")],
                          cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 2 and all(tar in e for e in errors), proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"


def _patch_cls(shard_dir: Path, split: str) -> tuple[str, str, int]:
    """Make one sample's .cls disagree with its .lbl (same length); returns (tar name, key, .lbl label)."""
    _, shards = select_shards(shard_dir, split)
    ref = sample_refs(shard_dir, shards[:1])[0]
    with open(ref.tar, "r+b") as f:
        f.seek(ref.members["lbl"][0])
        label = int.from_bytes(f.read(4), "little")
        f.seek(ref.members["cls"][0])
        f.write(str((label + 1) % 5).encode())
    return Path(ref.tar).name, ref.key, label


def test_both_backends_read_the_lbl_member_and_verify_flags_disagreement(fundus_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fundus_shards, copy)
    tar, key, label = _patch_cls(copy, "val")
    labels = {}
    for backend in ("torch", "dali"):
        cfg = LoaderConfig(backend=backend, batch_size=8, size=32, workers=1)
        labels[backend] = {k: int(grade) for b in build_loader(cfg, copy, "val", train=False)
                           for k, grade, v in zip(b.keys, b.labels.tolist(), b.valid.tolist()) if v}
    assert labels["torch"] == labels["dali"] and labels["torch"][key] == label
    with pytest.raises(DataError, match=f"{tar}:{key}: label encodings disagree"):
        verify_shards(copy)
