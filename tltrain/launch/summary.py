"""The end of a sweep: which runs failed and why, and a non-zero exit when any did.

Each sweep job writes its outcome to <sweep dir>/.tltrain_runs/<job num>.json (tltrain.train_app); jobs may run
in other processes or on other nodes (submitit), so this callback, which Hydra calls in the launching process
after the last job, reads those files. `tltrain train -m` then exits 1 when a run failed (cli.main reads
`last_summary`), after every other run went on to completion.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from tltrain import safe_io

last_summary: dict | None = None


RECORD_NAME = re.compile(r"[0-9]{1,9}\.json")
RECORD_BYTES = 4 * safe_io.MiB


def read_sweep_runs(sweep_dir: str | Path) -> list[dict]:
    """The sweep jobs' outcome records, in job order (files not named `<job num>.json` are not records). A record
    that cannot be read (bounded: a regular file, size capped) is listed as status "unreadable" with the reason,
    and counts as a failure: an outcome nobody can read is not a success."""
    paths = [p for p in Path(sweep_dir, ".tltrain_runs").glob("*.json") if RECORD_NAME.fullmatch(p.name)]
    return [_read_record(path) for path in sorted(paths, key=lambda p: int(p.stem))]


def _read_record(path: Path) -> dict:
    num = int(path.stem)
    try:
        record = safe_io.load_json(path, RECORD_BYTES, "sweep job record")
    except (OSError, safe_io.DataError) as exc:
        return {"num": num, "status": "unreadable", "error": f"{path}: unreadable ({exc})"}
    if not isinstance(record, dict):
        return {"num": num, "status": "unreadable", "error": f"{path}: unreadable (not a JSON object)"}
    return {**record, "num": num}


def _shown(value) -> str:
    """Text from a record, safe on a terminal (escape sequences shown, not run)."""
    return safe_io.printable(value, 2000)


class SweepSummaryCallback:
    """Hydra callback (configs/config.yaml): prints the failed runs of a multirun and remembers the outcome."""

    def on_multirun_end(self, config, **kwargs) -> None:
        global last_summary
        runs = read_sweep_runs(str(config.hydra.sweep.dir))
        failed = [r for r in runs if r.get("status") in ("failed", "unreadable")]
        last_summary = {"sweep_dir": str(config.hydra.sweep.dir), "runs": len(runs), "failed": failed}
        if not failed:
            return
        console = Console(stderr=True, highlight=False, soft_wrap=True)
        console.print(f"[bold red]{len(failed)} of {len(runs)} runs failed or left no readable record[/] "
                      "(the others went on):")
        for run in failed:
            overrides = run.get("overrides")
            overrides = " ".join(map(str, overrides)) if isinstance(overrides, list) else ""
            console.print(f"  #{run.get('num')} {escape(_shown(overrides))}\n      {escape(_shown(run.get('error')))}"
                          f"\n      status: {escape(_shown(run.get('run_dir')))}")

    def on_multirun_start(self, config, **kwargs) -> None:
        """Refuses a sweep that sets run_dir before any job starts (each job refuses it too, as a backstop)."""
        global last_summary
        last_summary = None
        from tltrain.config import refuse_multirun_run_dir
        from tltrain.errors import ConfigError

        try:
            refuse_multirun_run_dir(config)
        except ConfigError as exc:
            print(f"error: {_shown(exc)}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except Exception:  # noqa: BLE001 - an interpolation not resolvable yet: the jobs check it themselves
            pass

    def on_run_start(self, config, **kwargs) -> None: ...
    def on_run_end(self, config, **kwargs) -> None: ...
    def on_job_start(self, config, **kwargs) -> None: ...
    def on_job_end(self, config, job_return, **kwargs) -> None: ...
