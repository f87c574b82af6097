"""`tltrain pipeline` as one SLURM DAG on the real clusters of slurm/up.sh: on one node, step 1 is preempted (USR2,
SLURM's time-limit warning) and resumes, a grid run fails and cancels the report and the package, `tltrain jobs`
shows the DAG with the reasons, and the same command again submits only the failed grid run and finishes; on two
nodes, step 1 trains with DDP across both (the chain of `tltrain pipeline` with train.resources.nodes=2).

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
    (out / "grid").mkdir(parents=True)
    (out / "grid" / cells[2]).write_text("not a run folder")  # this grid run fails

    submitted = _cli(ONE_NODE, "pipeline", str(config), "--slurm", timeout=120)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "submitted grid: 4 task(s)" in submitted.stderr  # the whole DAG is queued at once

    # preempt step 1 mid-run: it checkpoints, requeues itself and resumes; the stages after it keep waiting
    train_job = _jobs_file(out)["stages"]["train"]["jobs"]["0"]
    deadline, status = time.time() + 300, {}
    while status.get("step", 0) < 8:
        assert time.time() < deadline, f"step 1 did not reach step 8: {status}"
        time.sleep(0.5)
        try:
            status = json.loads((out / "runs" / "step1" / "status.json").read_text())
        except (OSError, ValueError):
            pass
    subprocess.run(["scancel", "--signal=USR2", train_job], check=True, env=_env(ONE_NODE))

    followed = _cli(ONE_NODE, "jobs", str(out), "--watch", "3", timeout=700)
    assert "pipeline" in followed.stdout and "grid" in followed.stdout
    from tltrain.pipeline.dag import stage_rows

    os.environ["SLURM_CONF"] = str(ONE_NODE)
    rows = {r["stage"]: r for r in stage_rows(out)}
    assert all(rows[s]["state"] == "COMPLETED" for s in ("prepare:fundus:finish", "prepare:target:finish", "train",
                                                         "export", "evaluate:fundus")), rows
    log = next((out / ".pipeline" / "logs" / "train").glob("*/*_0_log.out")).read_text()
    assert "handing over to submitit to requeue" in log and "(attempt 2)" in log and "resumed from step-" in log
    assert rows["grid"]["state"] == "FAILED" and rows["grid"]["done"] == 3, rows["grid"]
    assert cells[2] in rows["grid"]["reason"]
    assert rows["report"]["state"] == "CANCELLED" and "grid" in rows["report"]["reason"], rows["report"]
    assert rows["package"]["state"] == "CANCELLED" and "report" in rows["package"]["reason"], rows["package"]

    (out / "grid" / cells[2]).unlink()
    again = _cli(ONE_NODE, "pipeline", str(config), "--slurm", "--wait", timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "submitted grid: 1 task(s)" in again.stderr and "submitted train" not in again.stderr
    assert all(r["state"] == "COMPLETED" for r in stage_rows(out))
    card = (out / "package" / "tiny_fundus" / "README.md").read_text()
    assert "## Does it transfer?" in card and "4 runs, 4 completed" in card


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.timeout(900)
@pytest.mark.skipif(bool(slurm_cluster_problem(TWO_NODES, min_nodes=2, up="sudo bash slurm/up.sh --nodes 2")),
                    reason=str(slurm_cluster_problem(TWO_NODES, min_nodes=2, up="sudo bash slurm/up.sh --nodes 2")))
def test_pipeline_trains_step1_on_two_nodes(tmp_path, fundus_raw, dme_raw):
    out = tmp_path / "pipe"
    config = tiny_pipeline_file(tmp_path / "tiny.yaml", out, fundus_raw, dme_raw,
                                train=("trainer=ddp", "device=cpu"), sweep=("schedule=linear_probe",
                                                                            "data.fraction=1.0", "seed=0"))
    done = _cli(TWO_NODES, "pipeline", str(config), "--slurm", "--wait", "train.resources.nodes=2", timeout=800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    status = json.loads((out / "runs" / "step1" / "status.json").read_text())
    assert status["state"] == "completed" and status["world_size"] == 2
    train_job = _jobs_file(out)["stages"]["train"]["jobs"]["0"]
    nodes = subprocess.run(["sacct", "-X", "-n", "-P", "-j", train_job, "-o", "NodeList"], capture_output=True,
                           text=True, env=_env(TWO_NODES), check=True).stdout.split()
    assert nodes and nodes[0] == "n[1-2]", nodes
    assert (out / "package" / "tiny_fundus" / "model.safetensors").is_file()
