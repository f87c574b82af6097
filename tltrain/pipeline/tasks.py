"""What each job of a pipeline runs, and the record it leaves when it succeeds.

A job is a picklable callable (submitit runs it on SLURM or with its local executor). On success it writes
<out>/.pipeline/records/<stage>/<task>.json: the stage's fingerprint (its settings and those of every stage before
it) and its result (digests, metrics, paths). A re-run of the pipeline skips a task by that record, not by the
existence of its outputs; a task that failed, was cancelled or never ran has none and is submitted again.

Training tasks (step 1 and each grid run) are `TrainJob`s: requeued after preemption, resumed from their own
checkpoints, and they raise unless the run completed, so SLURM marks the job FAILED and cancels its dependants.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from tltrain import safe_io
from tltrain.errors import DataError, TltrainError
from tltrain.launch.submit import TrainJob
from tltrain.pipeline.state import write_record
from tltrain.run_folder import RunFolder


class StageTask:
    """One task of a stage that is not training: `action` (a name in ACTIONS) with its arguments."""

    def __init__(self, root: str, stage: str, task: int, fingerprint: str, action: str, args: dict):
        self.root, self.stage, self.task, self.fingerprint = str(root), stage, task, fingerprint
        self.action, self.args = action, dict(args)

    def __call__(self) -> dict:
        print(f"tltrain pipeline: stage {self.stage} task {self.task}: {self.action}", flush=True)
        result = ACTIONS[self.action](**self.args)
        write_record(self.root, self.stage, self.task, self.fingerprint, result)
        return result

    def __repr__(self) -> str:
        return f"StageTask({self.stage}[{self.task}], {self.action})"


class StageTrainJob(TrainJob):
    """A training run of the pipeline: a TrainJob that records its result when the run completed and raises
    otherwise (a failed run must fail its job, or SLURM would start the stages that need its weights)."""

    def __init__(self, overrides: list[str], run_dir: str | Path, attempt: int = 0, *, root: str = "",
                 stage: str = "", task: int = 0, fingerprint: str = ""):
        super().__init__(overrides, run_dir, attempt)
        self.root, self.stage, self.task, self.fingerprint = str(root), stage, task, fingerprint

    def __call__(self) -> dict:
        result = super().__call__()  # a preempted run is requeued (or exits) in there
        if result.get("status") != "completed":
            raise TltrainError(f"{self.run_dir}: the run ended {result.get('status')!r}"
                               + (f" (exit code {result['exit_code']})" if result.get("exit_code") else ""))
        write_record(self.root, self.stage, self.task, self.fingerprint, {
            "run_dir": self.run_dir, "step": result.get("step"), "epoch": result.get("epoch"),
            "test": _numbers(result.get("test") or {}), "final": _numbers(result.get("final") or {})})
        return result

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(StageTrainJob(self.overrides, self.run_dir, self.attempt + 1, root=self.root,
                                               stage=self.stage, task=self.task, fingerprint=self.fingerprint))

    def __repr__(self) -> str:
        return f"StageTrainJob({self.stage}[{self.task}], run_dir={self.run_dir!r}, attempt={self.attempt})"


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# -- the actions ----------------------------------------------------------------------------------------------
def prepare(overrides: list[str], phase: str, task: str) -> dict:
    """One phase of `tltrain prepare` (check, write or finish) for task i/K; finish records the manifest's digest."""
    from tltrain.launch.prepare_job import PrepareTask

    summary = PrepareTask(overrides, phase, task)() or {}
    if phase != "finish":
        return {"phase": phase, "task": task}
    out = next(o.split("=", 1)[1] for o in overrides if o.startswith("out="))
    manifest = Path(out) / "manifest.json"
    return {"phase": phase, "shards": out, "manifest_sha256": safe_io.sha256_file(manifest),
            "counts": summary.get("counts")}


def export(run_dir: str, out_dir: str, which: str, license: str, description: str) -> dict:
    from tltrain.export.package import export_run

    meta = export_run(run_dir, out_dir, which=which, license=license, description=description, force=True)
    return {"package": out_dir, "digest": meta["digest"], "checkpoint": meta["checkpoint"]["name"]}


def evaluate(package: str, source: str, shards: str, splits: list[str], out_dir: str, batch_size: int,
             resamples: int, device: str = "auto") -> dict:
    """The package on each of `splits` that the source's shards hold: metrics, 95 % bootstrap intervals from the
    per-image predictions, and the files. A source holding none of the splits is an error naming its splits."""
    import torch

    from tltrain.data.manifest import load_manifest
    from tltrain.export.evaluation import evaluate as evaluate_package

    available = list(load_manifest(shards).splits)
    present = [s for s in splits if s in available]
    if not present:
        raise DataError(f"{shards}: source {source} has none of the splits {splits} to evaluate on (its splits: "
                        f"{', '.join(available)}); set evaluate.splits")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    results = {}
    for split in present:
        out = Path(out_dir) / f"{source}_{split}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        metrics = evaluate_package(package, shards, split=split, batch_size=batch_size, device=device, out=out,
                                   resamples=resamples)
        # a folder of several sources (a multi-source prepare): each one's metrics and intervals too
        results[split] = {"count": metrics["count"], "metrics": _numbers(metrics), "file": str(out),
                          "ci": metrics["ci"], "per_source": {
                              name: {"count": part["count"], "metrics": _numbers(part), "ci": part.get("ci") or {}}
                              for name, part in (metrics.get("per_source") or {}).items()}}
    return {"source": source, "splits": results, "absent": [s for s in splits if s not in available]}


def report(grid_dir: str, target_shards: str, lesions: str | None, out_dir: str) -> dict:
    """The grid's report (table, plot, comparisons and finding) and, where the target's lesions are known, how
    far each network's LayerCAM maps point at them."""
    from tltrain.report import write_report

    written = write_report(grid_dir, out_dir)
    result = {"markdown": written["markdown"], "plot": written["plot"], "finding": written["finding"],
              "counts": written["counts"], "unreadable": written["unreadable"],
              "comparisons": [_comparison(c) for c in written["comparisons"]]}
    if lesions:
        result["layercam"] = lesion_analysis(Path(grid_dir), Path(target_shards), Path(lesions),
                                             Path(written["markdown"]))
    return result


def _comparison(comparison) -> dict:
    return {"metric": comparison.metric, "fraction": comparison.fraction, "a": comparison.label_a,
            "b": comparison.label_b, "n_a": comparison.n_a, "n_b": comparison.n_b, "mean_a": comparison.mean_a,
            "mean_b": comparison.mean_b, "diff": comparison.diff, "low": comparison.low, "high": comparison.high,
            "verdict": comparison.verdict}


def lesion_analysis(grid_dir: Path, target_shards: Path, target_raw: Path, report_md: Path) -> dict | None:
    """tltrain.explain.thtl on the grid's whole-fraction runs (the ones that kept their best weights): the report
    gets its figure, table and sentence; the runs' weights are removed afterwards (the grid keeps metrics only).
    A re-run reuses the saved measure. None (said on stdout) when the lesions or the kept weights are missing."""
    from tltrain.data.synth_dme import LESIONS_FILE
    from tltrain.explain.thtl import RESULTS, grid_runs, write_analysis

    maps_md = report_md.parent / "lesion_maps.md"
    if (report_md.parent / RESULTS).exists() and maps_md.exists():
        markdown = maps_md.read_text()
    elif not (target_raw / LESIONS_FILE).exists() or not grid_runs(grid_dir):
        print(f"no LayerCAM measure: {target_raw / LESIONS_FILE} or the grid's kept weights are missing", flush=True)
        return None
    else:
        markdown = write_analysis(grid_dir, target_shards, target_raw, report_md.parent)["markdown"]
        safe_io.atomic_write_text(maps_md, markdown)
        for run in grid_runs(grid_dir):
            shutil.rmtree(RunFolder(run["dir"]).checkpoints, ignore_errors=True)
    text = report_md.read_text()
    if markdown not in text:
        safe_io.atomic_write_text(report_md, text.rstrip("\n") + "\n\n" + markdown)
    finding = next((line.removeprefix("**Finding.** ") for line in markdown.splitlines()
                    if line.startswith("**Finding.**")), "")
    return {"markdown": str(maps_md), "finding": finding,
            "figures": [str(report_md.parent / n) for n in ("lesion_maps.png", "lesion_examples.png")
                        if (report_md.parent / n).is_file()]}


def package(root: str, name: str, export_dir: str, out_dir: str, target: str | None) -> dict:
    """The publishable package (tltrain.pipeline.publish): the export plus the card with every stage's results."""
    from tltrain.pipeline.publish import write_final_package

    return write_final_package(Path(root), name, Path(export_dir), Path(out_dir), target)


ACTIONS = {"prepare": prepare, "export": export, "evaluate": evaluate, "report": report, "package": package}
