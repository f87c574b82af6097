"""The pipeline's last stage: the exported package made ready to publish as a Hugging Face model repository.

The folder holds what `timm.create_model("hf-hub:<user>/<name>", pretrained=True)` reads after an upload
(config.json, model.safetensors), tltrain's own metadata (tltrain.json, SHA256SUMS: the same files and digest as the
export), the figures, tltrain_pipeline.json (every stage's results) and README.md: the model card, whose front
matter lists the datasets, the per-source test metrics with their intervals (model-index) and the licence, and whose
text adds each source's test metrics with intervals, the transfer finding on the target with its intervals, and the
LayerCAM figures. Nothing is uploaded: README.md (project) says how.
"""
from __future__ import annotations

import json
from pathlib import Path

from tltrain import safe_io
from tltrain.export.card import front_matter, hub_results, model_card
from tltrain.export.package_format import CARD, open_package
from tltrain.export.publish import copy_new_file, publish, write_new_file
from tltrain.pipeline.state import load_results, stages_named

PIPELINE_FILE = "tltrain_pipeline.json"
CI_METRICS = (("quadratic kappa", "kappa"), ("macro AUC", "auc"), ("referable sensitivity", "sensitivity"),
              ("referable specificity", "specificity"), ("referable AUC", "referable_auc"))


def _ci_cell(split: dict, key: str) -> str:
    entry = (split.get("ci") or {}).get(key)
    if entry and entry["value"] == entry["value"]:  # (NaN: undefined on this part, e.g. one class only)
        return f"{entry['value']:.3f} ({entry['low']:.3f} to {entry['high']:.3f})"
    value = (split.get("metrics") or {}).get(key)
    return "-" if not isinstance(value, (int, float)) or value != value else f"{value:.3f}"


def _parts(evaluations: list[dict]):
    """(source name, split, part) of every evaluated split, then of each source inside a folder of several
    (named folder/source)."""
    for entry in evaluations:
        for split, part in entry["splits"].items():
            yield entry["source"], split, part
            for inner, inner_part in (part.get("per_source") or {}).items():
                yield f"{entry['source']}/{inner}", split, inner_part


def evaluation_section(evaluations: list[dict]) -> str:
    """Each source's test metrics with their 95 % bootstrap intervals, one row per source and split."""
    rows, shown = [], [(label, key) for label, key in CI_METRICS
                       if any(key in (s.get("ci") or {}) or key in (s.get("metrics") or {})
                              for e in evaluations for s in e["splits"].values())]
    for entry, split, part in _parts(evaluations):
        cells = " | ".join(_ci_cell(part, key) for _, key in shown)
        accuracy = (part.get("metrics") or {}).get("accuracy")
        rows.append(f"| {safe_io.markdown_cell(entry, 60)} | {safe_io.markdown_cell(split, 40)} | "
                    f"{part['count']} | {cells} | {'-' if accuracy is None else f'{accuracy:.3f}'} |")
    method = next((s["ci"].get("method") for e in evaluations for s in e["splits"].values() if s.get("ci")), None)
    header = "| source | split | images | " + " | ".join(label for label, _ in shown) + " | accuracy |"
    return "\n".join(["## Test metrics per source", "",
                      "The exported checkpoint on each source's official test split (`tltrain evaluate`), with 95 % "
                      "intervals" + (f" ({method})." if method else "."), "", header,
                      "|" + "---|" * (len(shown) + 4), *rows, ""])


def transfer_section(report: dict, target: str) -> str:
    """The finding of the step-2 grid on the target, its comparisons with intervals, and the figures."""
    lines = ["## Does it transfer? Step 2 on the target", "",
             f"The package as initial weights against random init on `{target}`, in a grid of schedules, training "
             f"fractions and seeds ({report.get('counts', '')}); differences of mean test metrics with 95 % Welch "
             "t-intervals over the seeds.", ""]
    if report.get("finding"):
        lines += [f"**Finding.** {report['finding']}", ""]
    comparisons = report.get("comparisons") or []
    if comparisons:
        lines += ["| metric | fraction | a | b | mean a | mean b | a - b (95 % CI) | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in comparisons:
            interval = "n < 2" if c["low"] is None else f"{c['diff']:+.3f} ({c['low']:+.3f} to {c['high']:+.3f})"
            lines.append(f"| {c['metric']} | {c['fraction']:g} | {safe_io.markdown_cell(c['a'], 60)} | "
                         f"{safe_io.markdown_cell(c['b'], 60)} | {c['mean_a']:.3f} (n={c['n_a']}) | "
                         f"{c['mean_b']:.3f} (n={c['n_b']}) | {interval} | {c['verdict']} |")
        lines.append("")
    if report.get("plot"):
        lines += ["![test metrics on the target against training fraction](transfer.png)", ""]
    layercam = report.get("layercam") or {}
    if layercam.get("finding"):
        lines += ["### Where the networks look on the target (LayerCAM against known lesions)", "",
                  f"**Finding.** {layercam['finding']}", ""]
        lines += [f"![{Path(f).stem}]({Path(f).name})" for f in layercam.get("figures", [])] + [""]
    return "\n".join(lines)


def write_final_package(root: Path, name: str, export_dir: Path, out_dir: Path, target: str | None) -> dict:
    """Copy the export, add the figures, the pipeline record and the full card; publish it at out_dir (a temporary
    folder renamed into place). The package's files and digest are the export's: README.md and the figures are not
    in SHA256SUMS, so the published digest still names these weights."""
    meta, _, digest = open_package(export_dir)  # verified (checksums, weights) before anything is copied
    evaluations = [r for stage in stages_named(root, "evaluate:") for r in load_results(root, stage)]
    report = next(iter(load_results(root, "report")), None) if target else None
    figures = {}
    if report and report.get("plot"):
        figures["transfer.png"] = Path(report["plot"])
    for figure in ((report or {}).get("layercam") or {}).get("figures", []):
        figures[Path(figure).name] = Path(figure)
    results = [hub_results(name, split, part.get("metrics") or {}, part.get("ci") or {})
               for name, split, part in _parts(evaluations)]
    sections = evaluation_section(evaluations) if evaluations else ""
    if report:
        sections += "\n" + transfer_section(report, target or "target")
    datasets = [e["source"] for e in evaluations] + ([target] if target else [])
    header = front_matter(meta, results, datasets=datasets, tags=("intermediate-domain",))
    record = {"name": name, "package_digest": digest, "evaluations": evaluations, "transfer": report,
              "export": str(export_dir)}

    def write(folder: Path) -> str:
        for path in sorted(export_dir.iterdir()):
            if path.name != CARD:
                copy_new_file(path, folder / path.name, "file of the exported package")
        for target_name, source in figures.items():
            copy_new_file(source, folder / target_name, "figure")
        write_new_file(folder / PIPELINE_FILE, (json.dumps(record, indent=1, default=str) + "\n").encode())
        write_new_file(folder / CARD, model_card(meta, Path(name), header=header, sections=sections).encode())
        return digest

    publish(out_dir, True, write)
    return {"package": str(out_dir), "digest": digest, "figures": sorted(figures)}
