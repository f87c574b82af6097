"""The job registry and `tltrain jobs`: what was submitted, what SLURM says about it, and how far each run got.

Every submission appends one JSON line to <root>/.tltrain_jobs.jsonl (job id, run dir, overrides, submitit
folder, stderr log, time). `list_jobs` joins those lines with SLURM's accounting (sacct, or squeue when
accounting is down) and with each run's own status.json / metrics.json. The run's status wins over SLURM's
when it says "failed": a Hydra sweep job that caught its run's error ends COMPLETED for SLURM. A status that
says "running" while the run's lock is free (or its pid is gone on this host) is shown as STALE: the process
died without writing its end (kill -9, lost node); resubmitting the run resumes it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tltrain.engine.rundir import is_stale
from tltrain.errors import DataError
from tltrain.launch.config import DEFAULT_ROOT

REGISTRY_NAME = ".tltrain_jobs.jsonl"
#: SLURM end states that mean the job did not finish its work.
SLURM_BAD_STATES = ("FAILED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                    "PREEMPTED")


def registry_path(root: str | Path, registry: str | Path | None = None) -> Path:
    """The registry file: the one configured (e.g. ~/.tltrain/jobs.jsonl), else <root>/.tltrain_jobs.jsonl."""
    return Path(registry).expanduser() if registry else Path(root) / REGISTRY_NAME


def record_job(path: str | Path, entry: dict) -> Path:
    """Append one submission to the registry file (one short write: safe from parallel array tasks)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(entry, sort_keys=True) + "\n"
    with open(path, "a") as handle:
        handle.write(line)
    return path


def read_registry(path: str | Path) -> list[dict]:
    """Entries of one registry file; a damaged line is an error naming the file and line."""
    path = Path(path)
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
    return entries


def registry_files(where: str | Path) -> list[Path]:
    """A registry file itself, or every registry under a folder (submit's root and Hydra sweep folders)."""
    where = Path(where)
    if where.is_file():
        return [where]
    if not where.is_dir():
        raise DataError(f"{where}: no such registry file or folder")
    return sorted(where.rglob(REGISTRY_NAME))


def slurm_states(job_ids: list[str]) -> dict[str, dict]:
    """{job id: {"state", "start", "end", "exit_code"}} from sacct; squeue (state only) if sacct fails."""
    if not job_ids:
        return {}
    fields = ("JobID", "State", "Start", "End", "ExitCode", "Reason")
    try:
        out = subprocess.run(["sacct", "-j", ",".join(job_ids), "--parsable2", "-X", "--noheader",
                              f"--format={','.join(fields)}"], capture_output=True, text=True, timeout=30,
                             check=True).stdout
        rows = [dict(zip(("job_id", "state", "start", "end", "exit_code", "reason"), line.split("|")))
                for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        try:
            out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T|%r"], capture_output=True,
                                 text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return {}
        rows = [dict(zip(("job_id", "state", "reason"), line.split("|"))) for line in out.splitlines() if line.strip()]
    states = {}
    for row in rows:
        row["state"] = row["state"].split()[0]  # "CANCELLED by 0" -> CANCELLED
        states[row["job_id"]] = row
    for job_id in job_ids:  # a pending array is one line "123_[0-2]" until its tasks start
        base, _, task = job_id.partition("_")
        if job_id not in states and task:
            pending = next((r for k, r in states.items() if k.startswith(f"{base}_[")), None)
            if pending:
                states[job_id] = {**pending, "job_id": job_id}
    return states


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _local_state(entry: dict) -> str:
    """State of a job run by submitit's local executor: its result pickle, else whether its process lives."""
    from submitit.core.utils import JobPaths

    result = JobPaths(entry["folder"], job_id=entry["job_id"], task_id=0).result_pickle
    if result.exists():
        outcome = _pickled_outcome(result)
        if outcome is None:  # a half-written pickle: the job is finishing
            return "RUNNING"
        return "COMPLETED" if outcome == "success" else "FAILED"
    try:
        os.kill(int(entry["job_id"]), 0)
        return "RUNNING"
    except (OSError, ValueError):
        return "UNKNOWN"


def log_tail(path: str | Path | None, lines: int = 20) -> list[str]:
    if not path or not Path(path).is_file():
        return []
    return Path(path).read_text(errors="replace").splitlines()[-lines:]


def _pickled_outcome(path: Path) -> str | None:
    """"success" or "error": the first string of submitit's (outcome, value) result pickle, read with pickletools
    (which only lists opcodes, never runs them), so listing jobs unpickles nothing; None if unreadable."""
    import pickletools

    try:
        for opcode, arg, _ in pickletools.genops(path.read_bytes()):
            if isinstance(arg, str) and "UNICODE" in opcode.name:
                return arg
    except (OSError, ValueError):
        return None
    return None


def combined_state(slurm_state: str | None, run_state: str | None) -> str:
    """One state for the table: the run's own "failed" wins; otherwise SLURM's, refined by the run's status.
    run_state "stale": status.json says running but its process is gone."""
    if run_state == "failed":
        return "FAILED"
    if run_state == "stale" and slurm_state not in SLURM_BAD_STATES + ("RUNNING", "PENDING", "REQUEUED"):
        return "STALE"  # (a live job may be a requeued attempt still starting up: SLURM's word then)
    if slurm_state in SLURM_BAD_STATES:
        return slurm_state
    if slurm_state == "COMPLETED":
        return "COMPLETED" if run_state == "completed" else (run_state or "no status").upper()
    return slurm_state or (run_state or "unknown").upper()


def _array_index(job_id: str) -> tuple[str, int]:
    """"123_4" -> ("123", 4); a plain job "123" -> ("123", -1)."""
    base, _, index = str(job_id).partition("_")
    return base, int(index) if index.isdigit() else -1


def list_jobs(registry: str | Path = DEFAULT_ROOT, tail: int = 20) -> list[dict]:
    """One row per registered job (latest entry per job id and run dir): plain jobs in submission order, the
    tasks of an array in array-index order at the place of the array's first registration."""
    entries: dict[tuple, dict] = {}
    for path in registry_files(registry):
        for entry in read_registry(path):
            entries[(entry["job_id"], entry["run_dir"])] = entry
    first_of_array: dict[str, float] = {}
    for entry in entries.values():
        base = _array_index(entry["job_id"])[0]
        first_of_array[base] = min(first_of_array.get(base, float("inf")), entry.get("submitted", 0))
    ordered = sorted(entries.values(), key=lambda e: (first_of_array[_array_index(e["job_id"])[0]],
                                                      _array_index(e["job_id"]), e.get("submitted", 0)))
    on_slurm = [e for e in ordered if e.get("executor", "slurm") == "slurm"]
    slurm = slurm_states(sorted({e["job_id"] for e in on_slurm} | {e["dependency"] for e in on_slurm
                                                                 if e.get("dependency")}))
    rows = []
    for entry in ordered:
        run_dir = Path(entry["run_dir"])
        status = _read_json(run_dir / "status.json")
        if is_stale(run_dir, status):
            status["state"] = "stale"
        final = _read_json(run_dir / "metrics.json").get("final") or status.get("metrics") or {}
        record = slurm.get(entry["job_id"], {}) if entry.get("executor", "slurm") == "slurm" else \
            {"state": _local_state(entry)}
        state = combined_state(record.get("state"), status.get("state"))
        failed = state in ("FAILED",) + SLURM_BAD_STATES
        logs = log_tail(entry.get("stderr"), tail) if failed else []
        error = status.get("error") or (next((l for l in reversed(logs) if l.strip()), "") if failed else "")
        blocked = _dependency_failure(entry, record, slurm)
        if blocked:
            error, logs = blocked, []
        rows.append({"job_id": entry["job_id"], "run_dir": str(run_dir), "state": state,
                     "slurm_state": record.get("state"), "run_state": status.get("state"),
                     "step": status.get("step"), "epoch": status.get("epoch"),
                     "total_epochs": status.get("total_epochs"), "kappa": final.get("kappa"),
                     "accuracy": final.get("accuracy"), "start": record.get("start"), "end": record.get("end"),
                     "error": error, "log_tail": logs, "overrides": entry.get("overrides", [])})
    return rows


def _dependency_failure(entry: dict, record: dict, slurm: dict) -> str:
    """Why a job that waits on another (a --chain's step 2, or --after) never ran: the job it depends on failed.
    SLURM cancels it then (--kill-on-invalid-dep=yes) or leaves it PENDING with DependencyNeverSatisfied."""
    dependency = entry.get("dependency")
    if not dependency or record.get("state") not in ("PENDING", "CANCELLED"):
        return ""
    parent = slurm.get(dependency, {}).get("state")
    if parent in SLURM_BAD_STATES or "DependencyNeverSatisfied" in record.get("reason", ""):
        return (f"never started: job {dependency}, which it waits for (afterok), ended {parent or 'unsuccessfully'}"
                f" ({record.get('reason') or 'DependencyNeverSatisfied'})")
    return ""


def _progress(row: dict) -> str:
    if row["epoch"] is None:
        return "-"
    total = f"/{row['total_epochs']}" if row["total_epochs"] else ""
    return f"epoch {row['epoch']}{total}, step {row['step']}"


def _number(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def run_labels(rows: list[dict]) -> list[str]:
    """What names each run in the table: its dir name, and for sweep dirs named by number ("0", "1", ...) the
    sweep folder plus the overrides that tell the sweep's runs apart ("sweep/1 seed=1")."""
    labels = []
    for row in rows:
        path = Path(row["run_dir"])
        if not path.name.isdigit():
            labels.append(path.name)
            continue
        siblings = [r for r in rows if Path(r["run_dir"]).parent == path.parent]
        shared = set.intersection(*(set(r["overrides"]) for r in siblings)) if len(siblings) > 1 else set()
        own = [o for o in row["overrides"] if o not in shared and not o.startswith(("hydra.", "run_dir="))]
        labels.append(" ".join([f"{path.parent.name}/{path.name}"] + own))
    return labels


def print_jobs(rows: list[dict]) -> None:
    """A table (rich) of the jobs, then the error and log tail of each failed one. Every text that comes from
    a run, a log or the user is escaped: error messages such as gloo's "[/__w/.../pair.cc:545] Read error"
    look like rich markup and would otherwise raise a MarkupError or vanish."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    table = Table("job", "state", "progress", "kappa", "accuracy", "run")
    colours = {"COMPLETED": "green", "RUNNING": "cyan", "PENDING": "yellow", "FAILED": "red", "STALE": "magenta"}
    for row, label in zip(rows, run_labels(rows)):
        colour = colours.get(row["state"], "red" if row["state"] in SLURM_BAD_STATES else "white")
        table.add_row(Text(str(row["job_id"])), Text(str(row["state"]), style=colour), Text(_progress(row)),
                      _number(row["kappa"]), _number(row["accuracy"]), Text(label))
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    for row in rows:
        if row["error"] or row["log_tail"]:
            console.print(f"\n[red]{escape(str(row['job_id']))} {escape(str(row['state']))}[/]: "
                          f"{escape(str(row['error']))}", highlight=False)
            for line in row["log_tail"]:
                console.print(f"  {line}", markup=False, highlight=False)


def cli_jobs(argv: list[str]) -> int:
    """`tltrain jobs [ROOT|REGISTRY] [--json] [--tail N] [--watch S]`."""
    parser = argparse.ArgumentParser(prog="tltrain jobs", description="Submitted runs: SLURM state, progress, "
                                     "metrics, and the log tail of failed ones.")
    parser.add_argument("where", nargs="?", default=DEFAULT_ROOT,
                        help=f"run root holding {REGISTRY_NAME} (searched recursively) or the file itself")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON lines")
    parser.add_argument("--tail", type=int, default=20, help="log lines shown for a failed job")
    parser.add_argument("--watch", type=float, default=0, help="refresh every S seconds until all jobs ended")
    args = parser.parse_args(argv)
    while True:
        rows = list_jobs(args.where, tail=args.tail)
        if args.json:
            for row in rows:
                print(json.dumps(row))
        else:
            print_jobs(rows)
        if not args.watch or all(r["state"] not in ("RUNNING", "PENDING", "REQUEUED") for r in rows):
            return 1 if any(r["state"] not in ("COMPLETED", "RUNNING", "PENDING") for r in rows) else 0
        time.sleep(args.watch)
