"""The finding of a THTL-shaped sweep (tltrain/finding.py) and the `+experiment=thtl` grid users run on real data.

The interval is checked against scipy's own Welch test; the sentence against sweeps whose answer is known by
construction; the report against run folders as the trainer writes them (config.yaml, metrics.json, status.json);
the experiment config by expanding its sweep exactly as Hydra does and validating every one of the 54 runs against
real shards.
"""
import itertools
import json

import numpy as np
import pytest
import yaml
from scipy import stats

from tltrain.config import compose
from tltrain.finding import compare, finding_sentence, thtl_comparisons, welch_interval
from tltrain.report import write_report
from tltrain.train_app import load_run_config

STEP1 = "run:step1_fundus"


def _rows(values: dict) -> list[dict]:
    """values: {(schedule, weights, fraction): [kappa per seed]} -> report rows."""
    rows = []
    for (schedule, weights, fraction), kappas in values.items():
        for seed, kappa in enumerate(kappas):
            rows.append({"status": "completed", "schedule": schedule, "weights": weights, "fraction": fraction,
                         "seed": seed, "kappa": kappa, "auc": (kappa + 1) / 2})
    return rows


def _grid(swft_fundus, swft_scratch, last_fundus, fraction=0.1):
    return _rows({("swft", STEP1, fraction): swft_fundus, ("swft", "scratch", fraction): swft_scratch,
                  ("linear_probe", STEP1, fraction): last_fundus, ("linear_probe", "scratch", fraction): [0.1] * 3,
                  ("finetune_all", STEP1, fraction): [0.5, 0.52, 0.54],
                  ("finetune_all", "scratch", fraction): [0.3, 0.31, 0.35]})


@pytest.mark.parametrize("seed", range(5))
def test_welch_interval_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0.6, 0.05, 3), rng.normal(0.5, 0.1, 4)
    diff, low, high = welch_interval(list(a), list(b))
    expected = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert diff == pytest.approx(a.mean() - b.mean())
    assert (low, high) == pytest.approx((expected.low, expected.high))


def test_no_interval_below_two_seeds():
    assert welch_interval([0.5], [0.3, 0.4]) == (pytest.approx(0.15), None, None)


def test_sentence_when_both_effects_are_clear():
    rows = _grid([0.70, 0.72, 0.71], [0.30, 0.35, 0.32], [0.50, 0.52, 0.49])
    sentence = finding_sentence(thtl_comparisons(rows))
    assert sentence.startswith("With 10 % of the target's training images, starting from run:step1_fundus raised ")
    assert "SWFT beat last-layer-only" in sentence and "95 % CI [+" in sentence and "n = 3 seeds" in sentence
    assert "0.710 ± " in sentence  # the mean of SWFT from step 1 with its own interval


def test_sentence_says_so_when_swft_does_not_beat_last_layer():
    rows = _grid([0.55, 0.70, 0.60], [0.30, 0.35, 0.32], [0.58, 0.66, 0.62])
    sentence = finding_sentence(thtl_comparisons(rows))
    assert "SWFT did not clearly beat last-layer-only" in sentence
    rows = _grid([0.40, 0.41, 0.42], [0.30, 0.35, 0.32], [0.60, 0.61, 0.62])
    assert "SWFT fell below last-layer-only" in finding_sentence(thtl_comparisons(rows))
    rows = _grid([0.30, 0.36, 0.31], [0.30, 0.35, 0.32], [0.20, 0.21, 0.22])
    assert "did not clearly change SWFT's test kappa" in finding_sentence(thtl_comparisons(rows))


def test_smallest_fraction_with_both_questions_and_every_comparison():
    rows = _grid([0.7, 0.72, 0.71], [0.3, 0.35, 0.32], [0.5, 0.52, 0.49], fraction=0.25) + \
        _grid([0.8, 0.82, 0.81], [0.7, 0.75, 0.72], [0.6, 0.62, 0.59], fraction=1.0)
    comparisons = thtl_comparisons(rows)
    assert len(comparisons) == 2 * 5  # per fraction: 3 schedules vs scratch, SWFT vs last-layer and vs fine-tune-all
    assert finding_sentence(comparisons).startswith("With 25 % ")
    one = compare(rows, "kappa", 1.0, ("swft", STEP1), ("swft", "scratch"))
    assert one.diff == pytest.approx(np.mean([0.8, 0.82, 0.81]) - np.mean([0.7, 0.75, 0.72]))


def test_not_a_thtl_sweep_has_no_finding():
    rows = _rows({("swft", "scratch", 1.0): [0.5, 0.6], ("finetune_all", "scratch", 1.0): [0.4, 0.5]})
    assert thtl_comparisons(rows) == [] and finding_sentence([]) is None


def test_report_of_run_folders_states_the_finding(tmp_path):
    """Run folders as the trainer leaves them: the report adds the comparisons and the sentence, and plots test
    kappa and AUC against the fraction with one line per (schedule, initial weights)."""
    kappas = {("swft", "/runs/step1_fundus"): [0.7, 0.72, 0.71], ("swft", None): [0.3, 0.35, 0.32],
              ("linear_probe", "/runs/step1_fundus"): [0.5, 0.52, 0.49]}
    for index, ((schedule, weights), values) in enumerate(kappas.items()):
        for fraction in (0.1, 1.0):
            for seed, kappa in enumerate(values):
                run = tmp_path / f"{index}_{schedule}_{fraction}_{seed}"
                run.mkdir()
                config = {"data": {"name": "target", "fraction": fraction, "shards": None},
                          "schedule": {"name": schedule}, "model": {"arch": "resnet18", "weights": weights},
                          "seed": seed}
                (run / "config.yaml").write_text(yaml.safe_dump(config))
                kappa = kappa if fraction == 0.1 else kappa + 0.1
                (run / "metrics.json").write_text(json.dumps({"test": {"kappa": kappa, "auc": (1 + kappa) / 2}}))
                (run / "status.json").write_text(json.dumps({"state": "completed"}))
    report = write_report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert report["finding"] and report["finding"] in text and "## Two-step transfer: comparisons" in text
    assert "| 10 % | kappa | SWFT from run:step1_fundus | SWFT from scratch |" in text
    assert "| 100 % | auc |" in text
    assert list(report["charts"].values()) == ["vs_fraction"]


def _sweep_values(config) -> dict[str, list]:
    """hydra.sweeper.params expanded with Hydra's own override parser (what the basic sweeper does)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    params = config.hydra.sweeper.params
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(params, resolve=False)
    return {key: [v for v in parser.parse_override(f"{key}={value}").sweep_iterator()] for key, value in raw.items()}


def test_thtl_experiment_is_the_54_run_grid_and_every_run_validates(trained_run, target_shards, monkeypatch):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from tltrain.config import CONFIG_DIR, register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        config = hydra_compose("config", ["+experiment=thtl"], return_hydra_config=True)
    grid = _sweep_values(config)
    assert grid["schedule"] == ["linear_probe", "swft", "finetune_all"]
    assert grid["data.fraction"] == [0.1, 0.25, 1.0] and grid["seed"] == [0, 1, 2]
    assert grid["model.weights"] == [None, "${oc.env:TLTRAIN_INTERMEDIATE}"]
    monkeypatch.setenv("TLTRAIN_INTERMEDIATE", str(trained_run))
    runs = list(itertools.product(*grid.values()))
    assert len(runs) == 54
    seen = set()
    for values in runs:
        overrides = [f"{k}={'null' if v is None else v}" for k, v in zip(grid, values)]
        run = load_run_config(compose("config", ["+experiment=thtl", f"data.shards={target_shards}", *overrides]))
        assert run.schedule.name == values[list(grid).index("schedule")]
        assert run.model.weights in (None, str(trained_run)) and run.loader.size == 512
        assert run.trainer.keep_after_run == "best"  # 54 runs of full checkpoints would fill a disk
        seen.add((run.model.weights, run.schedule.name, run.data.fraction))
    assert len(seen) == 18  # every (weights, schedule, fraction) once per seed
