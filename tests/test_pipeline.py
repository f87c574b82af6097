"""`tltrain pipeline` on this machine (submitit's local executor), as a user runs it: a YAML of their own from
another working directory; tiny real stages (prepare arrays, step 1, export, evaluate, a 4-run THTL grid, report,
package). One grid run fails on the first pass (its run folder is taken by a file): the report and the package are
cancelled, naming the grid; `tltrain jobs` shows the DAG; the second pass runs only that run and finishes. The
published folder is a Hugging Face model repository that timm loads."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import tiny_pipeline_file
from tltrain.errors import ConfigError
from tltrain.pipeline.config import compose_pipeline
from tltrain.pipeline.stages import build_stages, grid_cells


def _cli(args, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TLTRAIN_INTERMEDIATE"}
    return subprocess.run([sys.executable, "-m", "tltrain.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_shipped_demo_pipeline_is_the_full_thtl_grid(tmp_path):
    cfg = compose_pipeline("demo", [f"out={tmp_path / 'demo'}"])
    stages = build_stages(cfg)
    names = [s.name for s in stages]
    assert names.index("train") > names.index("prepare:fundus:finish")
    assert names[-1] == "package" and set(stages[-1].after) == {"evaluate:fundus", "report"}
    grid = stages[names.index("grid")]
    assert grid.tasks == 54 and set(grid.after) == {"export", "prepare:target:finish"}
    assert [s.tasks for s in stages[:3]] == [2, 2, 1]  # check and write arrays, one finish job
    weights = {o for spec in grid.specs for o in spec["overrides"] if o.startswith("model.weights=")}
    assert weights == {"model.weights=null", f"model.weights={cfg.export_dir}"}  # the exported package
    # the interpolation meant for each run reaches it unresolved
    assert "trainer.keep_after_run='${tltrain_best_if_whole:${data.fraction}}'" in grid.specs[0]["overrides"]
    # cell folders do not depend on whether the package exists yet (a re-run finds the same folders)
    before = [name for name, _ in grid_cells(cfg)]
    (cfg.export_dir).mkdir(parents=True)
    (cfg.export_dir / "tltrain.json").write_text("{}")
    assert [name for name, _ in grid_cells(cfg)] == before and len(set(before)) == 54


def test_fingerprints_follow_upstream_settings(tmp_path):
    one = build_stages(compose_pipeline("demo", [f"out={tmp_path}"]))
    two = build_stages(compose_pipeline("demo", [f"out={tmp_path}", "sources.fundus.tasks=4"]))
    changed = {a.name for a, b in zip(one, two) if a.fingerprints != b.fingerprints}
    assert {"prepare:fundus:check", "train", "export", "grid", "package"} <= changed
    assert "prepare:target:check" not in changed  # the target's stages do not depend on the fundus source


@pytest.mark.parametrize("overrides, message", [
    (["sources.fundus.prepare=['out=/elsewhere']"], "set by the pipeline"),
    (["train.overrides=['run_dir=/x']"], "set by the pipeline"),
    (["name=a/b"], "letters, digits"),
    (["~sources"], "at least one"),
    (["~target"], "a grid needs a target"),
    (["grid.runs_at_once=0"], "runs_at_once"),
    (["launch.nodes=2"], "per stage"),
    (["evaluate.splits=[]"], "at least one split"),
    (["unknown=1"], "unknown key"), (["grid.runs_at_onc=3"], "runs_at_onc"),
])
def test_bad_pipeline_configs_fail_in_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_pipeline("demo", [f"out={tmp_path}", *overrides])


def test_unknown_pipeline_names_the_shipped_ones():
    with pytest.raises(ConfigError, match="demo"):
        compose_pipeline("no_such_pipeline")


@pytest.mark.timeout(900)
def test_local_pipeline_fails_one_grid_run_then_resumes_and_publishes(tmp_path, fundus_raw, dme_raw):
    out = tmp_path / "pipe"
    config = tiny_pipeline_file(tmp_path / "tiny.yaml", out, fundus_raw, dme_raw)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    cells = [name for name, _ in grid_cells(compose_pipeline(str(config)))]
    (out / "grid").mkdir(parents=True)
    (out / "grid" / cells[1]).write_text("not a run folder")  # this grid run cannot start

    first = _cli(["pipeline", str(config), "--local"], cwd)
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    jobs = _cli(["jobs", str(out), "--tail", "3"], cwd)
    assert "pipeline" in jobs.stdout and "prepare:fundus:write" in jobs.stdout
    from tltrain.pipeline.dag import stage_rows

    rows = {r["stage"]: r for r in stage_rows(out)}
    assert all(rows[s]["state"] == "COMPLETED" for s in ("prepare:fundus:finish", "train", "export",
                                                         "evaluate:fundus")), rows
    assert rows["grid"]["state"] == "FAILED" and rows["grid"]["done"] == 3
    assert "1 of 4 task(s)" in rows["grid"]["reason"] and cells[1] in rows["grid"]["reason"], rows["grid"]
    assert rows["report"]["state"] == "CANCELLED" and "grid" in rows["report"]["reason"]
    assert rows["package"]["state"] == "CANCELLED" and "report" in rows["package"]["reason"]
    records = {p.name: p.stat().st_mtime_ns for p in (out / ".pipeline" / "records").rglob("*.json")}

    (out / "grid" / cells[1]).unlink()  # the user fixes it and runs the same command again
    second = _cli(["pipeline", str(config), "--local"], cwd)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    jobs = json.loads((out / ".pipeline" / "jobs.json").read_text())
    assert list(jobs["stages"]["grid"]["jobs"]) == ["1"]  # only the failed run ran again
    assert "prepare:fundus:check: done (recorded)" in second.stderr
    kept = {p.name: p.stat().st_mtime_ns for p in (out / ".pipeline" / "records").rglob("*.json")}
    assert all(kept[name] == stamp for name, stamp in records.items())  # finished tasks were not redone
    assert all(r["state"] == "COMPLETED" for r in stage_rows(out))

    package = out / "package" / "tiny_fundus"
    card = (package / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "cc-by-4.0" and front["library_name"] == "timm"
    assert front["datasets"] == ["fundus", "target"]
    [result] = front["model-index"][0]["results"]
    assert result["dataset"]["split"] == "test"
    kappa = next(m for m in result["metrics"] if m["type"] == "cohen_kappa")
    assert kappa["args"]["ci_low"] <= kappa["value"] <= kappa["args"]["ci_high"]
    assert "## Test metrics per source" in card and "## Does it transfer?" in card
    assert "(transfer.png)" in card and (package / "transfer.png").stat().st_size > 5_000
    record = json.loads((package / "tltrain_pipeline.json").read_text())
    assert record["evaluations"][0]["splits"]["test"]["ci"]["kappa"]["low"] <= kappa["value"]
    assert record["transfer"]["counts"] == "4 runs, 4 completed"
    # the publishable folder is the export plus the card: same weights, same digest, and timm loads it
    from tltrain.export.package_format import package_digest

    assert (package / "SHA256SUMS").read_bytes() == (out / "export" / "tiny_fundus" / "SHA256SUMS").read_bytes()
    assert record["package_digest"] == package_digest((package / "SHA256SUMS").read_bytes())
    import timm
    import torch

    model = timm.create_model(f"local-dir:{package}", pretrained=True)
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 5)

    # a third run submits nothing
    third = _cli(["pipeline", str(config), "--local"], cwd)
    assert third.returncode == 0 and "===" not in third.stdout, third.stdout[-2000:]
