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
    fields = ("JobID", "State", "Start", "End", "ExitCode")
    try:
        out = subprocess.run(["sacct", "-j", ",".join(job_ids), "--parsable2", "-X", "--noheader",
                              f"--format={','.join(fields)}"], capture_output=True, text=True, timeout=30,
                             check=True).stdout
        rows = [dict(zip(("job_id", "state", "start", "end", "exit_code"), line.split("|")))
                for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        try:
            out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T"], capture_output=True,
                                 text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return {}
        rows = [dict(zip(("job_id", "state"), line.split("|"))) for line in out.splitlines() if line.strip()]
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


def list_jobs(registry: str | Path = DEFAULT_ROOT, tail: int = 20) -> list[dict]:
    """One row per registered job (latest entry per job id and run dir), in submission order."""
    entries: dict[tuple, dict] = {}
    for path in registry_files(registry):
        for entry in read_registry(path):
            entries[(entry["job_id"], entry["run_dir"])] = entry
    ordered = sorted(entries.values(), key=lambda e: e.get("submitted", 0))
    slurm = slurm_states([e["job_id"] for e in ordered if e.get("executor", "slurm") == "slurm"])
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
        rows.append({"job_id": entry["job_id"], "run_dir": str(run_dir), "state": state,
                     "slurm_state": record.get("state"), "run_state": status.get("state"),
                     "step": status.get("step"), "epoch": status.get("epoch"),
                     "total_epochs": status.get("total_epochs"), "kappa": final.get("kappa"),
                     "accuracy": final.get("accuracy"), "start": record.get("start"), "end": record.get("end"),
                     "error": error, "log_tail": logs, "overrides": entry.get("overrides", [])})
    return rows


def _progress(row: dict) -> str:
    if row["epoch"] is None:
        return "-"
    total = f"/{row['total_epochs']}" if row["total_epochs"] else ""
    return f"epoch {row['epoch']}{total}, step {row['step']}"


def _number(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_jobs(rows: list[dict]) -> None:
    """A table (rich) of the jobs, then the error and log tail of each failed one."""
    from rich.console import Console
    from rich.table import Table

    table = Table("job", "state", "progress", "kappa", "accuracy", "run dir")
    colours = {"COMPLETED": "green", "RUNNING": "cyan", "PENDING": "yellow", "FAILED": "red", "STALE": "magenta"}
    for row in rows:
        colour = colours.get(row["state"], "red" if row["state"] in SLURM_BAD_STATES else "white")
        table.add_row(row["job_id"], f"[{colour}]{row['state']}[/]", _progress(row), _number(row["kappa"]),
                      _number(row["accuracy"]), Path(row["run_dir"]).name)
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    for row in rows:
        if row["error"] or row["log_tail"]:
            console.print(f"\n[red]{row['job_id']} {row['state']}[/]: {row['error']}", markup=True)
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
