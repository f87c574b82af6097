"""What `tltrain pipeline CONFIG` reads: the whole chain from downloaded datasets to a published checkpoint as one
typed config (configs/pipeline/*.yaml, or a YAML file of the user's, with Hydra overrides on the command line).

Each stage holds the overrides of the command a user would otherwise type (`tltrain prepare ...`,
`tltrain train ...`), so nothing here restates those commands' options: the pipeline only adds what links the
stages (shard folders, run folders, the package) and the resources each stage asks SLURM for.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from omegaconf import MISSING
from omegaconf.errors import OmegaConfBaseException

from tltrain.errors import ConfigError
from tltrain.launch.config import LaunchConfig

#: A source or pipeline name becomes a folder name and a SLURM job name: plain characters only.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: Overrides the pipeline sets itself (linking the stages): a config that sets them is refused, not overruled.
LINKED_PREPARE = ("out=", "phase=", "task=")
LINKED_TRAIN = ("run_dir=", "data.shards=", "data.weights=")


@dataclass
class Resources:
    """What one stage's jobs ask SLURM for; None: the pipeline's `launch` value."""

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    time_min: int | None = None
    partition: str | None = None
    setup: list[str] = field(default_factory=list)  # shell lines after launch.setup (e.g. export OMP_NUM_THREADS=1)


@dataclass
class SourceSpec:
    """One dataset as `tltrain prepare` reads it (its overrides, without out=), written as `tasks` array tasks."""

    prepare: list[str] = MISSING
    tasks: int = 1  # check and write arrays of this many tasks, then one finish job
    weight: float = 1.0  # its share of a step-1 epoch (data.weights) when there are several sources
    resources: Resources = field(default_factory=Resources)


@dataclass
class TrainSpec:
    """Step 1, the intermediate-domain training: `tltrain train` overrides; data.shards comes from the sources."""

    overrides: list[str] = field(default_factory=list)
    resources: Resources = field(default_factory=Resources)


@dataclass
class ExportSpec:
    which: str = "best"  # best | last checkpoint of step 1
    license: str = "cc-by-4.0"  # a Hugging Face licence id (https://hf.co/docs/hub/repositories-licenses) or text
    description: str = ""
    resources: Resources = field(default_factory=Resources)


@dataclass
class EvaluateSpec:
    """The package on every source's test splits, one job per source (per-source metrics with intervals)."""

    splits: list[str] = field(default_factory=lambda: ["test"])  # a source without any of them is an error
    batch_size: int = 32
    device: str = "auto"  # auto: cuda where the job has a GPU, else cpu
    resamples: int = 1000  # bootstrap resamples of each interval
    resources: Resources = field(default_factory=Resources)


@dataclass
class GridSpec:
    """Step 2 on the target: a grid of `tltrain train` runs (an array), e.g. +experiment=thtl's own sweep.

    The sweep is the experiment's hydra.sweeper.params with `sweep` on top (same key: replaced). Where a value is
    `${oc.env:TLTRAIN_INTERMEDIATE}` (thtl.yaml), it is the exported package."""

    overrides: list[str] = field(default_factory=list)
    sweep: list[str] = field(default_factory=list)  # e.g. ["schedule=linear_probe,swft", "seed=0,1"]
    runs_at_once: int = 2  # local executor only: runs in flight at once (SLURM runs the array as it can)
    resources: Resources = field(default_factory=Resources)


@dataclass
class ReportSpec:
    lesions: str | None = None  # the target's raw folder with lesions.json: LayerCAM against known lesions
    resources: Resources = field(default_factory=Resources)


@dataclass
class PipelineConfig:
    name: str = MISSING  # names the package and the jobs
    out: str = MISSING  # everything the pipeline writes: shards/, runs/, export/, evaluation/, grid/, package/
    paths: dict[str, str] = field(default_factory=dict)  # named folders the config refers to as ${paths.<name>}
    sources: dict[str, SourceSpec] = field(default_factory=dict)  # the intermediate domain (one or several)
    target: SourceSpec | None = None  # the step-2 dataset (None: no grid, no transfer finding)
    train: TrainSpec = field(default_factory=TrainSpec)
    export: ExportSpec = field(default_factory=ExportSpec)
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec)
    grid: GridSpec | None = None
    report: ReportSpec = field(default_factory=ReportSpec)
    launch: LaunchConfig = field(default_factory=LaunchConfig)  # defaults of every job (nodes: see resources)

    def validate(self) -> None:
        if not NAME.fullmatch(self.name):
            raise ConfigError(f"pipeline name={self.name!r}: letters, digits, '_', '.', '-' only (it names folders "
                              "and jobs), at most 64 characters")
        if not self.sources:
            raise ConfigError("pipeline sources: give at least one (sources.<name>.prepare=[source=..., "
                              "source.root=...])")
        for name, spec in self.sources.items():
            self._check_source(f"sources.{name}", name, spec)
        if self.target is not None:
            self._check_source("target", "target", self.target)
            if "target" in self.sources:
                raise ConfigError("pipeline: a source named 'target' would share the target's shard folder")
        if (self.grid is None) != (self.target is None):
            raise ConfigError("pipeline: a grid needs a target dataset and a target needs a grid (give both or "
                              "neither)")
        for key, overrides in (("train.overrides", self.train.overrides),
                               ("grid.overrides", self.grid.overrides if self.grid else [])):
            linked = [o for o in overrides if o.lstrip("+~").startswith(LINKED_TRAIN)]
            if linked:
                raise ConfigError(f"pipeline {key}: {linked[0]!r} is set by the pipeline (it links the stages); "
                                  "remove it")
        if self.grid is not None and self.grid.runs_at_once < 1:
            raise ConfigError(f"pipeline grid.runs_at_once={self.grid.runs_at_once} must be >= 1")
        if self.export.which not in ("best", "last"):
            raise ConfigError(f"pipeline export.which={self.export.which!r}: best or last")
        if not self.evaluate.splits:
            raise ConfigError("pipeline evaluate.splits: give at least one split (e.g. [test])")
        if self.evaluate.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"pipeline evaluate.device={self.evaluate.device!r}: auto, cpu or cuda")
        if self.evaluate.resamples < 100:
            raise ConfigError(f"pipeline evaluate.resamples={self.evaluate.resamples} must be >= 100")
        if self.launch.nodes != 1 or self.launch.tasks_per_node != 1:
            raise ConfigError("pipeline launch.nodes/tasks_per_node: set them per stage (train.resources.nodes, "
                              "train.resources.tasks_per_node), not for every job")
        self.launch.validate()
        for stage, resources in self.resources().items():
            self.stage_launch(stage).validate()
            if stage != "train" and resources.nodes * resources.tasks_per_node > 1 and stage != "grid":
                raise ConfigError(f"pipeline {stage}.resources: one task (only training runs on several)")

    @staticmethod
    def _check_source(where: str, name: str, spec: SourceSpec) -> None:
        if not NAME.fullmatch(name):
            raise ConfigError(f"pipeline {where}: the name {name!r} must be letters, digits, '_', '.', '-'")
        if spec.tasks < 1:
            raise ConfigError(f"pipeline {where}.tasks={spec.tasks} must be >= 1")
        if not spec.weight >= 0:
            raise ConfigError(f"pipeline {where}.weight={spec.weight} must be >= 0")
        linked = [o for o in spec.prepare if o.lstrip("+~").startswith(LINKED_PREPARE)]
        if linked:
            raise ConfigError(f"pipeline {where}.prepare: {linked[0]!r} is set by the pipeline (shards go to "
                              f"<out>/shards/{name}); remove it")

    def resources(self) -> dict[str, Resources]:
        found = {"train": self.train.resources, "export": self.export.resources,
                 "evaluate": self.evaluate.resources, "report": self.report.resources}
        found.update({f"prepare:{n}": s.resources for n, s in self.sources.items()})
        if self.target is not None:
            found["prepare:target"] = self.target.resources
        if self.grid is not None:
            found["grid"] = self.grid.resources
        return found

    def stage_launch(self, stage: str) -> LaunchConfig:
        """The LaunchConfig of one stage's jobs: the pipeline's `launch`, with the stage's resources on top."""
        resources = self.resources()[stage]
        values = {f.name: getattr(self.launch, f.name) for f in fields(LaunchConfig)}
        for f in fields(Resources):
            value = getattr(resources, f.name)
            if value is not None and f.name != "setup":
                values[f.name] = value
        values["setup"] = list(self.launch.setup) + list(resources.setup)
        return LaunchConfig(**values)

    # -- where each stage writes -----------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return Path(self.out).expanduser().resolve()

    def shards(self, source: str) -> Path:
        return self.root / "shards" / source

    @property
    def step1_dir(self) -> Path:
        return self.root / "runs" / "step1"

    @property
    def export_dir(self) -> Path:
        return self.root / "export" / self.name

    @property
    def evaluation_dir(self) -> Path:
        return self.root / "evaluation"

    @property
    def grid_dir(self) -> Path:
        return self.root / "grid"

    @property
    def package_dir(self) -> Path:
        return self.root / "package" / self.name


def compose_pipeline(config: str, overrides: list[str] | None = None) -> PipelineConfig:
    """CONFIG is a name under configs/pipeline/ (e.g. `demo`) or a YAML file; overrides are Hydra's."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    from tltrain.config import CONFIG_DIR, config_error_line, register_schemas, to_typed

    path = Path(config).expanduser()
    user_node = None
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"{config}: no such pipeline file")
        directory, name = str(path.resolve().parent), path.stem
        user_node = _user_file(path)
    else:
        if not NAME.fullmatch(config) or not (Path(CONFIG_DIR) / "pipeline" / f"{config}.yaml").is_file():
            shipped = sorted(p.stem for p in (Path(CONFIG_DIR) / "pipeline").glob("*.yaml"))
            raise ConfigError(f"pipeline {config!r}: not a file (.yaml) nor a shipped pipeline ({', '.join(shipped)})")
        directory, name = str(Path(CONFIG_DIR) / "pipeline"), config
    register_schemas()
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)  # configs/pipeline/*'s defaults
    if user_node is not None:  # typed like the shipped ones: every key overridable, a misspelt one refused
        name = "tltrain_user_pipeline"
        ConfigStore.instance().store(name=name, node=user_node)
    try:
        with initialize_config_dir(config_dir=directory, version_base="1.3"):
            composed = hydra_compose(config_name=name, overrides=list(overrides or []))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError("pipeline: " + config_error_line(exc, PipelineConfig).replace("the run config",
                                                                                         "the pipeline")) from None
    return to_typed(composed, PipelineConfig, where="pipeline")


def _user_file(path: Path):
    """A user's pipeline YAML (data: bounded, parsed without running anything) on the typed schema, or None when
    it has a defaults list of its own (then Hydra composes it as it is)."""
    from omegaconf import OmegaConf

    from tltrain import safe_io
    from tltrain.config import to_typed

    loaded = safe_io.load_yaml(path, what="pipeline config")
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a pipeline config is a mapping (name: ..., out: ..., sources: ...)")
    if "defaults" in loaded:
        return None
    try:
        return OmegaConf.merge(OmegaConf.structured(PipelineConfig), OmegaConf.create(loaded))
    except OmegaConfBaseException as exc:
        to_typed(OmegaConf.create(loaded), PipelineConfig, where=str(path))  # its one-line error
        raise ConfigError(f"{path}: {exc}") from None
