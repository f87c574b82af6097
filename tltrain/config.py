"""Config loading: Hydra composes YAML from configs/, then each section is checked against its typed dataclass.

Every stage defines its own dataclass (PrepareConfig, LoaderConfig, TrainerConfig, ...) with a `validate()`;
this module only composes, converts and reports errors in one readable form, before anything runs.
"""
from __future__ import annotations

import dataclasses
import re
from importlib import resources
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tltrain.errors import ConfigError

T = TypeVar("T")

CONFIG_DIR = str(resources.files("tltrain.configs"))


def register_schemas() -> None:
    """Give Hydra the typed dataclasses as schemas (configs name them first in their defaults list), so every
    field can be overridden from the command line and a misspelt key fails before anything runs."""
    from hydra.core.config_store import ConfigStore

    from tltrain.data.prepare import PrepareConfig
    from tltrain.train_app import RunConfig

    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    store.store(name="prepare_schema", node=PrepareConfig)
    # configs/config.yaml: with run_dir=... set, Hydra's output folder is the run_dir itself and it writes no
    # .hydra/ copy there (config.yaml is the run's own), so no stray runs/<timestamp>/ folder appears
    if not OmegaConf.has_resolver("tltrain_or"):
        OmegaConf.register_new_resolver("tltrain_or", lambda value, default: value or default)
    if not OmegaConf.has_resolver("tltrain_hydra_subdir"):
        OmegaConf.register_new_resolver("tltrain_hydra_subdir", lambda run_dir: None if run_dir else ".hydra")
    if not OmegaConf.has_resolver("tltrain_sweep_subdir"):
        OmegaConf.register_new_resolver("tltrain_sweep_subdir", sweep_subdir)
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


def compose(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose configs/<config_name>.yaml with Hydra-style overrides (`key=value`, `group=option`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_schemas()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides or []))
    except (HydraException, OmegaConfBaseException) as exc:  # unknown option or key: Hydra lists the choices
        raise ConfigError(config_error_line(exc)) from None


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

    if schema is None:
        from tltrain.train_app import RunConfig

        schema = RunConfig
    node: Any = schema
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
    except OmegaConfBaseException as exc:
        valid = ", ".join(f.name for f in dataclasses.fields(schema))
        key = getattr(exc, "full_key", None) or ""
        prefix = f"{where}.{key}" if where and key else (where or key or schema.__name__)
        raise ConfigError(f"config {prefix}: {exc.msg if hasattr(exc, 'msg') else exc} (valid keys: {valid})") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


