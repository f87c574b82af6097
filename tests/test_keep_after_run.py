"""trainer.keep_after_run: what a completed run keeps of its checkpoints (a sweep of 54 runs kept 14 GB before).

Real tiny runs through the Hydra app: `best` keeps exactly the weights the run tested (compared with an identical
run that kept everything), `none` keeps none and says so where weights are asked for, and a relaunch of a pruned
run neither retrains nor changes its results."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_run_overrides
from tltrain.engine.checkpoint import consolidate_checkpoint
from tltrain.errors import DataError
from tltrain.export import export_run
from tltrain.train_app import train_from_overrides


def _train(shards, run_dir, *extra):
    result = train_from_overrides(tiny_run_overrides(shards, run_dir, *extra))
    assert result["status"] == "completed", result
    return result


@pytest.fixture(scope="module")
def full_and_best(fundus_shards, tmp_path_factory):
    base = tmp_path_factory.mktemp("keep")
    full, best = base / "all", base / "best"
    results = _train(fundus_shards, full), _train(fundus_shards, best, "trainer.keep_after_run=best")
    return full, best, results


def test_best_keeps_only_the_tested_weights(full_and_best):
    full, best, (full_result, best_result) = full_and_best
    index = json.loads((best / "checkpoints" / "index.json").read_text())
    assert index["after_run"] == "best" and index["latest"] is None
    assert [c["kind"] for c in index["checkpoints"]] == ["weights"] and index["best"] == index["checkpoints"][0]["name"]
    assert sorted(p.name for p in (best / "checkpoints").iterdir()) == ["index.json", f"{index['best']}.weights.pt"]
    full_index = json.loads((full / "checkpoints" / "index.json").read_text())
    assert len(full_index["checkpoints"]) == 2 and full_index["best"] == index["best"]  # the same best checkpoint
    # same seed, same run: the kept file holds exactly the weights the full run's best checkpoint holds, and the
    # test metrics (computed on the best checkpoint before pruning) are the same
    kept, reference = consolidate_checkpoint(best, "best"), consolidate_checkpoint(full, "best")
    assert kept.keys() == reference.keys() and all(torch.equal(kept[k], reference[k]) for k in kept)
    assert best_result["test"]["kappa"] == full_result["test"]["kappa"]
    assert best_result["test"]["checkpoint"] == index["best"]
    # a run dir as model.weights (step 2 of a two-step transfer) reads the kept weights
    assert all(torch.equal(v, kept[k]) for k, v in consolidate_checkpoint(best).items())


def test_a_pruned_run_exports_its_best_but_not_latest(full_and_best, tmp_path):
    full, best, _ = full_and_best
    meta = export_run(best, tmp_path / "pkg")
    reference = export_run(full, tmp_path / "pkg_full")
    assert meta["checkpoint"] == reference["checkpoint"] and meta["metrics"] == reference["metrics"]
    ours, theirs = load_file(str(tmp_path / "pkg" / "model.safetensors")), load_file(
        str(tmp_path / "pkg_full" / "model.safetensors"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    with pytest.raises(DataError, match=r"keep_after_run=best; only the best checkpoint's weights were kept, "
                                        r"not the training state --which latest needs"):
        export_run(best, tmp_path / "pkg_latest", which="latest")


def test_relaunching_a_pruned_run_changes_nothing(full_and_best, fundus_shards):
    _, best, (_, first) = full_and_best
    before = {name: (best / name).read_bytes() for name in ("metrics.json", "config.yaml", "status.json",
                                                            "predictions_test.csv")}
    event_files = sorted((best / "tb").rglob("events.out.tfevents.*"))
    again = train_from_overrides(tiny_run_overrides(fundus_shards, best, "trainer.keep_after_run=best",
                                                    "schedule.epochs_per_phase=5"))  # a different config: ignored
    assert again["completed_before"] and again["status"] == "completed" and again["exit_code"] == 0
    assert again["test"]["kappa"] == first["test"]["kappa"] and again["step"] == first["step"]
    assert {name: (best / name).read_bytes() for name in before} == before
    assert sorted((best / "tb").rglob("events.out.tfevents.*")) == event_files  # no empty event file added


def test_none_keeps_no_checkpoint_and_says_so(fundus_shards, tmp_path):
    run_dir = tmp_path / "none"
    result = _train(fundus_shards, run_dir, "trainer.keep_after_run=none")
    assert result["test"]["count"] > 0 and (run_dir / "predictions_test.csv").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["index.json"]
    message = r"keep_after_run=none, so its checkpoints were removed and there are no weights for"
    with pytest.raises(DataError, match=message):
        export_run(run_dir, tmp_path / "pkg")
    with pytest.raises(DataError, match=message):
        train_from_overrides(tiny_run_overrides(fundus_shards, tmp_path / "step2", f"model.weights={run_dir}"))


def test_an_unknown_choice_is_one_line(fundus_shards, tmp_path):
    from tltrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"trainer.keep_after_run.*'last'.*all, best, none"):
        train_from_overrides(tiny_run_overrides(fundus_shards, tmp_path / "x", "trainer.keep_after_run=last"))
