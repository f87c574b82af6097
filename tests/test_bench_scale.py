"""CI's run of the scale benchmark: N=2,000 in the Kaggle layout through every stage on both backends."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_scale_at_2k(tmp_path):
    out = tmp_path / "scale.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--n", "2000", "--out",
                    str(tmp_path / "work"), "--json", str(out), "--smoke", "--quiet-wait", "0"], check=True,
                   timeout=500)
    run = json.loads(out.read_text())["runs"][0]
    stages = ("synth", "prepare", "verify", "loader_start_torch", "epoch_torch", "loader_start_dali", "epoch_dali")
    assert all(run[s]["seconds"] > 0 and run[s]["rss"]["main_mb"] > 0 for s in stages)
    assert run["synth"]["train_images"] + run["synth"]["test_images"] == 2000
    assert run["synth"]["train_images"] == 792  # 35,126 / 88,702 of 2,000, even
    parts = run["prepare"]["parts"]
    assert parts["train"]["written"] + parts["test"]["written"] == 2000
    assert run["verify"]["verified"] == {"test": parts["test"]["written"], "train": parts["train"]["written"]}
    for backend in ("torch", "dali"):  # a real epoch over the whole train split: every full batch, trained
        ep = run[f"epoch_{backend}"]
        assert ep["batches"] == run["train_split"] // 32 >= 10
        assert ep["images"] == ep["batches"] * 32 and ep["images_per_s"] > 0 and ep["loop_images_per_s"] > 0
        assert ep["losses_finite"] and ep["arch"] == "resnet10t"
    assert run["shards"] >= 3 and run["manifest_bytes"] > 0
    assert not (tmp_path / "work" / "n2000").exists()  # generated data is removed
