"""Training on several shard folders (`data.shards=[A, B]`, `data.weights=[...]`) on both backends, and metrics per
source: the combined manifest, the per-folder draw rates and DALI's per-epoch shard lists, refusals in one line,
a real run whose test metrics break down by source, `tltrain evaluate` and `tltrain report` showing them."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_run_overrides
from tltrain.data.loaders import LoaderConfig, build_loader
from tltrain.data.loaders.plan import draw_rates, sample_index, select_shards, weighted_epoch_positions
from tltrain.data.prepare import PrepareConfig, run_prepare
from tltrain.data.shard_set import load_shard_set
from tltrain.data.sources import SourceConfig
from tltrain.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def two_source_shards(tmp_path_factory) -> Path:
    """One folder prepared from two sources (`north`, `south`: two small EyePACS-layout sets)."""
    from tltrain.data.synth import generate_eyepacs

    roots = {}
    for name, seed in (("north", 11), ("south", 12)):
        roots[name] = tmp_path_factory.mktemp(name)
        generate_eyepacs(roots[name], n_patients=14, width=160, seed=seed, min_per_class=3, workers=2, progress=False)
    out = tmp_path_factory.mktemp("two_sources")
    run_prepare(PrepareConfig(source=None, sources={n: SourceConfig(kind="eyepacs", root=str(r))
                                                    for n, r in roots.items()},
                              out=str(out), shard_samples=8, workers=2, progress=False))
    return out


def _loader(shards, manifest, split="train", backend="torch", **kw):
    cfg = LoaderConfig(backend=backend, batch_size=4, size=32, workers=0 if backend == "torch" else 1, **kw)
    return build_loader(cfg, shards, split, train=split == "train", manifest=manifest, seed=3)


def test_the_combined_manifest_joins_folders_and_keeps_every_shard(fundus_shards, two_source_shards):
    first, second = (json.loads((f / "manifest.json").read_text()) for f in (fundus_shards, two_source_shards))
    manifest = load_shard_set([str(fundus_shards), str(two_source_shards)], [1, 2])
    assert len(manifest["shards"]) == len(first["shards"]) + len(second["shards"])
    assert all(Path(s["tar"]).is_absolute() and Path(s["tar"]).is_file() for s in manifest["shards"])
    for split in ("train", "val", "test"):
        assert manifest["splits"][split]["count"] == first["splits"][split]["count"] + second["splits"][split]["count"]
    assert set(manifest["fractions"]) == set(first["fractions"]) & set(second["fractions"])
    assert [f["weight"] for f in manifest["folders"]] == [1.0, 2.0]
    assert manifest["folders"][1]["sources"] == ["north", "south"]
    _, shards = select_shards(fundus_shards, "train", 1.0, manifest)
    assert {s["folder"] for s in shards} == {0, 1}


def test_folders_with_another_label_set_are_refused_in_one_line(fundus_shards, target_shards):
    with pytest.raises(DataError, match=r"data\.shards: .* has classes .* but .* has .*share one label set"):
        load_shard_set([str(fundus_shards), str(target_shards)])


def test_data_weights_and_folders_are_checked_before_start_up(fundus_shards, two_source_shards, tmp_path):
    from tltrain.config import compose, load_run_config

    def config(*extra):
        return load_run_config(compose("config", tiny_run_overrides(fundus_shards, tmp_path / "r", *extra)))

    both = f"data.shards=[{fundus_shards},{two_source_shards}]"
    with pytest.raises(ConfigError, match=r"data\.weights has 1 value\(s\) for 2 folder\(s\)"):
        config(both, "data.weights=[1]")
    with pytest.raises(ConfigError, match=r"data\.weights\[1\]"):
        config(both, "data.weights=[1,-2]")
    with pytest.raises(ConfigError, match="at least one folder needs a weight above 0"):
        config(both, "data.weights=[0,0]")
    with pytest.raises(DataError, match="no manifest.json there"):
        config(f"data.shards=[{fundus_shards},{tmp_path}]")
    run = config(both, "data.weights=[1,3]")
    assert run.data.shards == [str(fundus_shards), str(two_source_shards)] and run.data.weights == [1.0, 3.0]


def test_draw_rates_give_each_folder_its_share(fundus_shards, two_source_shards):
    for weights, balanced in (([1, 3], False), ([2, 1], True), ([1, 0], False)):
        manifest = load_shard_set([str(fundus_shards), str(two_source_shards)], weights)
        _, shards = select_shards(fundus_shards, "train", 1.0, manifest)
        index = sample_index(fundus_shards, shards)
        rates = draw_rates(index, shards, manifest, 5, balanced)
        folders = np.array([shards[i]["folder"] for i in index.shard])
        per_sample = rates[folders, index.labels]
        shares = [per_sample[folders == f].sum() / len(index) for f in (0, 1)]
        assert shares == pytest.approx(np.array(weights) / sum(weights))
        if balanced:  # within a folder every present class is drawn equally often
            for f in (0, 1):
                drawn = [per_sample[(folders == f) & (index.labels == c)].sum() for c in range(5)]
                assert drawn == pytest.approx([drawn[0]] * 5)


def test_dali_epoch_draws_meet_the_folder_shares(fundus_shards, two_source_shards):
    """DALI's weighted epochs (an external source) draw samples with the same expected frequencies as the torch
    backend's Poisson repeats: the folders' shares over a few epochs, a new draw each epoch, the same for a seed."""
    manifest = load_shard_set([str(fundus_shards), str(two_source_shards)], [3, 1])
    _, shards = select_shards(fundus_shards, "train", 1.0, manifest)
    index = sample_index(fundus_shards, shards)
    rates = draw_rates(index, shards, manifest, 5, False)
    folders = np.array([shards[i]["folder"] for i in index.shard])
    draws = [weighted_epoch_positions(index, shards, rates, epoch, seed=5) for epoch in range(8)]
    assert len(draws[0]) == len(index) and not np.array_equal(draws[0], draws[1])
    assert np.array_equal(draws[0], weighted_epoch_positions(index, shards, rates, 0, seed=5))
    share = np.mean([np.mean(folders[d] == 0) for d in draws])
    assert abs(share - 0.75) < 0.05, share


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_a_zero_weight_folder_is_never_drawn_and_equal_weights_mix(backend, fundus_shards, two_source_shards):
    folders = [str(fundus_shards), str(two_source_shards)]
    second_keys = {k for k in sample_index(two_source_shards, select_shards(two_source_shards, "train")[1]).keys}
    only_first = _loader(fundus_shards, load_shard_set(folders, [1, 0]), backend=backend)
    keys = [k for batch in only_first for k, v in zip(batch.keys, batch.valid.tolist()) if v]
    assert keys and not set(keys) & second_keys
    mixed = _loader(fundus_shards, load_shard_set(folders, [1, 1]), backend=backend)
    drawn = Counter()
    for epoch in range(3):
        mixed.set_epoch(epoch)
        for batch in mixed:
            drawn.update("second" if k in second_keys else "first" for k, v in zip(batch.keys, batch.valid.tolist())
                         if v)
    share = drawn["second"] / sum(drawn.values())
    assert 0.3 < share < 0.7, drawn  # 0.5 expected (folder sizes differ about 2:1 without weights)


def test_a_run_on_two_folders_reports_test_metrics_per_source(fundus_shards, two_source_shards, tmp_path, capsys):
    from tltrain.cli import main as cli_main
    from tltrain.report import write_report
    from tltrain.train_app import train_from_overrides

    run_dir = tmp_path / "sweep" / "mixed"
    result = train_from_overrides(tiny_run_overrides(fundus_shards, run_dir, f"data.shards=[{fundus_shards},"
                                                     f"{two_source_shards}]", "data.weights=[1,1]",
                                                     "schedule.epochs_per_phase=1"))
    assert result["status"] == "completed"
    test = json.loads((run_dir / "metrics.json").read_text())["test"]
    per_source = test["per_source"]
    assert set(per_source) == {"eyepacs", "north", "south"}
    assert sum(part["count"] for part in per_source.values()) == test["count"]
    report = write_report(tmp_path / "sweep")
    assert "## Per source" in report["markdown_text"] and Path(report["per_source_csv"]).is_file()
    assert "north" in Path(report["per_source_csv"]).read_text()
    # the package evaluated on the two-source folder alone: its two sources beside the pooled figure
    assert cli_main(["export", str(run_dir), str(tmp_path / "pkg")]) in (0, None)
    assert cli_main(["evaluate", str(tmp_path / "pkg"), str(two_source_shards), "--out",
                     str(tmp_path / "eval.json")]) in (0, None)
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert set(evaluation["per_source"]) == {"north", "south"}
    assert sum(p["count"] for p in evaluation["per_source"].values()) == evaluation["count"]
    assert "per source:" in capsys.readouterr().out
    card = (tmp_path / "pkg" / "README.md").read_text()
    assert "per source (test)" in card
