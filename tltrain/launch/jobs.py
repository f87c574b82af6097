"""The job registry and `tltrain jobs`: what was submitted, what SLURM says about it, and how far each run got.

Every submission appends one JSON line to <root>/.tltrain_jobs.jsonl (job id, run dir, overrides, submitit
folder, stderr log, time). `list_jobs` joins those lines with SLURM's accounting (sacct, or squeue when
accounting is down) and with each run's own status.json / metrics.json. The run's status wins over SLURM's
when it says "failed": a Hydra sweep job that caught its run's error ends COMPLETED for SLURM. A status that
says "running" while the run's lock is free (or its pid is gone on this host) is shown as STALE: the process
died without writing its end (kill -9, lost node); resubmitting the run resumes it.

A registry, and the run folders it names, may be someone else's (a shared root): every file is read bounded
(regular files only, size-capped; of a log only its end), every entry's values are checked (paths it names stay
where they belong: the stderr log and result pickle inside the job's submitit folder), text is shown escaped,
and a line or run file that cannot be read is a row in state UNREADABLE with the reason; the listing goes on.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

from tltrain import safe_io
from tltrain.engine.rundir import is_stale
from tltrain.errors import DataError
from tltrain.launch.config import DEFAULT_ROOT
from tltrain.run_folder import METRICS_LIMIT, STATUS_LIMIT, RunFolder

REGISTRY_NAME = ".tltrain_jobs.jsonl"
#: SLURM end states that mean the job did not finish its work.
SLURM_BAD_STATES = ("FAILED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                    "PREEMPTED")
#: Caps on what `tltrain jobs` reads (registries, run files and logs may be someone else's: a shared root).
REGISTRY_BYTES = 64 * safe_io.MiB  # ~100k submissions
RESULT_PREFIX_BYTES = 64 * 1024  # the outcome string comes first in submitit's result pickle
LOG_TAIL_BYTES = 64 * 1024  # of a failed job's stderr log, only the end is read
MAX_ID_CHARS = 200
#: A SLURM job id as submitit records it: "123", an array task "123_4", a heterogeneous component "123+0".
SLURM_JOB_ID = re.compile(r"[0-9]+(?:[_+][0-9]+)?")
UNREADABLE = "UNREADABLE"


def registry_path(root: str | Path, registry: str | Path | None = None) -> Path:
    """The registry file: the one configured (e.g. ~/.tltrain/jobs.jsonl), else <root>/.tltrain_jobs.jsonl."""
    return Path(registry).expanduser() if registry else Path(root) / REGISTRY_NAME


def record_job(path: str | Path, entry: dict) -> Path:
    """Append one submission to the registry file: one short write (safe from parallel array tasks), with
    O_APPEND | O_NOFOLLOW, so a symlink planted at the registry's path is refused rather than written through;
    a FIFO, device or hard-linked file there is refused too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symbolic link at the registry's path
            raise DataError(f"{path}: job registry is a symbolic link; refused (planted by someone else?)") from None
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads (O_NONBLOCK: never waited on)
            raise DataError(f"{path}: job registry is a FIFO, not a regular file; refused") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            kind = "a file with several hard links" if stat.S_ISREG(info.st_mode) else "not a regular file"
            raise DataError(f"{path}: job registry is {kind}; refused")
        os.write(fd, line)
    finally:
        os.close(fd)
    return path


def registry_lines(path: str | Path) -> list[tuple[str, dict | DataError]]:
    """("FILE:LINE", entry) for each line of one registry file; a damaged line (or an unreadable file) is a
    DataError in its place that names the file and line, so a listing can show it and go on."""
    path = Path(path)
    try:
        text = safe_io.read_text(path, REGISTRY_BYTES, "job registry")
    except OSError as exc:
        return [(str(path), DataError(f"{path}: cannot read the job registry ({exc.strerror or exc})"))]
    except DataError as exc:
        return [(str(path), exc)]
    entries: list[tuple[str, dict | DataError]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            entries.append((where, safe_io.parse_json(line, where, max_depth=8)))
        except DataError as exc:
            entries.append((where, DataError(str(exc).replace(f"{where}: not valid JSON", f"{where}: not a JSON "
                                                                                           "line", 1))))
    return entries


def read_registry(path: str | Path) -> list[dict]:
    """Entries of one registry file; a damaged line is an error naming the file and line."""
    entries = []
    for _, entry in registry_lines(path):
        if isinstance(entry, DataError):
            raise entry
        entries.append(entry)
    return entries


def _entry_path(value, base: Path, what: str, where: str) -> Path:
    """A path a registry entry names: absolute (as `submit` writes it) without `..`, or relative to the registry's
    folder and inside it (safe_io.inside)."""
    if not isinstance(value, str) or not value or "\x00" in value or len(value) > 4096:
        raise DataError(f"{where}: {what} {safe_io.printable(repr(value), 200)} is not a path")
    path = Path(value)
    if not path.is_absolute():
        return safe_io.inside(base, value, what)
    if ".." in path.parts:
        raise DataError(f"{where}: {what} {safe_io.printable(repr(value), 200)} contains '..'; refused")
    return path


def _job_id(value, where: str, what: str = "job_id") -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise DataError(f"{where}: {what} {safe_io.printable(repr(value), 100)} is not a job id")
    return value


def _checked_entry(entry, where: str, base: Path) -> dict:
    """A registry entry with every value `tltrain jobs` uses checked: ids, the executor, run_dir and submitit
    folder (see _entry_path), the stderr log inside that folder, the overrides a list of text."""
    if isinstance(entry, DataError):
        raise entry
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected a JSON object, not {type(entry).__name__}")
    checked = dict(entry)
    checked["job_id"] = _job_id(entry.get("job_id"), where)
    checked["executor"] = entry.get("executor", "slurm")
    if checked["executor"] not in ("slurm", "local"):
        raise DataError(f"{where}: executor {safe_io.printable(repr(checked['executor']), 100)} is not "
                        "'slurm' or 'local'")
    dependency = entry.get("dependency")
    checked["dependency"] = None if dependency is None else _job_id(dependency, where, "dependency")
    if checked["executor"] == "slurm":  # ids go to sacct/squeue
        for key in ("job_id", "dependency"):
            if checked[key] is not None and not SLURM_JOB_ID.fullmatch(checked[key]):
                raise DataError(f"{where}: {key} {safe_io.printable(repr(checked[key]), 100)} is not a SLURM job id")
    checked["run_dir"] = str(_entry_path(entry.get("run_dir"), base, "run_dir", where))
    folder = entry.get("folder")
    checked["folder"] = None if folder is None else str(_entry_path(folder, base, "folder", where))
    checked["stderr"] = _stderr_in_folder(entry.get("stderr"), checked["folder"], where)
    overrides = entry.get("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise DataError(f"{where}: overrides must be a list of text")
    checked["overrides"] = overrides
    submitted = entry.get("submitted", 0)
    checked["submitted"] = 0 if submitted is None else safe_io.finite_number(submitted, f"{where}: submitted")
    return checked


def _stderr_in_folder(stderr, folder: str | None, where: str) -> str | None:
    """The job's stderr log: a file inside its submitit folder (where submitit writes it), else refused."""
    if stderr is None:
        return None
    if not isinstance(stderr, str) or folder is None:
        raise DataError(f"{where}: stderr {safe_io.printable(repr(stderr), 200)} is not a log in the job's folder")
    path = Path(stderr)
    try:
        relative = str(path.relative_to(folder)) if path.is_absolute() else stderr
    except ValueError:
        raise DataError(f"{where}: stderr {safe_io.printable(repr(stderr), 200)} lies outside the job's folder "
                        f"{safe_io.printable(folder, 200)}; refused") from None
    return str(safe_io.inside(folder, relative, "stderr log"))


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


def _result_pickle(entry: dict) -> Path | None:
    """submitit's result pickle of a local job (task 0) in the job's folder; None when the job id cannot be part
    of a file name there (then the pickle is not looked for). One planted as a symlink out of the folder is a
    DataError."""
    name = f"{entry['job_id']}_0_result.pkl"
    try:
        safe_io.plain_name(name)
    except DataError:
        return None
    return safe_io.inside(entry["folder"], name, "result pickle")


def _local_state(entry: dict) -> str:
    """State of a job run by submitit's local executor: its result pickle, else whether its process lives."""
    result = _result_pickle(entry) if entry.get("folder") else None
    if result is not None and (result.exists() or result.is_symlink()):
        outcome = _pickled_outcome(result)
        if outcome is None:  # a half-written pickle: the job is finishing
            return "RUNNING"
        return "COMPLETED" if outcome == "success" else "FAILED"
    job_id = str(entry["job_id"])
    if job_id.isdigit() and 0 < int(job_id) < 2 ** 31:  # the local executor's job id is the job's pid
        try:
            os.kill(int(job_id), 0)
            return "RUNNING"
        except OSError:
            pass
    return "UNKNOWN"


def log_tail(path: str | Path | None, lines: int = 20, max_bytes: int = LOG_TAIL_BYTES) -> list[str]:
    """The last `lines` lines of a log, from its last `max_bytes` only (a log may be huge, or a link to a device:
    only regular files are read); [] when there is none or it cannot be read."""
    if not path or lines <= 0:
        return []
    try:
        with safe_io.open_regular(path, "log") as handle:
            size = os.fstat(handle.fileno()).st_size
            handle.seek(max(0, size - max_bytes))
            data = handle.read(max_bytes)
    except (OSError, DataError):
        return []
    text = data.decode("utf-8", errors="replace")
    if len(data) == max_bytes and size > max_bytes:
        text = text.split("\n", 1)[-1]  # the first line read is cut in the middle
    return text.splitlines()[-lines:]


def _pickled_outcome(path: Path) -> str | None:
    """"success" or "error": the first string of submitit's (outcome, value) result pickle, read with pickletools
    (which only lists opcodes, never runs them), so listing jobs unpickles nothing; None if unreadable.

    Only the first RESULT_PREFIX_BYTES of a regular file are read: the outcome is the pickle's first string."""
    import pickletools

    try:
        with safe_io.open_regular(path, "result pickle") as handle:
            data = handle.read(RESULT_PREFIX_BYTES)
        for opcode, arg, _ in pickletools.genops(data):
            if isinstance(arg, str) and "UNICODE" in opcode.name:
                return arg
    except (OSError, ValueError):  # (DataError, a FIFO or device planted there, goes to the caller)
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


def _run_status(run_dir: Path) -> dict:
    """The values of status.json that the table shows (and is_stale reads), type-checked; {} when absent."""
    folder = RunFolder(run_dir)
    status = safe_io.load_json_object(folder.status, STATUS_LIMIT, RunFolder.STATUS)
    where = str(folder.status)
    for key in ("state", "error", "host"):
        if status.get(key) is not None and not isinstance(status[key], str):
            raise DataError(f"{where}: {key} must be text, not {type(status[key]).__name__}")
    for key, high in (("step", 2 ** 63), ("epoch", 2 ** 31), ("total_epochs", 2 ** 31), ("pid", 2 ** 31 - 1)):
        if status.get(key) is not None:
            safe_io.finite_number(status[key], f"{where}: {key}", 0, high, integer=True)
    if status.get("metrics") is not None and not isinstance(status["metrics"], dict):
        raise DataError(f"{where}: metrics must be an object")
    if is_stale(run_dir, status):
        status["state"] = "stale"
    return status


def _final_metrics(run_dir: Path, status: dict) -> dict:
    """{"kappa", "accuracy"} of the last validation (metrics.json, else status.json), as numbers or None."""
    path = RunFolder(run_dir).metrics
    metrics = safe_io.load_json_object(path, METRICS_LIMIT, RunFolder.METRICS)
    final = metrics.get("final") or status.get("metrics") or {}
    if not isinstance(final, dict):
        raise DataError(f"{path}: final must be an object")
    values = {}
    for key in ("kappa", "accuracy"):
        value = final.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise DataError(f"{path}: final.{key} must be a number, "
                            f"not {safe_io.printable(repr(value), 100)}")
        try:
            values[key] = None if value is None else float(value)
        except OverflowError:
            raise DataError(f"{path}: final.{key} is too large a number") from None
    return values


def _unreadable_row(where: str, entry, problem: str) -> dict:
    """A registry line that cannot be listed: shown (with the reason) where its job would be, never dropped."""
    job_id = entry.get("job_id") if isinstance(entry, dict) else None
    return {"job_id": job_id if isinstance(job_id, (str, int)) and not isinstance(job_id, bool) else "?",
            "run_dir": where, "state": UNREADABLE, "slurm_state": None, "run_state": None, "step": None,
            "epoch": None, "total_epochs": None, "kappa": None, "accuracy": None, "start": None, "end": None,
            "error": problem if where in problem else f"{where}: {problem}", "log_tail": [], "overrides": []}


def _registered(registry: str | Path) -> tuple[list[dict], list[dict]]:
    """(checked entries, latest per job id and run dir; rows for the lines that could not be read)."""
    entries: dict[tuple, dict] = {}
    unreadable = []
    for path in registry_files(registry):
        for where, entry in registry_lines(path):
            try:
                checked = _checked_entry(entry, where, path.parent)
            except DataError as exc:
                unreadable.append(_unreadable_row(where, entry, str(exc)))
                continue
            entries[(checked["job_id"], checked["run_dir"])] = checked
    return list(entries.values()), unreadable


def list_jobs(registry: str | Path = DEFAULT_ROOT, tail: int = 20) -> list[dict]:
    """One row per registered job (latest entry per job id and run dir): plain jobs in submission order, the
    tasks of an array in array-index order at the place of the array's first registration. Registry lines and
    run files that cannot be read are rows in state UNREADABLE with the reason; the listing goes on."""
    entries, unreadable = _registered(registry)
    first_of_array: dict[str, float] = {}
    for entry in entries:
        base = _array_index(entry["job_id"])[0]
        first_of_array[base] = min(first_of_array.get(base, float("inf")), entry["submitted"])
    ordered = sorted(entries, key=lambda e: (first_of_array[_array_index(e["job_id"])[0]],
                                             _array_index(e["job_id"]), e["submitted"]))
    on_slurm = [e for e in ordered if e["executor"] == "slurm"]
    slurm = slurm_states(sorted({e["job_id"] for e in on_slurm} | {e["dependency"] for e in on_slurm
                                                                 if e.get("dependency")}))
    return [_job_row(entry, slurm, tail) for entry in ordered] + unreadable


def _job_row(entry: dict, slurm: dict, tail: int) -> dict:
    """One table row: SLURM's (or the local executor's) state joined with the run's own files."""
    run_dir = Path(entry["run_dir"])
    problem = ""
    try:
        status = _run_status(run_dir)
        final = _final_metrics(run_dir, status)
    except DataError as exc:
        status, final, problem = {"state": UNREADABLE.lower()}, {}, str(exc)
    if entry["executor"] == "slurm":
        record = slurm.get(entry["job_id"], {})
    else:
        try:
            record = {"state": _local_state(entry)}
        except DataError as exc:
            record, problem = {"state": UNREADABLE}, problem or str(exc)
    state = combined_state(record.get("state"), status.get("state"))
    failed = state in ("FAILED",) + SLURM_BAD_STATES
    logs = log_tail(entry.get("stderr"), tail) if failed else []
    last_line = next((line for line in reversed(logs) if line.strip()), "")
    error = problem or status.get("error") or (last_line if failed else "")
    blocked = _dependency_failure(entry, record, slurm)
    if blocked:
        error, logs = blocked, []
    return {"job_id": entry["job_id"], "run_dir": str(run_dir), "state": state,
            "slurm_state": record.get("state"), "run_state": status.get("state"),
            "step": status.get("step"), "epoch": status.get("epoch"),
            "total_epochs": status.get("total_epochs"), "kappa": final.get("kappa"),
            "accuracy": final.get("accuracy"), "start": record.get("start"), "end": record.get("end"),
            "error": error, "log_tail": logs, "overrides": entry.get("overrides", [])}


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
    a run, a log or the user is made printable (terminal escapes shown, not run) and escaped: error messages
    such as gloo's "[/__w/.../pair.cc:545] Read error" look like rich markup and would otherwise raise a
    MarkupError or vanish."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    def shown(value, limit: int | None = 2000) -> str:
        return safe_io.printable(value, limit)

    table = Table("job", "state", "progress", "kappa", "accuracy", "run")
    colours = {"COMPLETED": "green", "RUNNING": "cyan", "PENDING": "yellow", "FAILED": "red", "STALE": "magenta"}
    for row, label in zip(rows, run_labels(rows)):
        colour = colours.get(row["state"], "red" if row["state"] in SLURM_BAD_STATES else "white")
        table.add_row(Text(shown(row["job_id"], 200)), Text(shown(row["state"], 100), style=colour),
                      Text(shown(_progress(row), 200)), _number(row["kappa"]), _number(row["accuracy"]),
                      Text(shown(label, 500)))
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    for row in rows:
        if row["error"] or row["log_tail"]:
            console.print(f"\n[red]{escape(shown(row['job_id'], 200))} {escape(shown(row['state'], 100))}[/]: "
                          f"{escape(shown(row['error']))}", highlight=False)
            for line in row["log_tail"]:
                console.print(f"  {shown(line, 1000)}", markup=False, highlight=False)
    unreadable = sum(row["state"] == UNREADABLE for row in rows)
    if unreadable:
        console.print(f"\n{unreadable} of {len(rows)} jobs could not be read (see above)", highlight=False,
                      markup=False)


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
