"""What a pipeline keeps in <out>/.pipeline/: each done task's record (the only thing that makes it "done") and the
jobs the last `tltrain pipeline` submitted per stage, with the DAG it submitted them for (jobs.json)."""
from __future__ import annotations

import os
import time
from pathlib import Path

from tltrain import safe_io
from tltrain.errors import DataError

STATE_DIR = ".pipeline"
RECORD_LIMIT = 4 * safe_io.MiB


def record_path(root: str | Path, stage: str, task: int) -> Path:
    return Path(root) / STATE_DIR / "records" / stage.replace(":", "-") / f"{task}.json"


def write_record(root: str | Path, stage: str, task: int, fingerprint: str, result: dict) -> None:
    """The task's record (rank 0 only), written atomically: it is what tells a re-run that this task is done."""
    if os.environ.get("RANK", "0") != "0":
        return
    path = record_path(root, stage, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    safe_io.atomic_write_json(path, {"stage": stage, "task": task, "fingerprint": fingerprint, "state": "completed",
                                     "result": result, "finished": time.time(),
                                     "job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_JOB_ID")})


def read_record(root: str | Path, stage: str, task: int) -> dict | None:
    """A task's record, or None when there is none; a damaged one is a DataError naming the file."""
    path = record_path(root, stage, task)
    if not os.path.lexists(path):
        return None
    record = safe_io.load_json_object(path, RECORD_LIMIT, "pipeline record")
    if record.get("state") != "completed" or not isinstance(record.get("fingerprint"), str):
        raise DataError(f"{path}: not a completed task's record (state {record.get('state')!r})")
    return record


def load_results(root: str | Path, stage: str) -> list[dict]:
    """The results of a stage's completed tasks, in task order (for the stages after it)."""
    folder = record_path(root, stage, 0).parent
    if not folder.is_dir():
        return []
    tasks = sorted(int(path.stem) for path in folder.glob("*.json") if path.stem.isdigit())
    return [read_record(root, stage, task)["result"] for task in tasks]


JOBS_FILE = "jobs.json"


def state_dir(root: str | Path) -> Path:
    return Path(root) / STATE_DIR


def read_jobs(root: str | Path) -> dict:
    """{"dag": [stage entries], "stages": {stage: {"executor", "jobs": {task: job id}, "cancelled"?}}}."""
    path = state_dir(root) / JOBS_FILE
    if not path.exists():
        return {"stages": {}, "dag": []}
    return safe_io.load_json_object(path, 16 * safe_io.MiB, "pipeline jobs file")


def write_jobs(root: str | Path, jobs: dict) -> None:
    safe_io.atomic_write_json(state_dir(root) / JOBS_FILE, jobs)


def pipeline_root(where: str | Path) -> Path | None:
    """`where` when it is a pipeline's folder (it holds .pipeline/jobs.json), else None."""
    path = Path(where).resolve()
    return path if (path / STATE_DIR / JOBS_FILE).is_file() else None


def stages_named(root: str | Path, prefix: str) -> list[str]:
    return [str(e["stage"]) for e in read_jobs(root).get("dag", []) if str(e["stage"]).startswith(prefix)]


def stage_seconds(root: str | Path) -> dict[str, float]:
    """Per stage, seconds from its last submission to its last task's record (wall clock on the local executor;
    on SLURM it includes the time in the queue)."""
    jobs, seconds = read_jobs(root), {}
    for entry in jobs.get("dag", []):
        name = str(entry["stage"])
        submitted = (jobs.get("stages", {}).get(name) or {}).get("submitted")
        finished = [r.get("finished") for r in (read_record(root, name, t) for t in range(int(entry["tasks"]))) if r]
        if isinstance(submitted, (int, float)) and finished and all(isinstance(f, (int, float)) for f in finished):
            seconds[name] = max(finished) - submitted
    return seconds
