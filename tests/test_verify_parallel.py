"""`tltrain verify` checks shards across a process pool: the report and the problem list must be exactly a serial
run's, for clean shards and for damaged ones (problems in several shards, in manifest order)."""
from __future__ import annotations

import json
import shutil

import pytest

from tltrain.cli import main
from tltrain.data.verify import verify_shards
from tltrain.errors import DataError


def test_parallel_report_equals_serial(fundus_shards):
    serial = verify_shards(fundus_shards, workers=1)
    assert serial["ok"] and serial["shards"] >= 4  # enough shards that a pool of 3 really splits them
    assert verify_shards(fundus_shards, workers=3) == serial
    assert verify_shards(fundus_shards) == serial  # default: every usable core


@pytest.fixture
def damaged_copy(fundus_shards, tmp_path):
    """A copy with damage in three different shards: a flipped byte, a missing tar, a truncated index."""
    copy = tmp_path / "copy"
    shutil.copytree(fundus_shards, copy)
    shards = json.loads((copy / "manifest.json").read_text())["shards"]
    flipped, missing, truncated = shards[0], shards[len(shards) // 2], shards[-1]
    data = bytearray((copy / flipped["tar"]).read_bytes())
    data[700] ^= 0xFF
    (copy / flipped["tar"]).write_bytes(bytes(data))
    (copy / missing["tar"]).unlink()
    index = copy / truncated["index"]
    index.write_bytes(index.read_bytes()[:-5])
    return copy, (flipped["tar"], missing["tar"], truncated["index"])


def test_parallel_errors_equal_serial_on_damaged_shards(damaged_copy):
    copy, names = damaged_copy
    errors = []
    for workers in (1, 3):
        with pytest.raises(DataError) as info:
            verify_shards(copy, workers=workers)
        errors.append((str(info.value), info.value.problems))
    assert errors[0] == errors[1]
    message, problems = errors[0]
    # every damaged shard is named, in manifest order, and the count mismatch is reported after them
    first_hit = [next(i for i, p in enumerate(problems) if name in p) for name in names]
    assert first_hit == sorted(first_hit)
    assert "missing" in problems[first_hit[1]] and "class counts" in problems[-1]
    assert message.startswith(f"{copy}: verification failed with {len(problems)} problem(s):")


def test_cli_workers_option(fundus_shards, damaged_copy, capsys):
    assert main(["verify", str(fundus_shards), "--workers", "1"]) == 0
    serial = capsys.readouterr().out
    assert main(["verify", str(fundus_shards), "--workers", "2"]) == 0
    assert capsys.readouterr().out == serial and json.loads(serial)["ok"]
    copy, _ = damaged_copy
    outputs = []
    for workers in ("1", "2"):
        assert main(["verify", str(copy), "--workers", workers]) == 2
        outputs.append(capsys.readouterr().err)
    assert outputs[0] == outputs[1] and outputs[0].startswith("error: ")
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(fundus_shards), "--workers", "-1"])
    assert exit_info.value.code == 2 and "expected an integer >= 0" in capsys.readouterr().err
