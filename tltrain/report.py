"""`tltrain report SWEEP_DIR`: aggregate finished runs into a CSV, a Markdown table and a metric-vs-fraction plot.

A run is any folder below SWEEP_DIR holding `metrics.json` (written by the trainer); its `config.yaml` says what
was run (schedule, model, fraction, seed) and `status.json` whether it finished. Runs that failed are listed with
their status rather than dropped, so a sweep's table never hides a hole.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tltrain.errors import DataError

# Columns of the report, in order; metric names as the trainer writes them.
METRIC_COLUMNS = [
    "accuracy",
    "kappa",
    "cross_entropy",
    "top2_accuracy",
    "sensitivity",
    "specificity",
    "auc",
]
RUN_COLUMNS = ["run", "status", "step", "schedule", "model", "data", "fraction", "seed"]
PERF_COLUMNS = ["images_per_s", "wall_time_s"]


def _dig(tree: Any, dotted: str, default=None):
    """Read a dotted key from nested dicts (config.yaml loaded as plain dicts)."""
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _load_yaml(path: Path) -> dict:
    from omegaconf import OmegaConf

    if not path.exists():
        return {}
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}


def _final_metrics(metrics: dict) -> tuple[str, dict]:
    """The evaluation the report shows: the test split (best checkpoint) if the run has it, else validation."""
    if metrics.get("test"):
        return "test", metrics["test"]
    final = metrics.get("final", {})
    return ("val", final) if final else ("", {})


def collect_runs(sweep_dir: str | Path) -> list[dict]:
    """One row per run folder below sweep_dir (recursively), finished or not."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise DataError(f"{sweep_dir}: not a folder")
    run_dirs = sorted({p.parent for name in ("metrics.json", "status.json") for p in sweep_dir.rglob(name)})
    rows = []
    for run_dir in run_dirs:
        config = _load_yaml(run_dir / "config.yaml")
        status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").exists() else {}
        metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
        split, final = _final_metrics(metrics)
        row = {
            "run": str(run_dir.relative_to(sweep_dir)) or ".",
            "status": status.get("state", "completed" if metrics else "unknown"),
            "step": status.get("step"),
            "schedule": _dig(config, "schedule.name"),
            "model": _dig(config, "model.arch"),
            "data": _dig(config, "data.name"),
            "fraction": _dig(config, "data.fraction"),
            "seed": _dig(config, "seed"),
            "split": split,
        }
        for key in METRIC_COLUMNS:
            row[key] = final.get(key)
        perf = metrics.get("perf", {})
        for key in PERF_COLUMNS:
            row[key] = perf.get(key)
        if status.get("error"):
            row["error"] = status["error"]
        rows.append(row)
    if not rows:
        raise DataError(f"{sweep_dir}: no runs found (no metrics.json or status.json below it)")
    return rows


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1000 else f"{value:.3f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_vs_fraction(rows: list[dict], path: Path, metrics=("accuracy", "kappa", "cross_entropy")) -> bool:
    """Mean (and spread over seeds) of each metric against the data fraction, one line per schedule/model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.DataFrame([r for r in rows if r.get("fraction") is not None and r.get("status") == "completed"])
    if frame.empty or frame["fraction"].nunique() < 1:
        return False
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for (schedule, model), group in frame.groupby(["schedule", "model"], dropna=False):
            stats = group.groupby("fraction")[metric].agg(["mean", "std"]).reset_index().sort_values("fraction")
            ax.errorbar(stats["fraction"] * 100, stats["mean"], yerr=stats["std"].fillna(0), marker="o",
                        capsize=3, label=f"{schedule} / {model}")
        ax.set_xlabel("training data used (%)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """Write report.csv, report.md and metric_vs_fraction.png; return their paths and the rows."""
    import pandas as pd

    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir else sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = collect_runs(sweep_dir)
    columns = RUN_COLUMNS + ["split"] + METRIC_COLUMNS + PERF_COLUMNS
    frame = pd.DataFrame(rows)
    for column in columns:
        if column not in frame:
            frame[column] = None
    frame[columns + (["error"] if "error" in frame else [])].to_csv(out_dir / "report.csv", index=False)

    # Mean +- std over seeds for each configuration: what a paper table shows.
    done = frame[frame["status"] == "completed"]
    keys = ["schedule", "model", "data", "fraction"]
    summary_rows = []
    if not done.empty:
        for key, group in done.groupby(keys, dropna=False):
            entry = dict(zip(keys, key))
            entry["runs"] = len(group)
            for metric in METRIC_COLUMNS + PERF_COLUMNS:
                values = pd.to_numeric(group[metric], errors="coerce").dropna()
                if len(values) == 0:
                    entry[metric] = None
                elif len(values) == 1:
                    entry[metric] = float(values.iloc[0])
                else:
                    entry[metric] = f"{values.mean():.3f} ± {values.std():.3f}"
            summary_rows.append(entry)
    md = [f"# Sweep report: {sweep_dir}", "", f"{len(rows)} runs, {len(done)} completed.", ""]
    if summary_rows:
        md += ["## Summary (mean ± std over seeds)", "",
               markdown_table(summary_rows, keys + ["runs"] + METRIC_COLUMNS + PERF_COLUMNS), ""]
    md += ["## Runs", "", markdown_table(rows, columns), ""]
    failed = [r for r in rows if r["status"] not in ("completed",)]
    if failed:
        md += ["## Not completed", ""] + [f"- {r['run']}: {r['status']} {r.get('error', '')}" for r in failed] + [""]
    plot_path = out_dir / "metric_vs_fraction.png"
    has_plot = plot_vs_fraction(rows, plot_path)
    if has_plot:
        md += [f"![metric vs fraction]({plot_path.name})", ""]
    (out_dir / "report.md").write_text("\n".join(md))
    return {
        "csv": str(out_dir / "report.csv"),
        "markdown": str(out_dir / "report.md"),
        "plot": str(plot_path) if has_plot else None,
        "rows": rows,
        "summary": summary_rows,
    }
