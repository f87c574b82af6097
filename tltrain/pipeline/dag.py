"""The pipeline's DAG as `tltrain jobs <out>` shows it: each stage, what it waits for, its state and why.

A stage's state joins three things: the records of its done tasks (tltrain.pipeline.tasks), the jobs the last
`tltrain pipeline` submitted for it (.pipeline/jobs.json) and what SLURM or the local executor says of those jobs
(tltrain.launch.jobs, which also reads each failed job's error and log). A stage that never ran because one before
it failed says so, naming that stage.
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from tltrain import safe_io
from tltrain.errors import DataError
from tltrain.launch.jobs import SLURM_BAD_STATES, list_jobs
from tltrain.pipeline.state import read_jobs, read_record

LIVE = ("RUNNING", "PENDING", "REQUEUED")
BAD = ("FAILED", "CANCELLED", "STALE", "UNREADABLE") + SLURM_BAD_STATES


def stage_rows(root: str | Path) -> list[dict]:
    """One row per stage: stage, after, tasks, done, state, reason, job ids."""
    root = Path(root)
    jobs = read_jobs(root)
    rows_by_job = {str(r["job_id"]): r for r in list_jobs(root, tail=40)}
    rows: list[dict] = []
    by_stage: dict[str, dict] = {}
    for entry in jobs.get("dag", []):
        name, fingerprints = str(entry["stage"]), list(entry.get("fingerprints") or [])
        done = 0
        for task, fingerprint in enumerate(fingerprints):
            try:
                record = read_record(root, name, task)
            except DataError:
                record = None
            done += bool(record and record["fingerprint"] == fingerprint)
        submitted = jobs.get("stages", {}).get(name, {})
        job_ids = [str(j) for j in (submitted.get("jobs") or {}).values()]
        row = {"stage": name, "what": entry.get("what", ""), "after": list(entry.get("after") or []),
               "tasks": len(fingerprints), "done": done, "jobs": job_ids, "state": "", "reason": ""}
        row["state"], row["reason"] = _state(row, submitted, [rows_by_job.get(j) for j in job_ids], by_stage)
        by_stage[name] = row
        rows.append(row)
    return rows


def _state(row: dict, submitted: dict, job_rows: list, by_stage: dict) -> tuple[str, str]:
    if row["tasks"] and row["done"] == row["tasks"]:
        return "COMPLETED", ""
    failed_before = next((n for n in row["after"] if by_stage.get(n, {}).get("state") in BAD + ("CANCELLED",)), None)
    if submitted.get("cancelled"):
        return "CANCELLED", submitted["cancelled"]
    # a job SLURM has no word on yet (just submitted: not in the accounting yet) counts as pending
    states = [r["state"] if r.get("slurm_state") or r["state"] == "UNREADABLE" else "PENDING"
              for r in job_rows if r is not None]
    bad = [r for r in job_rows if r is not None and r.get("slurm_state") and r["state"] in BAD]
    if any(s == "RUNNING" for s in states):
        return "RUNNING", f"{row['done']}/{row['tasks']} tasks done"
    if any(s in ("PENDING", "REQUEUED") for s in states):
        if failed_before:
            return "CANCELLED", f"never starts: {failed_before} did not finish"
        waits = [n for n in row["after"] if by_stage.get(n, {}).get("state") != "COMPLETED"]
        return "PENDING", f"waits for {', '.join(waits)}" if waits else "queued"
    if bad:
        if failed_before and all(r["state"] == "CANCELLED" for r in bad):
            return "CANCELLED", f"cancelled: {failed_before} did not finish"
        first = bad[0]
        reason = _reason(first)
        state = "FAILED" if first["state"] in ("FAILED", "STALE", "UNREADABLE") else first["state"]
        return state, f"{len(bad)} of {row['tasks']} task(s): {safe_io.printable(reason, 400)}"
    if failed_before:
        return "CANCELLED", f"not run: {failed_before} did not finish"
    if job_rows and all(r is not None and r["state"] == "COMPLETED" for r in job_rows):
        return "INCOMPLETE", "the jobs ended but left no record: run the pipeline again"
    return ("NOT SUBMITTED" if not job_rows else "UNKNOWN"), f"{row['done']}/{row['tasks']} tasks done"


EXCEPTION_LINE = re.compile(r"^\s*(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Exit)\b:?")


def _reason(job_row: dict) -> str:
    """Why a job failed, in one line: the run's own error, else the exception line of its log (not srun's
    "task 0: Exited with exit code 1", which says nothing), else the log's last line."""
    error = str(job_row.get("error") or "")
    if error and not error.startswith("srun:"):
        return error
    lines = [line.strip() for line in job_row.get("log_tail") or [] if line.strip()]
    found = next((line for line in reversed(lines) if EXCEPTION_LINE.match(line)), None)
    return found or next((line for line in reversed(lines) if not line.startswith("srun:")), error)


def print_dag(root: str | Path) -> list[dict]:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    rows = stage_rows(root)
    colours = {"COMPLETED": "green", "RUNNING": "cyan", "PENDING": "yellow", "FAILED": "red", "CANCELLED": "red"}
    table = Table("stage", "after", "tasks", "jobs", "state", "reason", title=f"pipeline {root}")
    for row in rows:
        jobs = sorted({j.split("_")[0] for j in row["jobs"]})
        table.add_row(Text(row["stage"]), Text(", ".join(row["after"]) or "-"), f"{row['done']}/{row['tasks']}",
                      Text(", ".join(jobs[:3]) + (" ..." if len(jobs) > 3 else "")),
                      Text(row["state"], style=colours.get(row["state"], "white")), Text(row["reason"]))
    Console(width=None if sys.stdout.isatty() else 180).print(table)
    return rows


def wait_for(root: str | Path, every: float = 10.0) -> int:
    """Poll until no stage is pending or running; print the DAG; 0 when every stage completed."""
    while True:
        rows = stage_rows(root)
        if not any(r["state"] in ("RUNNING", "PENDING") for r in rows):
            print_dag(root)
            return 0 if all(r["state"] == "COMPLETED" for r in rows) else 1
        time.sleep(every)


def pipeline_jobs(argv: list[str]) -> int | None:
    """`tltrain jobs OUT` on a pipeline's folder: the DAG, then every job (tltrain.launch.jobs); None when OUT is
    not a pipeline's folder (plain `tltrain jobs` then). The exit code is the DAG's: 0 once every stage completed
    (a job that failed before a re-run finished its task is history, not a failure), 1 when one did not."""
    import argparse
    import json

    from tltrain.launch.jobs import print_jobs
    from tltrain.pipeline.state import pipeline_root

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("where", nargs="?", default=".")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--tail", type=int, default=20)
    parser.add_argument("--watch", type=float, default=0)
    args, _ = parser.parse_known_args(argv)
    root = pipeline_root(args.where) if Path(args.where).is_dir() else None
    if root is None:
        return None
    while True:
        if args.json:
            stages = stage_rows(root)
            for row in stages:
                print(json.dumps({"pipeline_stage": row}))
            for row in list_jobs(root, tail=args.tail):
                print(json.dumps(row))
        else:
            stages = print_dag(root)
            print_jobs(list_jobs(root, tail=args.tail))
        live = any(r["state"] in ("RUNNING", "PENDING") for r in stages)
        if not args.watch or not live:
            return 0 if all(r["state"] == "COMPLETED" for r in stages) or live else 1
        time.sleep(args.watch)
