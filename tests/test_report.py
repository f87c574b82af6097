"""`tltrain report` on real tiny runs: grouped by initial weights, n and mean ± 95 % t-interval over seeds, one
panel per dataset and label set, bars with a single fraction (the 2-fraction line chart: test_transfer_e2e)."""
import csv
import json
import math

import numpy as np
import pytest
from scipy import stats

from conftest import tiny_run_overrides
from tltrain.report import initial_weights, mean_ci, write_report
from tltrain.train_app import train_from_overrides


@pytest.fixture(scope="module")
def sweep(trained_run, fundus_shards, target_shards, tmp_path_factory):
    """5-grade fundus from scratch (seeds 0 and 1) and the 2-class target domain from scratch and from the fundus
    run: three configurations, two label sets, one fraction."""
    root = tmp_path_factory.mktemp("sweep")
    short = ("schedule.epochs_per_phase=1",)
    for seed in (0, 1):
        train_from_overrides(tiny_run_overrides(fundus_shards, root / f"fundus_s{seed}", f"seed={seed}", *short))
    train_from_overrides(tiny_run_overrides(target_shards, root / "target_scratch", "data.name=target", *short))
    train_from_overrides(tiny_run_overrides(target_shards, root / "target_from_fundus", "data.name=target",
                                            f"model.weights={trained_run}", *short))
    return root


def test_groups_by_initial_weights_with_n_and_t_interval(sweep, trained_run):
    report = write_report(sweep)
    summary = report["summary"]
    assert len(report["rows"]) == 4 and len(summary) == 3
    target = {e["weights"]: e for e in summary if e["data"] == "target"}
    assert set(target) == {"scratch", f"run:{trained_run.name}"}  # not averaged into one row
    fundus = next(e for e in summary if e["data"] == "synthetic_fundus")
    assert fundus["n"] == 2 and fundus["weights"] == "scratch"
    kappas = [json.loads((sweep / f"fundus_s{s}" / "metrics.json").read_text())["test"]["kappa"] for s in (0, 1)]
    half = stats.t.ppf(0.975, 1) * np.std(kappas, ddof=1) / math.sqrt(2)
    assert fundus["kappa"] == pytest.approx(np.mean(kappas)) and fundus["kappa_ci"] == pytest.approx(half)
    assert all(e["n"] == 1 and e["kappa_ci"] is None for e in target.values())  # n = 1: no interval
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert {r["weights"] for r in rows} == {"scratch", f"run:{trained_run.name}"}


def test_one_panel_per_label_set_and_bars_for_one_fraction(sweep):
    report = write_report(sweep)
    text = (sweep / "report.md").read_text()
    panels = [line for line in text.splitlines() if line.startswith("## ") and "classes" in line]
    assert len(panels) == 2 and any("5: " in p for p in panels) and any("2: " in p for p in panels)
    fundus_table = text.split(panels[0])[1].split("## ")[0] if "synthetic_fundus" in panels[0] else \
        text.split(panels[1])[1].split("## ")[0]
    assert "| 2 |" in fundus_table and " ± " in fundus_table and "target" not in fundus_table
    # a panel shows the metrics its runs have: the 2-class target has no top-2 accuracy and no referable metrics
    target_panel = next(p for p in panels if "2: " in p)
    target_header = text.split(target_panel)[1].split("## ")[0].strip().splitlines()[0]
    fundus_header = fundus_table.strip().splitlines()[0]
    assert "top2_accuracy" not in target_header and "sensitivity" not in target_header and "kappa" in target_header
    assert "top2_accuracy" in fundus_header and "sensitivity" in fundus_header
    assert len(report["charts"]) == 2 and set(report["charts"].values()) == {"bars"}
    from PIL import Image

    with Image.open(report["plot"]) as image:
        assert image.size[1] > image.size[0] / 3  # two rows of panels


def test_mean_ci_and_weights_names(tmp_path):
    assert mean_ci([0.5]) == (1, 0.5, None) and mean_ci([None]) == (0, None, None)
    n, mean, half = mean_ci([0.2, 0.4, 0.6])
    assert n == 3 and mean == pytest.approx(0.4) and half == pytest.approx(stats.t.ppf(0.975, 2) * 0.2 / math.sqrt(3))
    package = tmp_path / "fundus_pkg"
    package.mkdir()
    (package / "tltrain.json").write_text("{}")
    assert initial_weights(None) == "scratch" and initial_weights("/models/imagenet_resnet18.pth") == "imagenet"
    assert initial_weights(str(package)) == "package:fundus_pkg"
    assert initial_weights("/runs/step1_fundus") == "run:step1_fundus"
    assert initial_weights(str(package / "model.safetensors")) == "package:fundus_pkg"
    assert initial_weights("/runs/step1/checkpoints/step-00000040.pt") == "run:step1"
    assert initial_weights("/models/resnet50_foo.pth") == "file:resnet50_foo"
