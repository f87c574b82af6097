"""`tltrain report SWEEP_DIR`: aggregate finished runs into CSVs, a Markdown report and one chart per dataset.

A run is any folder below SWEEP_DIR holding `metrics.json` (written by the trainer); its `config.yaml` says what
was run (schedule, model, initial weights, data, fraction, seed) and `status.json` whether it finished. Runs that
failed are listed with their status rather than dropped, so a sweep's table never hides a hole; a "running" run
whose process is gone (kill -9, lost node: rundir.is_stale) is listed as "stale", as `tltrain jobs` shows it.

Configurations (dataset, label set, schedule, model, initial weights, fraction) are summarised over their seeds as
n and mean ± the half-width of a 95 % t-interval (no interval for n = 1). Each dataset and label set gets its own
table and its own row of charts, so a 5-grade and a 2-class run never share an axis. A chart plots a metric
against the training fraction when a dataset has runs at two or more fractions, and is otherwise a bar chart of
the configurations.
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
RUN_COLUMNS = ["run", "status", "step", "data", "classes", "schedule", "model", "weights", "fraction", "seed"]
PERF_COLUMNS = ["images_per_s", "wall_time_s"]
# What makes two runs the same experiment (seeds vary within a configuration).
PANEL_KEYS = ["data", "classes"]
CONFIG_KEYS = ["schedule", "model", "weights", "fraction", "split"]
PLOTTED_METRICS = ("kappa", "accuracy", "auc")
BOUNDED_METRICS = {"kappa", "accuracy", "auc", "top2_accuracy", "sensitivity", "specificity"}  # at most 1
CONFIDENCE = 0.95


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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _final_metrics(metrics: dict) -> tuple[str, dict]:
    """The evaluation the report shows: the test split (best checkpoint) if the run has it, else validation of
    the best checkpoint, else the last validation."""
    if metrics.get("test"):
        return "test", metrics["test"]
    best = (metrics.get("best") or {}).get("val") or metrics.get("final", {})
    return ("val", best) if best else ("", {})


def initial_weights(weights: str | None) -> str:
    """A short name for where a run's weights came from: scratch, imagenet, or the run or package folder."""
    if not weights:
        return "scratch"
    path = Path(str(weights))
    if path.is_dir() or path.suffix == "":
        if (path / "tltrain.json").is_file():
            return f"package:{path.name}"
        return f"run:{path.name}"
    if (path.parent / "tltrain.json").is_file():  # a package's weights file
        return f"package:{path.parent.name}"
    if path.parent.name == "checkpoints":  # a checkpoint file inside a run folder
        return f"run:{path.parent.parent.name}"
    lowered = path.name.lower()
    if any(tag in lowered for tag in ("imagenet", "in1k", "in21k", "in22k", "in12k")):
        return "imagenet"
    return f"file:{path.stem}"


def _label_set(config: dict, metrics: dict, manifests: dict) -> str:
    """The run's classes as read from its shards' manifest (cached), else the size of its confusion matrix."""
    shards = _dig(config, "data.shards")
    if shards not in manifests:
        manifests[shards] = _read_json(Path(str(shards)) / "manifest.json") if shards else {}
    manifest = manifests[shards]
    names = manifest.get("class_names") or manifest.get("classes")
    if names:
        return f"{len(names)}: " + ", ".join(map(str, names))
    confusion = (metrics.get("test") or metrics.get("final") or {}).get("confusion")
    return f"{len(confusion)} classes" if confusion else "unknown"


def _run_state(run_dir: Path, status: dict, metrics: dict) -> str:
    """status.json's state; "stale" when it says running but the run's process is gone."""
    from tltrain.engine.rundir import is_stale

    if is_stale(run_dir, status):
        return "stale"
    return status.get("state", "completed" if metrics else "unknown")


def collect_runs(sweep_dir: str | Path) -> list[dict]:
    """One row per run folder below sweep_dir (recursively), finished or not."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise DataError(f"{sweep_dir}: not a folder")
    run_dirs = sorted({p.parent for name in ("metrics.json", "status.json") for p in sweep_dir.rglob(name)})
    rows, manifests = [], {}
    for run_dir in run_dirs:
        config = _load_yaml(run_dir / "config.yaml")
        status = _read_json(run_dir / "status.json")
        metrics = _read_json(run_dir / "metrics.json")
        split, final = _final_metrics(metrics)
        row = {
            "run": str(run_dir.relative_to(sweep_dir)) or ".",
            "status": _run_state(run_dir, status, metrics),
            "step": status.get("step"),
            "data": _dig(config, "data.name"),
            "classes": _label_set(config, metrics, manifests),
            "schedule": _dig(config, "schedule.name"),
            "model": _dig(config, "model.arch"),
            "weights": initial_weights(_dig(config, "model.weights")),
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


def mean_ci(values) -> tuple[int, float | None, float | None]:
    """(n, mean, half-width of the 95 % t-interval over seeds); the half-width is None for n < 2."""
    import numpy as np
    from scipy import stats

    values = np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))],
                        dtype=np.float64)
    if len(values) == 0:
        return 0, None, None
    if len(values) == 1:
        return 1, float(values[0]), None
    half = stats.t.ppf((1 + CONFIDENCE) / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return len(values), float(values.mean()), float(half)


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per configuration of completed runs: n, and per metric mean and CI half-width."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["status"] == "completed":
            key = tuple(row.get(k) for k in PANEL_KEYS + CONFIG_KEYS)
            groups.setdefault(key, []).append(row)
    summary = []
    for key, members in sorted(groups.items(), key=lambda item: tuple(str(v) for v in item[0])):
        entry = dict(zip(PANEL_KEYS + CONFIG_KEYS, key))
        entry["n"] = len(members)
        entry["seeds"] = ",".join(str(m.get("seed")) for m in members)
        for metric in METRIC_COLUMNS + PERF_COLUMNS:
            _, mean, half = mean_ci(m.get(metric) for m in members)
            entry[metric], entry[f"{metric}_ci"] = mean, half
        summary.append(entry)
    return summary


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1000 else f"{value:.3f}"
    return str(value)


def _fmt_ci(entry: dict, metric: str) -> str:
    mean, half = entry.get(metric), entry.get(f"{metric}_ci")
    if mean is None:
        return "-"
    return _fmt(mean) if half is None else f"{_fmt(mean)} ± {_fmt(half)}"


def markdown_table(rows: list[dict], columns: list[str], formatters: dict | None = None) -> str:
    formatters = formatters or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(formatters.get(c, lambda r, c=c: _fmt(r.get(c)))(r) for c in columns) + " |"
              for r in rows]
    return "\n".join(lines)


def _has_values(entries: list[dict], metric: str) -> bool:
    """Whether any configuration of a panel has this metric (a 2-class panel has no top-2 accuracy, and no
    referable sensitivity without trainer.referable_threshold): empty columns are left out of its table."""
    return any(_fmt(entry.get(metric)) != "-" for entry in entries)


def _panels(summary: list[dict]) -> dict[tuple, list[dict]]:
    panels: dict[tuple, list[dict]] = {}
    for entry in summary:
        panels.setdefault(tuple(entry[k] for k in PANEL_KEYS), []).append(entry)
    return panels


def _or_nan(value) -> float:
    return float("nan") if value is None else value


def _config_label(entry: dict) -> str:
    return f"{entry['schedule']} / {entry['model']} / {entry['weights']}"


def plot_panels(summary: list[dict], path: Path, metrics=PLOTTED_METRICS) -> dict[str, str]:
    """One row of charts per dataset and label set, one column per metric: metric against fraction (mean and
    95 % t-interval over seeds, one line per configuration) with >= 2 fractions, else bars of the configurations.
    Returns {panel title: "vs_fraction" | "bars"} ({} when nothing completed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(summary)
    if not panels:
        return {}
    kinds = {}
    fig, axes = plt.subplots(len(panels), len(metrics), figsize=(5.2 * len(metrics), 4.2 * len(panels)),
                             squeeze=False)
    for row_axes, ((data, classes), entries) in zip(axes, panels.items()):
        fractions = sorted({e["fraction"] for e in entries if e["fraction"] is not None})
        lines: dict[str, list[dict]] = {}
        for entry in entries:
            lines.setdefault(_config_label(entry), []).append(entry)
        # one colour per schedule, dashed lines from scratch: a pair of lines per schedule reads as "with / without
        # the pretrained weights"
        schedules = sorted({e["schedule"] for e in entries}, key=str)
        for ax, metric in zip(row_axes, metrics):
            if len(fractions) >= 2:
                for label, points in lines.items():
                    points = sorted((p for p in points if p.get(metric) is not None), key=lambda p: p["fraction"])
                    if points:
                        ax.errorbar([p["fraction"] * 100 for p in points], [p[metric] for p in points],
                                    yerr=[_or_nan(p.get(f"{metric}_ci")) for p in points], marker="o", capsize=3,
                                    label=label, color=f"C{schedules.index(points[0]['schedule']) % 10}",
                                    linestyle="--" if points[0]["weights"] == "scratch" else "-")
                ax.set_xlabel("training data used (%)")
                if fractions[-1] / fractions[0] >= 4:  # 10 / 25 / 100 %: evenly spaced on a log axis
                    ax.set_xscale("log")
                    ax.minorticks_off()
                ax.set_xticks([f * 100 for f in fractions], [f"{f * 100:g}" for f in fractions])
            else:
                shown = [e for e in entries if e.get(metric) is not None]
                positions = range(len(shown))
                bars = ax.bar(positions, [e[metric] for e in shown], capsize=4, color=[f"C{i}" for i in positions],
                              yerr=[_or_nan(e.get(f"{metric}_ci")) for e in shown])  # n = 1: no bar drawn
                ax.bar_label(bars, labels=[_fmt_ci(e, metric) for e in shown], label_type="center", fontsize=8)
                ax.set_xticks(list(positions), [f"{_config_label(e)}\nn={e['n']}" for e in shown], rotation=20,
                              ha="right", fontsize=8)
                if fractions:
                    ax.set_xlabel(f"configuration (training fraction {fractions[0] * 100:g} %)")
            ax.set_ylabel(metric)
            ax.set_title(f"{data} ({classes.split(':')[0].split()[0]} classes): {metric}", fontsize=10)
            ax.grid(alpha=0.3, axis="y")
            if metric in BOUNDED_METRICS:  # one scale for every panel: bars of 0 stay visible as 0
                ends = [e[metric] + s * (e.get(f"{metric}_ci") or 0) for e in entries if e.get(metric) is not None
                        for s in (-1, 1)]
                ax.set_ylim(min([0.0, *ends]) - 0.05, max([1.0, *ends]) + 0.05)
        if len(fractions) >= 2:
            row_axes[0].legend(fontsize=7)
        kinds[f"{data} ({classes})"] = "vs_fraction" if len(fractions) >= 2 else "bars"
    fig.suptitle("mean over seeds; error bars: 95 % t-interval (none for n = 1)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return kinds


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """Write report.csv (runs), summary.csv (configurations), report.md and report.png; return paths and rows."""
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
    summary = summarise(rows)
    pd.DataFrame(summary).to_csv(out_dir / "summary.csv", index=False)

    done = [r for r in rows if r["status"] == "completed"]
    md = [f"# Sweep report: {sweep_dir}", "", f"{len(rows)} runs, {len(done)} completed.", "",
          "Each configuration: n runs (seeds) and mean ± half-width of the 95 % t-interval over them "
          "(a single run shows its value alone). Metrics: the test split of the best checkpoint by validation "
          "(split column says when only validation exists).", ""]
    summary_columns = CONFIG_KEYS + ["n"] + METRIC_COLUMNS
    formatters = {m: (lambda r, m=m: _fmt_ci(r, m)) for m in METRIC_COLUMNS}
    for (data, classes), entries in _panels(summary).items():
        shown = [c for c in summary_columns if c not in METRIC_COLUMNS or _has_values(entries, c)]
        md += [f"## {data} (classes {classes})", "", markdown_table(entries, shown, formatters), ""]
    md += ["## Runs", "", markdown_table(rows, columns), ""]
    failed = [r for r in rows if r["status"] not in ("completed",)]
    if failed:
        md += ["## Not completed", ""] + [f"- {r['run']}: {r['status']} {r.get('error', '')}" for r in failed] + [""]
    finding, comparisons = _thtl_section(rows)
    if comparisons:
        md += ["## Two-step transfer: comparisons", "",
               "Difference of the mean test metric of configurations a and b over their seeds, with the 95 % Welch "
               "t-interval (verdict 'higher'/'lower' only when the interval excludes 0).", "",
               *([f"**Finding.** {finding}", ""] if finding else []), comparisons, ""]
    plot_path = out_dir / "report.png"
    charts = plot_panels(summary, plot_path)
    has_plot = bool(charts)
    if has_plot:
        md += [f"![results per dataset]({plot_path.name})", ""]
    (out_dir / "report.md").write_text("\n".join(md))
    return {
        "csv": str(out_dir / "report.csv"),
        "summary_csv": str(out_dir / "summary.csv"),
        "markdown": str(out_dir / "report.md"),
        "plot": str(plot_path) if has_plot else None,
        "charts": charts,
        "rows": rows,
        "summary": summary,
        "finding": finding,
    }


def _thtl_section(rows: list[dict]) -> tuple[str | None, str]:
    """The finding sentence and the comparisons table (kappa, then AUC) of a THTL-shaped sweep, else (None, "")."""
    from tltrain.finding import comparisons_markdown, finding_sentence, thtl_comparisons

    by_metric = {metric: thtl_comparisons(rows, metric) for metric in ("kappa", "auc")}
    table = [c for metric in by_metric for c in by_metric[metric]]
    return finding_sentence(by_metric["kappa"]), comparisons_markdown(table) if table else ""
