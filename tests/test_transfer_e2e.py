"""A two-step chain end to end (fundus -> target domain, SWFT and last-layer-only), features+SVM, and a
2-point fraction sweep aggregated by `tltrain report`."""
import json

import numpy as np

from conftest import tiny_run_overrides
from tltrain.metrics import compute_metrics
from tltrain.report import write_report
from tltrain.transfer.features import load_classifier
from tltrain.train_app import train_from_overrides


def test_two_step_chain(trained_run, target_shards, tmp_path):
    for schedule in ("swft", "linear_probe"):
        run_dir = tmp_path / f"step2_{schedule}"
        result = train_from_overrides(tiny_run_overrides(
            target_shards, run_dir, f"schedule={schedule}", f"model.weights={trained_run}",
            "schedule.epochs_per_phase=1", "schedule.max_steps=2", "data.name=synthetic_target"))
        assert result["status"] == "completed" and result["test"]["count"] > 0
        report = json.loads((run_dir / "weights_report.json").read_text())
        assert len(report["matched"]) > 10
        assert {k for k, _, _ in report["mismatched"]} == {"fc.weight", "fc.bias"}  # 5 grades -> 2 classes
        assert len(result["final"]["confusion"]) == 2


def test_features_svm_path(trained_run, target_shards, tmp_path):
    result = train_from_overrides(tiny_run_overrides(target_shards, tmp_path / "svm", "schedule=features_svm",
                                                     f"model.weights={trained_run}"))
    assert result["status"] == "completed" and 0 <= result["test"]["accuracy"] <= 1
    assert not (tmp_path / "svm" / "classifier.joblib").exists()  # no pickle: arrays + JSON
    head = load_classifier(tmp_path / "svm")  # the saved head gives the metrics the run reported
    feats = np.load(next((tmp_path / "svm" / "features" / "test").glob("features-*.npz")))
    probs = head.predict_proba(feats["features"], num_classes=2)
    assert compute_metrics(probs, feats["labels"])["accuracy"] == result["test"]["accuracy"]
    assert list((tmp_path / "svm" / "features" / "train").glob("features-*.npz"))


def test_fraction_sweep_report(fundus_shards, tmp_path):
    sweep = tmp_path / "sweep"
    for fraction in (0.4, 1.0):
        result = train_from_overrides(tiny_run_overrides(fundus_shards, sweep / f"f{fraction}",
                                                         f"data.fraction={fraction}", "schedule.epochs_per_phase=1"))
        assert result["status"] == "completed"
    report = write_report(sweep)
    assert len(report["rows"]) == 2 and {r["fraction"] for r in report["rows"]} == {0.4, 1.0}
    text = (sweep / "report.md").read_text()
    assert "| finetune_all | resnet10t |" in text and report["plot"] and (sweep / "report.csv").exists()
