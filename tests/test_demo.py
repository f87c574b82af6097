"""`tltrain demo --quick`, the main job at its small size, as a user starts it from another working directory:
synthetic data, then configs/pipeline/demo.yaml through submitit's local executor (shards -> step 1 -> export ->
evaluate -> the step-2 grid -> report with the finding and LayerCAM -> the publishable package). One grid run is
then started again by hand from its recorded overrides and must give the same test numbers (every run
deterministic), and a second `tltrain demo` continues instead of redoing anything."""
import json
import os
import subprocess
import sys

import pytest
import yaml


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_demo_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TLTRAIN_INTERMEDIATE"}
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "tltrain.cli", "demo", "--quick", "--out", "demo"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    finding = [line for line in done.stdout.splitlines() if line.startswith("FINDING: ")]
    assert finding and finding[0].startswith("FINDING: With 25 % of the target's training images, starting from "
                                             "package:synthetic_fundus_resnet18"), done.stdout[-2000:]
    assert "95 % CI [" in finding[0] and "n = 2 seeds" in finding[0]

    grid = out / "grid"
    runs = sorted(p.parent for p in grid.glob("*/status.json"))
    assert len(runs) == 16 and all(json.loads((r / "status.json").read_text())["state"] == "completed" for r in runs)
    report = (grid / "report.md").read_text()
    assert "## Two-step transfer: comparisons" in report and (grid / "report.png").stat().st_size > 10_000
    package = out / "package" / "synthetic_fundus_resnet18"
    assert json.loads((package / "tltrain.json").read_text())["num_classes"] == 5
    card = (package / "README.md").read_text()
    assert (package / "layercam.png").stat().st_size > 10_000 and "## What it looks at" in card
    assert card.startswith("---\nlibrary_name: timm") and "## Test metrics per source" in card
    assert "## Does it transfer?" in card and (package / "lesion_maps.png").is_file()

    # LayerCAM where the lesions are known: a figure, example maps and a sentence in the report; on models trained
    # on the target, the best stage points at the lesions far more often than a uniform map would
    layercam = [line for line in done.stdout.splitlines() if line.startswith("LAYERCAM: ")]
    assert layercam and "Pointing game per stage" in layercam[0] and "a uniform map" in layercam[0]
    assert "## What the networks look at (LayerCAM)" in report and "lesion_maps.png" in report
    assert (grid / "lesion_maps.png").stat().st_size > 10_000 and (grid / "lesion_examples.png").is_file()
    measured = json.loads((grid / "lesion_maps.json").read_text())["summary"]
    configs = {(e["weights"], e["schedule"]) for e in measured}
    assert configs == {("scratch", "linear_probe"), ("scratch", "swft"), ("step 1", "linear_probe"), ("step 1", "swft")}
    for config in configs:
        best = max(e["pointing"] for e in measured if (e["weights"], e["schedule"]) == config)
        assert best > 2 * measured[0]["uniform"], (config, best, measured[0]["uniform"])
    # the grid keeps no weights: the whole-fraction runs' were removed after measuring, the others kept none
    assert not [p for r in runs for p in (r / "checkpoints").glob("step-*")]

    # one grid run again, by hand, from the overrides the pipeline recorded for its job: the same test numbers
    run = next(r for r in runs if r.name.endswith("_swft_1.0_0") and "step1" in r.name)
    from tltrain.launch.jobs import read_registry

    entry = next(e for e in read_registry(out / ".tltrain_jobs.jsonl") if e["run_dir"] == str(run))
    overrides = [o for o in entry["overrides"] if not o.startswith(("pipeline_stage=", "task="))]
    weights = yaml.safe_load((run / "config.yaml").read_text())["model"]["weights"]
    assert weights == str(out / "export" / "synthetic_fundus_resnet18")
    again = tmp_path / "again"
    rerun = subprocess.run([sys.executable, "-m", "tltrain.cli", "train", *overrides, f"run_dir={again}"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert yaml.safe_load((again / "config.yaml").read_text())["model"]["weights"] == weights
    first, second = (json.loads((d / "metrics.json").read_text())["test"] for d in (run, again))
    assert {k: first[k] for k in ("kappa", "auc", "accuracy", "confusion")} == \
        {k: second[k] for k in ("kappa", "auc", "accuracy", "confusion")}

    # a second demo continues: every step is found complete
    resumed = subprocess.run([sys.executable, "-m", "tltrain.cli", "demo", "--quick", "--out", "demo"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "package: done (recorded)" in resumed.stderr, resumed.stderr[-2000:]
    assert "=== pipeline stage" not in resumed.stdout
    assert resumed.stdout.splitlines()[-1] == finding[0]
