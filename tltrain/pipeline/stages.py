"""The pipeline as a graph of stages: which jobs each stage runs, which stages it waits for, and its fingerprint.

    prepare:<source>:check -> :write -> :finish   (each source; arrays of `tasks` tasks, then one job)
    prepare:target:check   -> :write -> :finish
    train (step 1 on every source's shards)  after every source's finish
    export                                   after train
    evaluate:<source> (each official test split of that source)   after export
    grid (step 2 on the target, an array)    after export and the target's finish
    report (table, finding, LayerCAM)        after grid
    package (the publishable repository)     after report and every evaluate

A stage's fingerprint hashes its own settings and the fingerprints of the stages it waits for, so a record written
under other settings (anywhere upstream) never counts as done for this config.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field

from tltrain.launch.config import LaunchConfig
from tltrain.pipeline.config import PipelineConfig
from tltrain.pipeline.tasks import StageTask, StageTrainJob

INTERMEDIATE_ENV = "TLTRAIN_INTERMEDIATE"  # configs/experiment/thtl.yaml names the step-1 weights by it


@dataclass
class Stage:
    name: str
    what: str  # one line for the DAG view
    after: tuple[str, ...]
    launch: LaunchConfig
    specs: list[dict]  # one per task: what its fingerprint hashes and how its job is built
    at_once: int | None = None  # local executor: tasks in flight at once (None: all)
    fingerprints: list[str] = field(default_factory=list)

    @property
    def tasks(self) -> int:
        return len(self.specs)

    def job(self, root: str, task: int):
        """The callable of one task (picklable: submitit sends it to the job)."""
        spec = self.specs[task]
        if spec["kind"] == "train":
            return StageTrainJob(spec["overrides"], spec["run_dir"], root=root, stage=self.name, task=task,
                                 fingerprint=self.fingerprints[task])
        return StageTask(root, self.name, task, self.fingerprints[task], spec["action"], spec["args"])


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]


def build_stages(cfg: PipelineConfig) -> list[Stage]:
    """Every stage of the config, in an order where each comes after the stages it waits for."""
    root = cfg.root
    stages: list[Stage] = []
    datasets = dict(cfg.sources)
    if cfg.target is not None:
        datasets["target"] = cfg.target
    for name, source in datasets.items():
        overrides = list(source.prepare) + [f"out={cfg.shards(name)}"]
        launch = cfg.stage_launch(f"prepare:{name}")
        before: tuple[str, ...] = ()
        for phase in ("check", "write", "finish"):
            count = 1 if phase == "finish" else source.tasks
            stage = f"prepare:{name}:{phase}"
            stages.append(Stage(stage, f"tltrain prepare {phase} of {name} ({count} task{'s' * (count > 1)})",
                                before, launch, [{"kind": "task", "action": "prepare", "args": {
                                    "overrides": overrides, "phase": phase, "task": f"{i}/{count}"}}
                                    for i in range(count)]))
            before = (stage,)

    sources = list(cfg.sources)
    shards = [str(cfg.shards(n)) for n in sources]
    linked = [f"data.shards=[{','.join(shards)}]" if len(shards) > 1 else f"data.shards={shards[0]}"]
    if len(shards) > 1:
        linked.append(f"data.weights=[{','.join(str(cfg.sources[n].weight) for n in sources)}]")
    stages.append(Stage("train", f"step 1 on {', '.join(sources)}", tuple(f"prepare:{n}:finish" for n in sources),
                        cfg.stage_launch("train"), [{"kind": "train", "overrides": list(cfg.train.overrides) + linked,
                                                     "run_dir": str(cfg.step1_dir)}]))
    stages.append(Stage("export", f"package of step 1 ({cfg.export.which} checkpoint)", ("train",),
                        cfg.stage_launch("export"), [{"kind": "task", "action": "export", "args": {
                            "run_dir": str(cfg.step1_dir), "out_dir": str(cfg.export_dir), "which": cfg.export.which,
                            "license": cfg.export.license, "description": cfg.export.description}}]))
    for name in sources:
        stages.append(Stage(f"evaluate:{name}", f"package on {name}'s {'/'.join(cfg.evaluate.splits)} split",
                            ("export",), cfg.stage_launch("evaluate"), [{"kind": "task", "action": "evaluate", "args": {
                                "package": str(cfg.export_dir), "source": name, "shards": str(cfg.shards(name)),
                                "splits": list(cfg.evaluate.splits), "out_dir": str(cfg.evaluation_dir),
                                "batch_size": cfg.evaluate.batch_size, "device": cfg.evaluate.device,
                                "resamples": cfg.evaluate.resamples}}]))
    last = tuple(f"evaluate:{n}" for n in sources)
    if cfg.grid is not None:
        cells = grid_cells(cfg)
        stages.append(Stage("grid", f"step 2 on the target: {len(cells)} runs", ("export", "prepare:target:finish"),
                            cfg.stage_launch("grid"), [{"kind": "train", "overrides": overrides,
                                                        "run_dir": str(cfg.grid_dir / name)}
                                                       for name, overrides in cells],
                            at_once=cfg.grid.runs_at_once))
        stages.append(Stage("report", "grid report, transfer finding, LayerCAM", ("grid",), cfg.stage_launch("report"),
                            [{"kind": "task", "action": "report", "args": {
                                "grid_dir": str(cfg.grid_dir), "target_shards": str(cfg.shards("target")),
                                "lesions": str(os.path.abspath(os.path.expanduser(cfg.report.lesions)))
                                if cfg.report.lesions else None, "out_dir": str(cfg.grid_dir)}}]))
        last = last + ("report",)
    stages.append(Stage("package", "the publishable repository (card with every result)", last,
                        cfg.stage_launch("report"), [{"kind": "task", "action": "package", "args": {
                            "root": str(root), "name": cfg.name, "export_dir": str(cfg.export_dir),
                            "out_dir": str(cfg.package_dir), "target": "target" if cfg.grid is not None else None}}]))
    by_name = {}
    for stage in stages:
        upstream = sorted(fp for name in stage.after for fp in by_name[name].fingerprints)
        stage.fingerprints = [_digest({"stage": stage.name, "spec": spec, "after": upstream}) for spec in stage.specs]
        by_name[stage.name] = stage
    return stages


def grid_cells(cfg: PipelineConfig) -> list[tuple[str, list[str]]]:
    """(folder name, overrides) of each step-2 run: the grid's overrides, the experiment's sweep with the config's
    sweep on top, expanded in Hydra's order (BasicSweeper); the step-1 weights are the exported package."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from tltrain.config import compose

    package = str(cfg.export_dir)
    before = os.environ.get(INTERMEDIATE_ENV)
    os.environ[INTERMEDIATE_ENV] = package  # what ${oc.env:TLTRAIN_INTERMEDIATE} of the experiment's sweep names
    try:
        composed = compose("config", list(cfg.grid.overrides), return_hydra_config=True)
        params = {str(k): str(v) for k, v in (composed.hydra.sweeper.get("params") or {}).items()}
    finally:
        if before is None:
            os.environ.pop(INTERMEDIATE_ENV, None)
        else:
            os.environ[INTERMEDIATE_ENV] = before
    for item in cfg.grid.sweep:
        key, _, value = item.partition("=")
        params[key] = value
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    batches = BasicSweeper.split_arguments(parsed, None)
    target = [f"data.shards={cfg.shards('target')}"]
    cells = []
    for index, swept in enumerate(batches[0] if batches else [[]]):
        values = dict(o.split("=", 1) for o in swept)
        tags = [_weights_tag(values[key], package) if key == "model.weights" else values[key] for key in values]
        name = re.sub(r"[^A-Za-z0-9._=-]+", "-", "_".join([str(index)] + tags))[:120]
        cells.append((name, list(cfg.grid.overrides) + target + swept))
    return cells


def _weights_tag(value: str, package: str) -> str:
    """A cell's initial weights in its folder name; the same before and after the package exists (a re-run must
    find the same folders)."""
    if value in ("null", "None", ""):
        return "scratch"
    return "step1" if os.path.abspath(value) == package else os.path.basename(value.rstrip("/")) or "weights"
