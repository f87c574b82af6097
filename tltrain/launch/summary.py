"""The end of a sweep: which runs failed and why, and a non-zero exit when any did.

Each sweep job writes its outcome to <sweep dir>/.tltrain_runs/<job num>.json (tltrain.train_app); jobs may run
in other processes or on other nodes (submitit), so this callback, which Hydra calls in the launching process
after the last job, reads those files. `tltrain train -m` then exits 1 when a run failed (cli.main reads
`last_summary`), after every other run went on to completion.
"""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape

last_summary: dict | None = None


def read_sweep_runs(sweep_dir: str | Path) -> list[dict]:
    runs = []
    for path in sorted(Path(sweep_dir, ".tltrain_runs").glob("*.json"), key=lambda p: int(p.stem)):
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            runs.append({"num": int(path.stem), "status": "unknown", "error": f"{path}: unreadable"})
    return runs


class SweepSummaryCallback:
    """Hydra callback (configs/config.yaml): prints the failed runs of a multirun and remembers the outcome."""

    def on_multirun_end(self, config, **kwargs) -> None:
        global last_summary
        runs = read_sweep_runs(str(config.hydra.sweep.dir))
        failed = [r for r in runs if r.get("status") == "failed"]
        last_summary = {"sweep_dir": str(config.hydra.sweep.dir), "runs": len(runs), "failed": failed}
        if not failed:
            return
        console = Console(stderr=True, highlight=False, soft_wrap=True)
        console.print(f"[bold red]{len(failed)} of {len(runs)} runs failed[/] (the others went on):")
        for run in failed:
            overrides = " ".join(run.get("overrides") or [])
            console.print(f"  #{run.get('num')} {escape(overrides)}\n"
                          f"      {escape(str(run.get('error')))}\n      status: {escape(str(run.get('run_dir')))}")

    def on_multirun_start(self, config, **kwargs) -> None:
        global last_summary
        last_summary = None

    def on_run_start(self, config, **kwargs) -> None: ...
    def on_run_end(self, config, **kwargs) -> None: ...
    def on_job_start(self, config, **kwargs) -> None: ...
    def on_job_end(self, config, job_return, **kwargs) -> None: ...
