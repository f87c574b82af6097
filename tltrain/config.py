"""Config loading: Hydra composes YAML from configs/, then each section is checked against its typed dataclass.

Every stage defines its own dataclass (PrepareConfig, LoaderConfig, TrainerConfig, ...) with a `validate()`;
this module composes, converts and reports errors in one readable form, before anything runs. It also holds the
run's schema (RunConfig, with DataConfig and ModelConfig): RunConfig.validate is the one place a run's config is
checked, sections and the rules between them, once, by load_run_config. tltrain.train_app re-exports the schema.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from tltrain.checks import check_number
from tltrain.data.loaders.config import LoaderConfig
from tltrain.engine.config import MAX_SEED, TrainerConfig
from tltrain.errors import ConfigError, DataError, choices_error
from tltrain.transfer.schedule_config import ScheduleConfig

T = TypeVar("T")

CONFIG_DIR = str(resources.files("tltrain.configs"))


def register_schemas() -> None:
    """Give Hydra the typed dataclasses as schemas (configs name them first in their defaults list), so every
    field can be overridden from the command line and a misspelt key fails before anything runs."""
    from hydra.core.config_store import ConfigStore

    from tltrain.data.prepare import PrepareConfig
    from tltrain.data.sources import SourceConfig

    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    store.store(name="prepare_schema", node=PrepareConfig)
    store.store(name="source_schema", node=SourceConfig)  # configs/sources/*: each entry of `sources` typed
    # configs/config.yaml: with run_dir=... set, Hydra's output folder is the run_dir itself and it writes no
    # .hydra/ copy there (config.yaml is the run's own), so no stray runs/<timestamp>/ folder appears
    if not OmegaConf.has_resolver("tltrain_or"):
        OmegaConf.register_new_resolver("tltrain_or", lambda value, default: value or default)
    if not OmegaConf.has_resolver("tltrain_hydra_subdir"):
        OmegaConf.register_new_resolver("tltrain_hydra_subdir", lambda run_dir: None if run_dir else ".hydra")
    if not OmegaConf.has_resolver("tltrain_sweep_subdir"):
        OmegaConf.register_new_resolver("tltrain_sweep_subdir", sweep_subdir)
    if not OmegaConf.has_resolver("tltrain_best_if_whole"):  # the demo's grid keeps the weights it explains
        OmegaConf.register_new_resolver("tltrain_best_if_whole", lambda fraction: "best" if float(fraction) >= 1
                                        else "none")
    if not OmegaConf.has_resolver("tltrain_weights_tag"):
        OmegaConf.register_new_resolver("tltrain_weights_tag", weights_tag)


MAX_SUBDIR_BYTES = 200  # file systems allow 255 bytes per name; Hydra's override_dirname has no limit


def sweep_subdir(job_num, override_dirname: str) -> str:
    """A sweep run's folder name, `<num>_<overrides>`, cut to MAX_SUBDIR_BYTES with a hash of the whole: a sweep
    with many overrides on the command line would otherwise fail on a name too long for the file system."""
    import hashlib

    name = f"{job_num}_{override_dirname}"
    if len(name.encode()) <= MAX_SUBDIR_BYTES:
        return name
    digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:10]
    return name.encode()[:MAX_SUBDIR_BYTES - 12].decode(errors="ignore") + f"~{digest}"


def weights_tag(weights) -> str:
    """Initial weights as a short folder-name part: scratch, or the weights' run/package/file name."""
    from tltrain.report import initial_weights

    return initial_weights(weights).replace(":", "-").replace("/", "-")


def compose(config_name: str, overrides: list[str] | None = None, return_hydra_config: bool = False) -> DictConfig:
    """Compose configs/<config_name>.yaml with Hydra-style overrides (`key=value`, `group=option`); with
    return_hydra_config the `hydra` node too (e.g. an experiment's sweep, hydra.sweeper.params)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_schemas()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides or []),
                                 return_hydra_config=return_hydra_config)
    except (HydraException, OmegaConfBaseException) as exc:  # unknown option or key: Hydra lists the choices
        raise ConfigError(config_error_line(exc)) from None


def compose_prepare(overrides: list[str] | None = None) -> DictConfig:
    """configs/prepare.yaml composed. It selects `source: eyepacs` by default; with `sources=[...]` that default
    (its root left unset) is dropped, and a source given as well is refused in one line."""
    composed = compose("prepare", overrides)
    if composed.get("sources"):
        if composed.source is not None and not OmegaConf.is_missing(composed.source, "root"):
            raise ConfigError("prepare: give one source (source.root=...) or several (sources=[...] "
                              "sources.<name>.root=...), not both")
        composed.source = None
    return composed


def config_error_line(exc: BaseException, schema: type | None = None) -> str:
    """One line for a Hydra/OmegaConf composition error: the key or option, the problem and the valid choices.

    Hydra's own messages span 5-20 lines (search paths, hints about `+key`); users asked for one line that says
    what to change. `schema` is the dataclass that unknown keys are looked up in (default: RunConfig).
    """
    import difflib

    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(exc, MissingConfigException) and getattr(exc, "missing_cfg_file", None):
        group, _, option = str(exc.missing_cfg_file).rpartition("/")
        options = sorted(getattr(exc, "options", None) or [])
        if group and options:
            close = difflib.get_close_matches(option, options, n=1)
            hint = f" (did you mean {group}={close[0]}?)" if close else ""
            return f"{group}={option!r}: no such option in configs/{group}/{hint}; choose one of: {', '.join(options)}"
        return f"config {exc.missing_cfg_file!r} not found"
    if isinstance(exc, OverrideParseException):
        return f"cannot parse the override: {_first_line(exc)} (syntax: key=value, group=option, +new_key=value)"
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    full_key = getattr(cause, "full_key", None)
    message = _first_line(getattr(cause, "msg", None) or cause)
    if full_key and "not in" in message and (" Key " in f" {message}" or message.startswith("Key")):
        parent, _, name = str(full_key).rpartition(".")
        valid = _schema_keys(schema, parent)
        if valid is None:
            return f"unknown key {full_key!r}: {message}"
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" (did you mean {'.'.join(filter(None, [parent, close[0]]))}?)" if close else ""
        where = parent or "the run config"
        return f"unknown key {full_key!r}{hint}; valid keys of {where}: {', '.join(valid)}"
    env = re.search(r"Environment variable '([^']+)' not found", message)
    if env:  # e.g. +experiment=thtl's TLTRAIN_INTERMEDIATE
        where = f" (needed by {full_key})" if full_key else ""
        return (f"environment variable {env.group(1)} is not set{where}: set it, or give that value on the command "
                "line")
    if full_key:
        override = _first_line(exc) if cause is not exc else ""
        override = override.removeprefix("Error merging override ").strip()
        return f"{override or full_key}: {message}"
    return _first_line(exc)


def _first_line(exc: BaseException | str) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _schema_keys(schema: type | None, dotted_parent: str) -> list[str] | None:
    """Field names of the dataclass at `dotted_parent` inside schema (RunConfig by default); None if unknown."""
    import typing

    node: Any = RunConfig if schema is None else schema
    for part in [p for p in dotted_parent.split(".") if p]:
        if not dataclasses.is_dataclass(node):
            return None
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None
        node = hints[part]
    if not dataclasses.is_dataclass(node):
        return None
    return [f.name for f in dataclasses.fields(node)]


def to_typed(node: Any, schema: type[T], where: str = "") -> T:
    """Convert a config node to its dataclass, rejecting unknown keys and wrong types, then validate()."""
    if dataclasses.is_dataclass(node):
        node = OmegaConf.structured(node)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node if node is not None else {})
        obj = OmegaConf.to_object(merged)
    except MissingMandatoryValue as exc:  # one line naming the key as the user types it
        key = getattr(exc, "full_key", None) or "a required value"
        raise ConfigError(f"{key} is required and has no value: give it on the command line ({key}=...)") from None
    except OmegaConfBaseException as exc:
        valid = ", ".join(f.name for f in dataclasses.fields(schema))
        key = getattr(exc, "full_key", None) or ""
        prefix = f"{where}.{key}" if where and key else (where or key or schema.__name__)
        raise ConfigError(f"config {prefix}: {exc.msg if hasattr(exc, 'msg') else exc} (valid keys: {valid})") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj




# -- the run's schema: what `tltrain train` reads, and the one place it is checked ----------------------------
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class DataConfig:
    """Which shards to train on (a folder written by `tltrain prepare`) and which part of them."""

    name: str = "fundus"  # a label for reports (e.g. eyepacs, aptos, synthetic_fundus, target)
    shards: Any = MISSING  # folder holding manifest.json and the shards, or a list of such folders
    weights: list[float] | None = None  # several folders: each one's share of an epoch (None: every sample once)
    # nested training fraction recorded by prepare (0.1, 0.2, 0.25, 0.4, 0.6, 0.8, 1.0 by default)
    fraction: float = 1.0
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"  # "" skips the final test evaluation
    # before training: each shard's size + sha256 against manifest.json (~0.7 CPU-s per GB)
    verify_checksums: bool = True

    def validate(self) -> None:
        check_number("data.fraction", self.fraction, 0, 1, above=True)
        from tltrain.data.manifest import load_manifest  # bounded and validated before anything is built
        from tltrain.data.shard_set import MAX_FOLDERS, load_shard_set

        folders = self.folders()
        if not folders or len(folders) > MAX_FOLDERS or len(set(folders)) != len(folders):
            raise ConfigError(f"data.shards must be a folder or a list of 1-{MAX_FOLDERS} distinct folders")
        if self.weights is not None:
            if len(self.weights) != len(folders):
                raise ConfigError(f"data.weights has {len(self.weights)} value(s) for {len(folders)} folder(s) of "
                                  "data.shards: give one weight per folder")
            for number, weight in enumerate(self.weights):
                check_number(f"data.weights[{number}]", weight, 0, 1e6)
            if not sum(self.weights) > 0:
                raise ConfigError("data.weights: at least one folder needs a weight above 0")
        for folder in folders:
            manifest = Path(folder) / "manifest.json"
            if not manifest.is_file():
                raise DataError(f"data.shards: {folder!r}: no manifest.json there (run `tltrain prepare` first)")
            prepared = load_manifest(folder)
            for key in ("train_split", "val_split", "test_split"):  # "" skips that evaluation
                name = getattr(self, key)
                if name and name not in prepared.splits:
                    raise ConfigError(f"data.{key}={name!r} is not a split of {manifest}; its splits: "
                                      f"{', '.join(prepared.splits)}")
            fractions = sorted(float(f) for f in prepared.fractions)
            if fractions and not any(abs(self.fraction - f) < 1e-9 for f in fractions):
                raise ConfigError(f"data.fraction={self.fraction!r} was not prepared in {manifest}; "
                                  f"choose one of: {', '.join(f'{f:g}' for f in fractions)}")
        if len(folders) > 1:
            load_shard_set(folders, self.weights)  # one label set across the folders, else one DataError

    def folders(self) -> list[str]:
        """data.shards as a list of folders."""
        shards = self.shards
        if isinstance(shards, str):
            return [shards]
        if not isinstance(shards, (list, tuple)) or not all(isinstance(f, str) and f for f in shards):
            raise ConfigError(f"data.shards={shards!r} must be a folder or a list of folders")
        return list(shards)


@dataclass
class ModelConfig:
    """A timm architecture and, optionally, local weights to start from (file, tltrain run or export)."""

    arch: str = "resnet18"
    weights: str | None = None  # None = random init (from-scratch reference)
    trust_pickle: bool = False  # read a legacy pickled weights file with plain pickle (it could run code)
    drop_rate: float = 0.0

    def validate(self) -> None:
        from tltrain.timm_names import timm_model_names

        check_number("model.drop_rate", self.drop_rate, 0, 1, below=True)  # timm's dropout needs p < 1 to learn
        if not self.arch:
            raise ConfigError("model.arch is empty: name a timm architecture (e.g. model=resnet18 or "
                              "model.arch=resnet50; see timm.list_models())")
        if self.arch not in timm_model_names():
            import timm

            close = timm.list_models(f"*{self.arch}*")[:10]
            hint = f"; similar names: {', '.join(close)}" if close else "; see timm.list_models()"
            raise ConfigError(f"model.arch={self.arch!r} is not a timm model{hint}")
        if self.weights and not Path(self.weights).exists():
            raise DataError(f"model.weights={self.weights!r}: no such file or folder")


@dataclass
class RunConfig:
    """One `tltrain train` run: every section, plus the run-wide seed, run folder and device."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    run_dir: str = ""  # empty: Hydra's output folder (outputs/... or multirun/...)
    device: str = "auto"  # auto | cpu | cuda (cuda:<local rank> of each process)

    def validate(self) -> None:
        """The one check of a run's config, called once by load_run_config: each section's own validate(), then
        every rule between sections. The loaders, the schedule and the trainer call their section's validate()
        again (they also run without a RunConfig); that costs nothing while the values are unchanged
        (tltrain.checks.validate_once).

        Rules between sections, all here:
        - `seed` is the run's seed and trainer.seed follows it: left at 0 it takes seed's value, any other value
          must equal seed (ConfigError otherwise). The trainer seeds each process with trainer.seed + rank.
        - trainer.epochs stays unset: the transfer schedule sets the run's length.
        - schedule=scratch starts from random weights: no model.weights.
        Knobs that look duplicated but set different things, so neither derives from the other:
        - trainer.channels_last puts the model (and, in the trainer, each batch) in channels_last layout;
          loader.channels_last has the loader emit that layout already (on the GPU with DALI). Any pair works.
        - loader.dtype is the dtype of the batches; trainer.precision the autocast dtype (DeepSpeed: the weights'
          dtype, inputs cast to it). fp16/bf16 batches with trainer.precision=fp32 outside DeepSpeed reach an fp32
          model uncast and fail at the first forward; not refused here, since the shipped loader=dali (bf16) with
          the default trainer=cpu (fp32) must still reach the run's data checks.
        Rules that need more than the config stay where it is known: multirun vs run_dir (load_run_config, from
        Hydra's mode); the number of processes vs trainer.strategy (launch.submit.check_run, the trainer);
        num_classes from the manifest vs trainer.referable_threshold/best_metric and the batches per epoch vs
        trainer.grad_accum (the trainer); training samples vs batch size x ranks (the torch loader)."""
        check_number("seed", self.seed, 0, MAX_SEED, integer=True)
        if self.device not in DEVICES:
            raise choices_error("device", self.device, DEVICES)
        if self.trainer.seed == 0:  # before the trainer's check, so its validation covers the value it will run
            self.trainer.seed = self.seed
        for part in (self.data, self.model, self.loader, self.schedule, self.trainer):
            part.validate()
        if self.trainer.epochs is not None:
            raise ConfigError(f"trainer.epochs={self.trainer.epochs!r} is not used by tltrain train: the transfer "
                              "schedule sets the run's length; use schedule.epochs_per_phase (the whole run for "
                              "finetune_all/scratch/linear_probe/layer_decay), schedule.step_epochs (swft) or "
                              "schedule.phases (custom)")
        if self.schedule.name == "scratch" and self.model.weights:
            raise ConfigError("schedule=scratch is the random-init reference: set model.weights=null "
                              f"(got {self.model.weights!r}) or choose finetune_all")
        if self.trainer.seed != self.seed:
            raise ConfigError(f"trainer.seed={self.trainer.seed!r} contradicts seed={self.seed!r}: in tltrain train "
                              "the run's seed sets the trainer's; set seed instead (and leave trainer.seed unset)")


def load_run_config(cfg: DictConfig | dict, *, multirun: bool = False) -> RunConfig:
    """Typed, validated run config (RunConfig.validate, once); Hydra's own `hydra` node is not part of it. Paths
    become absolute. multirun: the config is one job of a sweep, which must not set run_dir."""
    node = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)) if isinstance(cfg, DictConfig) else cfg
    if isinstance(node, DictConfig) and "hydra" in node:
        node.pop("hydra")
    run = absolute_paths(to_typed(node, RunConfig))
    if multirun:  # several runs in one run_dir would each resume the one before
        refuse_multirun_run_dir(run)
    return run


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """data.shards, model.weights and run_dir resolved against the folder the run was launched from, so the
    config.yaml a run writes means the same from any working directory (export, report, resume)."""
    base = Path.cwd()
    try:  # inside a Hydra app with hydra.job.chdir=true the cwd moved; Hydra remembers the launch folder
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            base = Path(HydraConfig.get().runtime.cwd)
    except (ImportError, ValueError):
        pass

    def absolute(path: str | None) -> str | None:
        return str((base / Path(path).expanduser()).resolve()) if path else path

    shards = absolute(cfg.data.shards) if isinstance(cfg.data.shards, str) else \
        [absolute(folder) for folder in cfg.data.folders()]
    cfg.data.shards, cfg.model.weights, cfg.run_dir = shards, absolute(cfg.model.weights), absolute(cfg.run_dir)
    return cfg


#: Why a multirun refuses run_dir: one folder for several runs, each would resume the one before.
MULTIRUN_RUN_DIR = ("run_dir={run_dir!r} names one run's folder, but a multirun (-m) runs several: each would "
                    "resume the previous one's run there; refused. Use hydra.sweep.dir=FOLDER instead (one folder "
                    "per run, FOLDER/<num>_<overrides>), or `tltrain submit` for one run on SLURM")


def refuse_multirun_run_dir(config) -> None:
    """ConfigError when a multirun's config sets run_dir (from the command line or a config file).

    Called in each job before anything is written (load_run_config with multirun=True); the sweep summary's
    on_multirun_start calls it too, to stop the sweep before any job starts."""
    run_dir = config.get("run_dir") if hasattr(config, "get") else getattr(config, "run_dir", "")
    if run_dir:
        raise ConfigError(MULTIRUN_RUN_DIR.format(run_dir=str(run_dir)))
