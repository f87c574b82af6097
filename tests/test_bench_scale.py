"""CI's run of the scale benchmark: N=2,000 in the Kaggle layout through every stage on both backends."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_bench_scale_at_2k(tmp_path):
    out = tmp_path / "scale.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--n", "2000", "--out",
                    str(tmp_path / "work"), "--json", str(out)], check=True, timeout=1400)
    run = json.loads(out.read_text())["runs"][0]
    stages = ("synth", "prepare", "verify", "loader_start_torch", "epoch_torch", "loader_start_dali", "epoch_dali")
    assert all(run[s]["seconds"] > 0 and run[s]["rss"]["main_mb"] > 0 for s in stages)
    assert run["synth"]["train_images"] + run["synth"]["test_images"] == 2000
    assert run["synth"]["train_images"] == 792  # 35,126 / 88,702 of 2,000, even
    parts = run["prepare"]["parts"]
    assert parts["train"]["written"] + parts["test"]["written"] == 2000
    assert run["verify"]["verified"] == {"test": parts["test"]["written"], "train": parts["train"]["written"]}
    assert run["epoch_torch"]["status"] == run["epoch_dali"]["status"] == "completed"
    assert run["shards"] >= 3 and run["manifest_bytes"] > 0
    assert not (tmp_path / "work" / "n2000").exists()  # generated data is removed
