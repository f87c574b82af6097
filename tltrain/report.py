"""`tltrain report SWEEP_DIR`: aggregate finished runs into CSVs, a Markdown report and one chart per dataset.

A run is any folder below SWEEP_DIR holding `metrics.json` (written by the trainer); its `config.yaml` says what
was run (schedule, model, initial weights, data, fraction, seed) and `status.json` whether it finished. Runs that
failed are listed with their status rather than dropped, so a sweep's table never hides a hole; a "running" run
whose process is gone (kill -9, lost node: rundir.is_stale) is listed as "stale", as `tltrain jobs` shows it.
A run folder may be someone else's (a shared sweep): its files are read bounded (tltrain.safe_io), every value the
report uses is checked, and a folder that cannot be read is listed as "unreadable" with the reason; text from the
files is escaped in Markdown, CSV and on the terminal, and every output is a new file renamed into place.

Configurations (dataset, label set, schedule, model, initial weights, fraction) are summarised over their seeds as
n and mean ± the half-width of a 95 % t-interval (no interval for n = 1). Each dataset and label set gets its own
table and its own row of charts, so a 5-grade and a 2-class run never share an axis. A chart plots a metric
against the training fraction when a dataset has runs at two or more fractions, and is otherwise a bar chart of
the configurations.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

from tltrain import safe_io
from tltrain.errors import DataError
from tltrain.export.package_format import METADATA
from tltrain.run_folder import METRICS_LIMIT, STATUS_LIMIT, RunFolder
from tltrain.stats import CONFIDENCE, mean_ci  # noqa: F401 (both importable from here, as before)

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
MAX_TEXT_CHARS = 1000  # a name read from a config (data.name, schedule.name, model.arch, model.weights)
MAX_LABEL_CHARS = 500  # the label set built from a manifest's class names
UNREADABLE = "unreadable"


def _exists(path: Path) -> bool:
    """Whether anything is at path (a dangling symlink counts: reading it gives the reason)."""
    return path.exists() or path.is_symlink()


def _read_config(path: Path) -> dict:
    """config.yaml as plain containers ({} when absent): bounded, alias-bomb capped, never resolved."""
    if not _exists(path):
        return {}
    try:
        return safe_io.load_yaml(path, what=RunFolder.CONFIG)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _read_object(path: Path, limit: int, what: str) -> dict:
    """A JSON object a run wrote ({} when absent): regular file, size and depth capped; DataError otherwise."""
    if not _exists(path):
        return {}
    try:
        value = safe_io.load_json(path, limit, what)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, not {type(value).__name__}")
    return value


def _shards_manifest(shard_dir: Path) -> dict:
    """The shards' manifest.json, bounded and validated by the one manifest reader; {} when absent."""
    from tltrain.data.manifest import load_manifest

    return load_manifest(shard_dir) if _exists(shard_dir / "manifest.json") else {}


def _part(tree: dict, key: str, where: str) -> dict:
    """A block of a file that must be a JSON object when present ({} when absent or null)."""
    value = tree.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DataError(f"{where}: {key} must be an object, not {type(value).__name__}")
    return value


def _config_value(tree: dict, dotted: str, where: str):
    """A dotted key of config.yaml (None if unset); a part on the way that is not a mapping (`data: fundus`) is a
    DataError, not a silent None."""
    node = tree
    for depth, part in enumerate(dotted.split(".")):
        if node is None:
            return None
        if not isinstance(node, dict):
            above = ".".join(dotted.split(".")[:depth])
            raise DataError(f"{where}: {above} must be a mapping, not {type(node).__name__}")
        node = node.get(part)
    return node


def _text_value(tree: dict, dotted: str, where: str):
    """A name from config.yaml: text (or a plain number, as YAML reads `data.name: 2020`), bounded; None if unset."""
    value = _config_value(tree, dotted, where)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: {dotted} must be text, not {type(value).__name__}")
    if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
        raise DataError(f"{where}: {dotted} is {len(value):,} characters long (at most {MAX_TEXT_CHARS}); refused")
    return value


def _optional_number(value, where: str, low=None, high=None, integer: bool = False):
    return None if value is None else safe_io.finite_number(value, where, low, high, integer=integer)


def _metric_value(value, where: str):
    """A metric as the trainer writes it: a number (NaN and inf allowed: a diverged run's loss) or null.
    Bounded metrics (kappa, accuracy, ...) lie in [-1, 1] or are NaN; a number too large for a float is refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where} must be a number, not {safe_io.printable(repr(value), 100)}")
    try:
        number = float(value)
    except OverflowError:
        raise DataError(f"{where} is too large a number ({len(str(value))} digits)") from None
    if where.rsplit(".", 1)[-1] in BOUNDED_METRICS and not math.isnan(number) and not -1 <= number <= 1:
        raise DataError(f"{where} must lie in [-1, 1], not {number:g}")  # (NaN is allowed: an AUC without both
        # classes present)
    return number


def initial_weights(weights: str | None) -> str:
    """A short name for where a run's weights came from: scratch, imagenet, or the run or package folder."""
    if not weights:
        return "scratch"
    path = Path(str(weights))
    if path.is_dir() or path.suffix == "":
        if (path / METADATA).is_file():
            return f"package:{path.name}"
        return f"run:{path.name}"
    if (path.parent / METADATA).is_file():  # a package's weights file
        return f"package:{path.parent.name}"
    if path.parent.name == RunFolder.CHECKPOINTS:  # a checkpoint file inside a run folder
        return f"run:{path.parent.parent.name}"
    lowered = path.name.lower()
    if any(tag in lowered for tag in ("imagenet", "in1k", "in21k", "in22k", "in12k")):
        return "imagenet"
    return f"file:{path.stem}"


def _final_metrics(metrics: dict, where: str) -> tuple[str, dict]:
    """The evaluation the report shows: the test split (best checkpoint) if the run has it, else validation of
    the best checkpoint, else the last validation."""
    test = _part(metrics, "test", where)
    if test:
        return "test", test
    best = _part(_part(metrics, "best", where), "val", f"{where}: best") or _part(metrics, "final", where)
    return ("val", best) if best else ("", {})


def _manifest_label(manifest: dict, where: str) -> str | None:
    """"N: name, name, ..." from a manifest's class names (cut to MAX_LABEL_CHARS); None when it lists none."""
    names = manifest.get("class_names") or manifest.get("classes")
    if not names:
        return None
    if not isinstance(names, list) or not all(isinstance(n, (str, int, float)) for n in names):
        raise DataError(f"{where}: class_names must be a list of names")
    label = f"{len(names)}: " + ", ".join(map(str, names))
    return label if len(label) <= MAX_LABEL_CHARS else label[:MAX_LABEL_CHARS] + "..."


def _label_set(config: dict, metrics: dict, manifests: dict, where: str) -> str:
    """The run's classes as read from its shards' manifest (cached), else the size of its confusion matrix."""
    folders = _config_value(config, "data.shards", where)
    if isinstance(folders, list) and folders:  # several folders share one label set: the first one's names it
        folders = folders[0]
        config = {**config, "data": {**config["data"], "shards": folders}}
    shards = _text_value(config, "data.shards", where)
    if shards not in manifests:
        try:
            manifests[shards] = _shards_manifest(Path(str(shards))) if shards else {}
        except DataError as exc:
            manifests[shards] = exc
    manifest = manifests[shards]
    if isinstance(manifest, DataError):
        raise DataError(f"{where}: data.shards: {manifest}")
    label = _manifest_label(manifest, str(Path(str(shards)) / "manifest.json"))
    if label:
        return label
    confusion = (_part(metrics, "test", where) or _part(metrics, "final", where)).get("confusion")
    if confusion is not None and not isinstance(confusion, list):
        raise DataError(f"{where}: confusion must be a list, not {type(confusion).__name__}")
    return f"{len(confusion)} classes" if confusion else "unknown"


def _status_fields(status: dict, where: str) -> dict:
    """The status.json values the report and is_stale use, type-checked (pid and host decide staleness)."""
    fields = {"state": status.get("state"), "step": status.get("step"), "error": status.get("error"),
              "pid": status.get("pid"), "host": status.get("host")}
    for key in ("state", "error", "host"):
        if fields[key] is not None and not isinstance(fields[key], str):
            raise DataError(f"{where}: {key} must be text, not {type(fields[key]).__name__}")
    if fields["state"] is not None and len(fields["state"]) > 100:
        raise DataError(f"{where}: state is {len(fields['state']):,} characters long; refused")
    _optional_number(fields["step"], f"{where}: step", 0, 2 ** 63, integer=True)
    _optional_number(fields["pid"], f"{where}: pid", 1, 2 ** 31 - 1, integer=True)
    return {key: value for key, value in fields.items() if value is not None}


def _run_state(run_dir: Path, status: dict, metrics: dict) -> str:
    """status.json's state; "stale" when it says running but the run's process is gone."""
    from tltrain.engine.rundir import is_stale

    if is_stale(run_dir, status):
        return "stale"
    return status.get("state", "completed" if metrics else "unknown")


def _run_row(run_dir: Path, name: str, manifests: dict) -> dict:
    """One run folder as a report row; DataError naming the file and the value when any of its files is bad."""
    folder = RunFolder(run_dir)
    config_where, status_where, metrics_where = str(folder.config), str(folder.status), str(folder.metrics)
    config = _read_config(folder.config)
    status = _status_fields(_read_object(folder.status, STATUS_LIMIT, RunFolder.STATUS), status_where)
    metrics = _read_object(folder.metrics, METRICS_LIMIT, RunFolder.METRICS)
    split, final = _final_metrics(metrics, metrics_where)
    if split and final.get("count") == 0:  # an evaluation that read no sample has no metric to show
        raise DataError(f"{metrics_where}: the {split} evaluation read no sample (count 0): no metrics to report")
    weights = _text_value(config, "model.weights", config_where)
    row = {
        "run": name,
        "status": _run_state(run_dir, status, metrics),
        "step": status.get("step"),
        "data": _text_value(config, "data.name", config_where),
        "classes": _label_set(config, metrics, manifests, config_where),
        "schedule": _text_value(config, "schedule.name", config_where),
        "model": _text_value(config, "model.arch", config_where),
        "weights": initial_weights(None if weights is None else str(weights)),
        "fraction": _optional_number(_config_value(config, "data.fraction", config_where),
                                     f"{config_where}: data.fraction", 0, 1),
        "seed": _optional_number(_config_value(config, "seed", config_where), f"{config_where}: seed",
                                 -2 ** 63, 2 ** 64, integer=True),
        "split": split,
    }
    if row["fraction"] == 0:
        raise DataError(f"{config_where}: data.fraction must be above 0")
    for key in METRIC_COLUMNS:
        row[key] = _metric_value(final.get(key), f"{metrics_where}: {split}.{key}")
    perf = _part(metrics, "perf", metrics_where)
    for key in PERF_COLUMNS:
        row[key] = _metric_value(perf.get(key), f"{metrics_where}: perf.{key}")
    if status.get("error"):
        row["error"] = status["error"]
    per_source = _per_source(final, f"{metrics_where}: {split}.per_source")
    if per_source:
        row["per_source"] = per_source
    return row


MAX_SOURCES = 64


def _per_source(final: dict, where: str) -> list[dict]:
    """A run's metrics per source (a test split of several sources), checked like its pooled metrics."""
    value = final.get("per_source")
    if value is None:
        return []
    if not isinstance(value, dict) or len(value) > MAX_SOURCES:
        raise DataError(f"{where} must be a JSON object of at most {MAX_SOURCES} sources")
    entries = []
    for name, part in value.items():
        if not isinstance(part, dict) or len(str(name)) > 100:
            raise DataError(f"{where}: {safe_io.printable(repr(name), 100)} must name a JSON object of metrics")
        entry = {"source": str(name), "count": _optional_number(part.get("count"), f"{where}.{name}.count", 0,
                                                               2 ** 63, integer=True)}
        for key in METRIC_COLUMNS:
            entry[key] = _metric_value(part.get(key), f"{where}.{name}.{key}")
        entries.append(entry)
    return entries


def _unreadable_row(name: str, reason: str) -> dict:
    """A run folder the report could not read: listed with the reason, never dropped."""
    row = {column: None for column in RUN_COLUMNS + ["split"] + METRIC_COLUMNS + PERF_COLUMNS}
    row.update(run=name, status=UNREADABLE, error=reason)
    return row


def collect_runs(sweep_dir: str | Path) -> list[dict]:
    """One row per run folder below sweep_dir (recursively), finished or not; a folder whose files cannot be read
    is one row with status "unreadable" and the reason (the others are still reported)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise DataError(f"{sweep_dir}: not a folder")
    run_dirs = sorted({p.parent for name in (RunFolder.METRICS, RunFolder.STATUS) for p in sweep_dir.rglob(name)})
    rows, manifests = [], {}
    for run_dir in run_dirs:
        name = str(run_dir.relative_to(sweep_dir)) or "."
        try:
            rows.append(_run_row(run_dir, name, manifests))
        except DataError as exc:
            rows.append(_unreadable_row(name, str(exc)))
    if not rows:
        raise DataError(f"{sweep_dir}: no runs found (no {RunFolder.METRICS} or {RunFolder.STATUS} below it)")
    return rows


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


def _md(value) -> str:
    """A value as Markdown: text from a file escaped (no links, HTML, table bars, newlines), numbers formatted."""
    return safe_io.markdown_cell(value) if isinstance(value, str) else _fmt(value)


def markdown_table(rows: list[dict], columns: list[str], formatters: dict | None = None) -> str:
    """A Markdown table; every cell not produced by a formatter is escaped (run names and errors come from files)."""
    formatters = formatters or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(formatters.get(c, lambda r, c=c: _md(r.get(c)))(r) for c in columns) + " |"
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
    return _plot_text(f"{entry['schedule']} / {entry['model']} / {entry['weights']}")


def _plot_text(text, limit: int = 80) -> str:
    """Text from a file as a matplotlib label: control characters shown, cut, `$` not read as mathtext (a stray
    one would abort the chart), and no leading underscore (matplotlib hides such legend entries)."""
    text = safe_io.printable(text, limit).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


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
            ax.set_title(_plot_text(f"{data} ({classes.split(':')[0].split()[0]} classes): {metric}"), fontsize=10)
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
    with _output(path) as handle:  # replaces a symlink at path, never follows it
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)
    return kinds


def _csv_frame(frame):
    """The table as written to CSV: text from files with control characters shown and formula-like cells quoted
    (a run named `=HYPERLINK(...)` is text in a spreadsheet); numbers unchanged."""
    def cell(value):
        return safe_io.csv_cell(safe_io.printable(value, None)) if isinstance(value, str) else value
    return frame.apply(lambda column: column.map(cell)) if len(frame.columns) else frame


@contextlib.contextmanager
def _output(path: Path, mode: str = "wb", **kwargs):
    """An output written as a new file renamed into place (a symlink at path is replaced, never followed); a
    failure (a folder at path, a read-only folder, a full disk) is one DataError line naming the file."""
    try:
        with safe_io.atomic_open(path, mode, durable=False, **kwargs) as handle:
            yield handle
    except OSError as exc:
        raise DataError(f"{path}: cannot write the report ({exc.strerror or exc})") from None


def _write_csv(frame, path: Path) -> None:
    with _output(path, "w", newline="", encoding="utf-8") as handle:
        _csv_frame(frame).to_csv(handle, index=False)


def _not_completed_lines(rows: list[dict]) -> list[str]:
    """The runs that did not complete, each with its state and error, escaped: one Markdown line per run."""
    failed = [r for r in rows if r["status"] != "completed"]
    if not failed:
        return []
    return ["## Not completed", ""] + [
        f"- {safe_io.markdown_cell(r['run'])}: {safe_io.markdown_cell(str(r['status']))} "
        f"{safe_io.markdown_cell(r.get('error') or '')}".rstrip() for r in failed] + [""]


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """Write report.csv (runs), summary.csv (configurations), report.md and report.png; return paths and rows.

    Every output is a new file renamed into place; run folders that could not be read are listed with the reason
    and counted ("unreadable" in the result)."""
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
    _write_csv(frame[columns + (["error"] if "error" in frame else [])], out_dir / "report.csv")
    summary = summarise(rows)
    _write_csv(pd.DataFrame(summary), out_dir / "summary.csv")

    done = [r for r in rows if r["status"] == "completed"]
    unreadable = sum(r["status"] == UNREADABLE for r in rows)
    counts = f"{len(rows)} runs, {len(done)} completed" + (f", {unreadable} unreadable" if unreadable else "")
    md = [f"# Sweep report: {safe_io.markdown_cell(str(sweep_dir))}", "", counts + ".", "",
          "Each configuration: n runs (seeds) and mean ± half-width of the 95 % t-interval over them "
          "(a single run shows its value alone). Metrics: the test split of the best checkpoint by validation "
          "(split column says when only validation exists).", ""]
    summary_columns = CONFIG_KEYS + ["n"] + METRIC_COLUMNS
    formatters = {m: (lambda r, m=m: _fmt_ci(r, m)) for m in METRIC_COLUMNS}
    for (data, classes), entries in _panels(summary).items():
        shown = [c for c in summary_columns if c not in METRIC_COLUMNS or _has_values(entries, c)]
        md += [f"## {_md(data)} (classes {_md(classes)})", "", markdown_table(entries, shown, formatters), ""]
    md += ["## Runs", "", markdown_table(rows, columns), ""]
    by_source = [{"run": row["run"], "split": row["split"], **entry} for row in rows
                 for entry in row.get("per_source", [])]
    if by_source:  # test splits of several sources: each one's figures beside the pooled ones above
        source_columns = ["run", "split", "source", "count"] + [m for m in METRIC_COLUMNS
                                                                 if any(e.get(m) is not None for e in by_source)]
        _write_csv(pd.DataFrame(by_source)[source_columns], out_dir / "per_source.csv")
        md += ["## Per source", "", "Each run's metrics on the samples of each source of its split "
               "(per_source.csv).", "", markdown_table(by_source, source_columns), ""]
    md += _not_completed_lines(rows)
    finding, comparisons, compared = _thtl_section(rows)
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
    markdown = "\n".join(md)
    with _output(out_dir / "report.md") as handle:
        handle.write(markdown.encode("utf-8"))
    return {
        "csv": str(out_dir / "report.csv"),
        "per_source_csv": str(out_dir / "per_source.csv") if by_source else None,
        "summary_csv": str(out_dir / "summary.csv"),
        "markdown": str(out_dir / "report.md"),
        "markdown_text": markdown,  # what was written: print this, not the file (which a shared folder may swap)
        "plot": str(plot_path) if has_plot else None,
        "charts": charts,
        "rows": rows,
        "summary": summary,
        "finding": finding,
        "comparisons": compared,  # tltrain.finding.Comparison, kappa then AUC
        "unreadable": unreadable,
        "counts": counts,
    }


def _thtl_section(rows: list[dict]) -> tuple[str | None, str, list]:
    """The finding sentence, the comparisons table (kappa, then AUC) and the comparisons themselves of a
    THTL-shaped sweep, else (None, "", [])."""
    from tltrain.finding import comparisons_markdown, finding_sentence, thtl_comparisons

    by_metric = {metric: thtl_comparisons(rows, metric) for metric in ("kappa", "auc")}
    table = [c for metric in by_metric for c in by_metric[metric]]
    return finding_sentence(by_metric["kappa"]), comparisons_markdown(table) if table else "", table
