"""The THTL paper's LayerCAM analysis on a step-2 grid: what each stage of a network looks at on the target, per
initial weights (scratch, the fundus model of step 1) and schedule (last layer only, SWFT, fine-tune all), measured
where the truth is known (tltrain.explain.pointing) with intervals over the seeds, as a table, a figure, example
maps and one sentence for the report.

"Before SWFT" is the fundus network with only its new head trained (schedule linear_probe: the backbone is step 1's
as it was); "after" is the same network once SWFT has unfrozen its blocks back to front.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from tltrain import safe_io
from tltrain.errors import DataError
from tltrain.run_folder import RunFolder
from tltrain.stats import mean_ci

SCHEDULE_NAMES = {"linear_probe": "last layer", "swft": "SWFT", "finetune_all": "fine-tune all"}
RESULTS = "lesion_maps.json"


def grid_runs(grid_dir: Path, fraction: float = 1.0) -> list[dict]:
    """The completed runs of a grid at one training fraction that still hold weights: {"dir", "weights" (scratch
    | step 1), "schedule", "seed"}."""
    from tltrain.export.package import read_run_config

    runs = []
    for status in sorted(Path(grid_dir).glob(f"*/{RunFolder.STATUS}")):
        run_dir = status.parent
        folder = RunFolder(run_dir)
        if folder.read_status().get("state") != "completed" or not folder.checkpoints.is_dir():
            continue
        config = read_run_config(run_dir)
        if abs(float(config["data"].get("fraction", 1.0)) - fraction) > 1e-9:
            continue
        runs.append({"dir": run_dir, "weights": "scratch" if not config["model"].get("weights") else "step 1",
                     "schedule": config["schedule"]["name"], "seed": int(config.get("seed", 0))})
    return runs


def measure_grid(grid_dir: Path, images: list, fraction: float = 1.0) -> list[dict]:
    """One row per (run, layer): pointing-game score, energy share and the uniform map's score."""
    from tltrain.explain.pointing import measure_model

    rows = []
    for run in grid_runs(grid_dir, fraction):
        measured = measure_model(run["dir"], images)
        for layer in measured["layers"]:
            rows.append({"run": run["dir"].name, "weights": run["weights"], "schedule": run["schedule"],
                         "seed": run["seed"], "layer": layer, "pointing": measured["pointing"][layer],
                         "energy": measured["energy"][layer], "uniform": measured["uniform"],
                         "images": measured["images"]})
    if not rows:
        raise DataError(f"{grid_dir}: no completed run at fraction {fraction:g} with its weights kept "
                        "(trainer.keep_after_run=best)")
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and 95 % t-interval half-width over the seeds per (weights, schedule, layer)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["weights"], row["schedule"], row["layer"]), []).append(row)
    summary = []
    for (weights, schedule, layer), members in groups.items():
        entry = {"weights": weights, "schedule": schedule, "layer": layer, "uniform": members[0]["uniform"]}
        for metric in ("pointing", "energy"):
            n, mean, half = mean_ci([m[metric] for m in members])
            entry.update({"n": n, metric: mean, f"{metric}_ci": half})
        summary.append(entry)
    return summary


def figure(summary: list[dict]) -> bytes:
    """PNG: pointing game and energy share per layer, one line per (weights, schedule) with its interval, the
    uniform map dashed."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(entry["layer"] for entry in summary))
    configs = list(dict.fromkeys((entry["weights"], entry["schedule"]) for entry in summary))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, metric, title in ((axes[0], "pointing", "pointing game (share of positive test images)"),
                                (axes[1], "energy", "map energy inside the lesion region")):
        for number, (weights, schedule) in enumerate(configs):
            points = {e["layer"]: e for e in summary if (e["weights"], e["schedule"]) == (weights, schedule)}
            x = np.arange(len(layers)) + (number - len(configs) / 2) * 0.05
            means = [points[layer][metric] if layer in points else np.nan for layer in layers]
            errors = [points[layer].get(f"{metric}_ci") or 0 if layer in points else 0 for layer in layers]
            axis.errorbar(x, means, yerr=errors, marker="o", capsize=3, linestyle="-" if weights == "step 1" else ":",
                          label=f"{weights}, {SCHEDULE_NAMES.get(schedule, schedule)}")
        axis.axhline(summary[0]["uniform"], color="grey", linestyle="--", label="uniform map")
        axis.set_xticks(range(len(layers)), layers, rotation=30)
        axis.set_ylim(0, 1)
        axis.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def example_maps(runs: list[dict], image: Path) -> bytes:
    """PNG: one positive test image's map at every stage (columns) for scratch after SWFT, the fundus network
    before SWFT (last layer only) and after SWFT (rows), seed 0 where there is one."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import torch

    from tltrain.explain.render import display_input
    from tltrain.explain.layercam import default_layers, explain_batch
    from tltrain.explain.models import load_model
    from tltrain.explain.render import overlay
    from tltrain.export.prediction import predict_input

    wanted = [("scratch", "swft", "scratch, after SWFT"), ("step 1", "linear_probe", "fundus, before SWFT"),
              ("step 1", "swft", "fundus, after SWFT")]
    chosen = []
    for weights, schedule, label in wanted:
        matches = sorted((r for r in runs if (r["weights"], r["schedule"]) == (weights, schedule)),
                         key=lambda r: r["seed"])
        if matches:
            chosen.append((matches[0], label))
    rows = []
    for run, label in chosen:
        explained = load_model(run["dir"])
        layers = default_layers(explained.model)
        tensor = predict_input(explained.preprocessing, image)
        with torch.enable_grad():
            maps = explain_batch(explained.model, tensor[None], layers, "true", [1], explained.probabilities)[0]
        shown = display_input(tensor, explained.preprocessing)
        rows.append((label, shown, [*layers, "fused"], [*maps.scaled, maps.fused]))
    columns = 1 + max(len(r[2]) for r in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.9 * columns, 2.0 * len(rows)), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for number, (label, shown, names, heats) in enumerate(rows):
        axes[number, 0].imshow(shown)
        axes[number, 0].set_title(label, fontsize=8)
        for column, (name, heat) in enumerate(zip(names, heats), start=1):
            axes[number, column].imshow(overlay(shown, heat))
            if number == 0:
                axes[number, column].set_title(name, fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def finding(summary: list[dict]) -> str:
    """One sentence: per stage, the pointing-game score of the fundus network before and after SWFT and of
    scratch after SWFT, against the uniform map, and the stage where fundus and scratch (both after SWFT) differ
    most, with their intervals over the seeds."""
    layers = list(dict.fromkeys(entry["layer"] for entry in summary))
    by_key = {(e["weights"], e["schedule"], e["layer"]): e for e in summary}

    def profile(weights, schedule):
        values = [by_key.get((weights, schedule, layer), {}).get("pointing") for layer in layers]
        return None if any(v is None for v in values) else "/".join(f"{v * 100:.0f}" for v in values) + " %"

    parts = [(label, profile(w, s)) for label, w, s in (("the fundus network before SWFT", "step 1", "linear_probe"),
                                                         ("after SWFT", "step 1", "swft"),
                                                         ("scratch after SWFT", "scratch", "swft"))]
    shown = "; ".join(f"{label} {value}" for label, value in parts if value)
    if not shown:
        return "No LayerCAM measure: the grid kept no weights of the needed runs."
    sentence = (f"Pointing game per stage ({' / '.join(layers)}) on the positive test images, where the exudates "
                f"near the macula are known: {shown} (a uniform map: {summary[0]['uniform'] * 100:.0f} %).")
    pairs = [(by_key[("step 1", "swft", layer)], by_key[("scratch", "swft", layer)]) for layer in layers
             if ("step 1", "swft", layer) in by_key and ("scratch", "swft", layer) in by_key]
    if pairs:
        fundus, scratch = max(pairs, key=lambda pair: abs(pair[0]["pointing"] - pair[1]["pointing"]))

        def value(entry):
            half = entry.get("pointing_ci")
            return f"{entry['pointing'] * 100:.0f}" + (f" ± {half * 100:.0f}" if half is not None else "") + " %"
        sentence += (f" After SWFT they differ most at {fundus['layer']}: fundus {value(fundus)} against scratch "
                     f"{value(scratch)} (n = {fundus['n']} seeds).")
    return sentence


def write_analysis(grid_dir: Path, target_shards: Path, target_raw: Path, out_dir: Path, limit: int = 40,
                   fraction: float = 1.0) -> dict:
    """Measure the grid, write lesion_maps.csv / .json / .png and lesion_examples.png into out_dir; return
    {"summary", "finding", "markdown"} (the report section)."""
    from tltrain.explain.pointing import positive_test_images

    images = positive_test_images(target_shards, target_raw, limit)
    if not images:
        raise DataError(f"{target_shards}: no class-1 test image with a truth record in {target_raw}")
    rows = measure_grid(grid_dir, images, fraction)
    summary = summarise(rows)
    with safe_io.atomic_open(out_dir / "lesion_maps.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    safe_io.atomic_write_json(out_dir / RESULTS, {"rows": rows, "summary": summary})
    safe_io.atomic_write_bytes(out_dir / "lesion_maps.png", figure(summary))
    safe_io.atomic_write_bytes(out_dir / "lesion_examples.png", example_maps(grid_runs(grid_dir, fraction),
                                                                             images[0][0]))
    sentence = finding(summary)
    lines = ["## What the networks look at (LayerCAM)", "",
             f"LayerCAM maps of the true class on {len(images)} positive test images (exudates near the macula, "
             f"where the lesions are known by construction), runs at training fraction {fraction:g}, mean ± 95 % "
             "t-interval over the seeds; `fused` is the element-wise maximum over the stages "
             "(docs/explain.md).", "", f"**Finding.** {sentence}", "",
             "| weights | schedule | layer | pointing game | energy share | uniform map |", "|---|---|---|---|---|---|"]
    for entry in summary:
        def cell(metric):
            half = entry.get(f"{metric}_ci")
            return f"{entry[metric]:.2f}" + (f" ± {half:.2f}" if half is not None else "")
        lines.append(f"| {entry['weights']} | {SCHEDULE_NAMES.get(entry['schedule'], entry['schedule'])} | "
                     f"{entry['layer']} | {cell('pointing')} | {cell('energy')} | {entry['uniform']:.2f} |")
    lines += ["", "![pointing game and energy share per stage](lesion_maps.png)", "",
              "![one positive test image, each stage](lesion_examples.png)", ""]
    return {"summary": summary, "finding": sentence, "markdown": "\n".join(lines)}
