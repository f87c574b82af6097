"""`tltrain pipeline` as one SLURM DAG on the real clusters of slurm/up.sh: on one node, step 1 is preempted (USR2,
SLURM's time-limit warning) and resumes, a grid run fails and cancels the report and the package, `tltrain jobs`
shows the DAG with the reasons, and the same command again submits only the failed grid run and finishes; on two
nodes the same with step 1 training with DDP across both (train.resources.nodes=2).

Every job is a tiny real run (resnet10t at 32 px on the CPU); skipped with the reason when a cluster is not up.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, slurm_cluster_problem, tiny_pipeline_file

ONE_NODE = Path(os.environ.get("TLTRAIN_SLURM_DIR", "/tmp/tltrain-slurm")) / "etc" / "slurm.conf"
TWO_NODES = Path(os.environ.get("TLTRAIN_SLURM_MN_DIR", "/tmp/tltrain-slurm-mn")) / "etc" / "slurm.conf"


def _env(conf: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "TLTRAIN_INTERMEDIATE"}
    env.update(SLURM_CONF=str(conf), OMP_NUM_THREADS="1")
    return env


def _cli(conf: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tltrain.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(conf), cwd=ROOT)


def _jobs_file(out: Path) -> dict:
    try:
        return json.loads((out / ".pipeline" / "jobs.json").read_text())
    except (OSError, ValueError):
        return {}


def _preempt_step1_then_fail_a_grid_run(conf: Path, out: Path, config: Path, cells: list[str], broken: str,
                                        *overrides: str) -> None:
    """Submit the pipeline with one grid run that cannot start (its folder is taken by a file), preempt step 1
    mid-run (USR2: SLURM's time-limit warning), follow the DAG to its end, check what it says, fix the run and
    submit again: only that run, then the report and the package, are submitted, and everything completes."""
    from tltrain.pipeline.dag import stage_rows

    (out / "grid").mkdir(parents=True)
    (out / "grid" / broken).write_text("not a run folder")
    submitted = _cli(conf, "pipeline", str(config), "--slurm", *overrides, timeout=120)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert f"submitted grid: {len(cells)} task(s)" in submitted.stderr  # the whole DAG is queued at once

    train_job = _jobs_file(out)["stages"]["train"]["jobs"]["0"]
    deadline, status = time.time() + 300, {}
    while status.get("step", 0) < 8:  # past the first epoch: the signal lands mid-run
        assert time.time() < deadline, f"step 1 did not reach step 8: {status}"
        time.sleep(0.5)
        try:
            status = json.loads((out / "runs" / "step1" / "status.json").read_text())
        except (OSError, ValueError):
            pass
    subprocess.run(["scancel", "--signal=USR2", train_job], check=True, env=_env(conf))

    followed = _cli(conf, "jobs", str(out), "--watch", "3", timeout=700)
    assert followed.returncode == 1 and "pipeline" in followed.stdout and "CANCELLED" in followed.stdout
    os.environ["SLURM_CONF"] = str(conf)  # stage_rows asks this cluster's sacct
    rows = {r["stage"]: r for r in stage_rows(out)}
    assert all(rows[s]["state"] == "COMPLETED" for s in ("prepare:fundus:finish", "prepare:target:finish", "train",
                                                         "export", "evaluate:fundus")), rows
    log = "".join(p.read_text() for p in (out / ".pipeline" / "logs" / "train").glob("*/*_log.out"))
    assert "handing over to submitit to requeue" in log and "(attempt 2)" in log and "resumed from step-" in log
    assert rows["grid"]["state"] == "FAILED" and rows["grid"]["done"] == len(cells) - 1, rows["grid"]
    assert broken in rows["grid"]["reason"] and "DataError" in rows["grid"]["reason"], rows["grid"]
    assert rows["report"]["state"] == "CANCELLED" and "grid" in rows["report"]["reason"], rows["report"]
    assert rows["package"]["state"] == "CANCELLED" and "report" in rows["package"]["reason"], rows["package"]

    (out / "grid" / broken).unlink()
    again = _cli(conf, "pipeline", str(config), "--slurm", "--wait", *overrides, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "submitted grid: 1 task(s)" in again.stderr and "submitted train" not in again.stderr
    assert all(r["state"] == "COMPLETED" for r in stage_rows(out))
    assert _cli(conf, "jobs", str(out)).returncode == 0  # the DAG completed (the failed job is history)
    card = (out / "package" / "tiny_fundus" / "README.md").read_text()
    assert "## Does it transfer?" in card and f"{len(cells)} runs, {len(cells)} completed" in card


@pytest.mark.slurm
@pytest.mark.timeout(900)
@pytest.mark.skipif(bool(slurm_cluster_problem(ONE_NODE)), reason=str(slurm_cluster_problem(ONE_NODE)))
def test_pipeline_dag_survives_a_preemption_and_a_failed_grid_run(tmp_path, fundus_raw, dme_raw):
    from tltrain.pipeline.config import compose_pipeline
    from tltrain.pipeline.stages import grid_cells

    out = tmp_path / "pipe"
    config = tiny_pipeline_file(tmp_path / "tiny.yaml", out, fundus_raw, dme_raw,
                                train=("schedule.epochs_per_phase=4",))
    cells = [name for name, _ in grid_cells(compose_pipeline(str(config)))]
    _preempt_step1_then_fail_a_grid_run(ONE_NODE, out, config, cells, cells[2])


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.timeout(900)
@pytest.mark.skipif(bool(slurm_cluster_problem(TWO_NODES, min_nodes=2, up="sudo bash slurm/up.sh --nodes 2")),
                    reason=str(slurm_cluster_problem(TWO_NODES, min_nodes=2, up="sudo bash slurm/up.sh --nodes 2")))
def test_pipeline_on_two_nodes_survives_a_preemption_and_a_failed_grid_run(tmp_path, fundus_raw, dme_raw):
    """Step 1 with DDP on both nodes (train.resources.nodes=2), preempted and resumed across them."""
    from tltrain.pipeline.config import compose_pipeline
    from tltrain.pipeline.stages import grid_cells

    out = tmp_path / "pipe"
    config = tiny_pipeline_file(tmp_path / "tiny.yaml", out, fundus_raw, dme_raw,
                                train=("trainer=ddp", "device=cpu", "loader.batch_size=4",
                                       "schedule.epochs_per_phase=3"),
                                sweep=("schedule=linear_probe", "data.fraction=1.0", "seed=0"))
    cells = [name for name, _ in grid_cells(compose_pipeline(str(config)))]
    _preempt_step1_then_fail_a_grid_run(TWO_NODES, out, config, cells, cells[0], "train.resources.nodes=2")
    status = json.loads((out / "runs" / "step1" / "status.json").read_text())
    assert status["state"] == "completed" and status["world_size"] == 2
    train_job = _jobs_file(out)["stages"]["train"]["jobs"]["0"]
    nodes = subprocess.run(["sacct", "-X", "-n", "-P", "-j", train_job, "-o", "NodeList"], capture_output=True,
                           text=True, env=_env(TWO_NODES), check=True).stdout.split()
    assert nodes and nodes[0] == "n[1-2]", nodes
