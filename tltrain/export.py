"""Pretrained packages: a run's weights as safetensors + metadata that says exactly what they are + a model card.

A package is a folder:
  model.safetensors   consolidated fp32 weights (single, DDP or DeepSpeed ZeRO runs alike)
  tltrain.json        architecture, classes, input size, the exact preprocessing, training data (manifest hash,
                      counts, fraction), schedule and resolved config, which checkpoint and how it was chosen, its
                      validation and test metrics with bootstrap intervals, versions, licence, weights sha256
  config.json         timm's config: `timm.create_model("local-dir:PKG", pretrained=True)` loads the package
  README.md           model card: intended use, data, test set, checkpoint choice, metrics with 95 % intervals,
                      what referable means, how to load it (tltrain or plain timm)
  SHA256SUMS          sha256 of every file that changes what is loaded (weights, tltrain.json, config.json), in
                      `sha256sum -c` format; the sha256 of SHA256SUMS itself is the package digest, printed by
                      export, evaluate and predict, for users to compare with the value the publisher announced

A package is someone else's data. Before a model is built, `load_pretrained`, `evaluate`, `predict` and
`model.weights=<package>` (tltrain.models) read tltrain.json bounded, validate every value it holds (weights.file
a plain name inside the package, a timm architecture, bounded class counts, sizes and filter parameters), verify
SHA256SUMS, and compare config.json (what plain timm builds) with tltrain.json. The checksums catch accidental
edits and mismatched files; they do not make a package trustworthy: whoever can edit it can recompute them, which
only the digest compared with a published value reveals.

Export writes the package into a temporary folder beside the target and renames it into place; an existing
package is replaced only with force=True (`--force`). The same checkpoint gives the same bytes (no timestamps, no
unordered metadata, the card names the package folder rather than an absolute path).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import tltrain
from tltrain import safe_io
from tltrain.data.manifest import load_manifest
from tltrain.errors import ConfigError, DataError
from tltrain.safe_io import sha256_file
from tltrain.preprocess import FILTER_VERSION
from tltrain.preprocess_config import MAX_RADIUS

WEIGHTS = "model.safetensors"
METADATA = "tltrain.json"
TIMM_CONFIG = "config.json"
CHECKSUMS = "SHA256SUMS"
CARD = "README.md"
FORMAT = "tltrain-pretrained/1"
#: tltrain.json holds the run's config and metrics: a few hundred KB at most; config.json a few KB.
METADATA_LIMIT = 16 * safe_io.MiB
CHECKSUMS_LIMIT = 64 * 1024


def read_run_config(run_dir: Path) -> dict:
    """The run's config.yaml as plain containers, read without resolving anything (safe_io.load_yaml).

    A run writes config.yaml resolved, so a `${...}` left in it was put there by hand; resolving it would publish
    whatever it names (`${oc.env:AWS_SECRET_ACCESS_KEY}`) in tltrain.json and the card, and keeping it as text
    would publish a config that is not the one the run used. It is refused, naming the key."""
    path = run_dir / "config.yaml"
    config = safe_io.load_yaml(path, what="run config")
    stack = [((), config)]
    while stack:
        keys, value = stack.pop()
        if isinstance(value, dict):
            stack.extend(((*keys, str(k)), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend(((*keys, str(i)), v) for i, v in enumerate(value))
        elif isinstance(value, str) and "${" in value:
            raise DataError(f"{path}: {'.'.join(keys)} holds an unresolved interpolation "
                            f"{safe_io.printable(repr(value), 100)} (a run writes its config resolved: this one was "
                            "edited); refused, so that nothing it names is published")
    for dotted, kind in (("model.arch", str), ("data", dict), ("loader.size", int), ("loader.preprocess", dict),
                         ("loader.preprocess.enabled", bool)):
        _config_value(config, dotted, kind, path)
    return config


def _config_value(config: dict, dotted: str, kind: type, path: Path):
    """config[a][b]... of the expected type, or one DataError naming the key (not a KeyError traceback)."""
    value = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataError(f"{path}: {dotted} is {safe_io.printable(repr(value), 100)}, expected a {kind.__name__} "
                        "(is this a tltrain run's config?)")
    return value


def _shards_of(config: dict, run_dir: Path, shards: str | Path | None) -> Path:
    """The run's shard folder: `shards` if given, else config.yaml's data.shards (absolute since runs record it so).

    An older run may hold a path relative to the folder it was launched from: it is tried from the current folder
    and otherwise refused with a message saying how to point at the shards."""
    path = Path(shards if shards is not None else config["data"]["shards"]).expanduser()
    if not (path / "manifest.json").is_file():
        how = ("it is relative to the folder the run was started from; export from there or pass --shards DIR"
               if not path.is_absolute() else "pass --shards DIR if the shards moved")
        raise DataError(f"{run_dir / 'config.yaml'}: data.shards={str(path)!r}: no manifest.json there ({how})")
    return path.resolve()


def _checkpoint_entry(run_dir: Path, which: str) -> dict:
    from tltrain.engine.checkpoint import CheckpointManager

    manager = CheckpointManager(run_dir, is_main=False)
    entry = manager.best() if which == "best" else manager.latest()
    if entry is None:
        raise DataError(manager.pruned_message(f"--which {which}" if which != "best" else "an export")
                        or f"{manager.dir}: no {which} checkpoint (is this a finished tltrain run folder?)")
    return entry


def _checkpoint_record(entry: dict, which: str, config: dict, metrics: dict) -> dict:
    """Which checkpoint a package holds and how it was chosen, in words a model card can quote."""
    trainer = config.get("trainer", {})
    metric, mode = trainer.get("best_metric", "kappa"), trainer.get("best_mode", "max")
    best = metrics.get("best") or {}
    record = {"which": which, "name": entry["name"], "step": entry["step"], "epoch": entry["epoch"],
              "metric": metric, "value": entry.get(metric)}
    if which == "best":
        record["chosen_by"] = (f"{'highest' if mode == 'max' else 'lowest'} validation {metric} over the "
                               f"checkpoints written at validated epoch ends")
    else:
        record["chosen_by"] = "the run's latest checkpoint (not selected by a metric)"
    if best.get("checkpoint") and best["checkpoint"] != entry["name"]:
        record["best_checkpoint"] = best["checkpoint"]
    return record


def _validation_of(entry: dict, metrics: dict) -> dict:
    """The validation metrics recorded at the checkpoint's step ({} when it was not written after a validation)."""
    for record in reversed(metrics.get("history", [])):
        if record.get("step") == entry["step"] and record.get("val"):
            return record["val"]
    best = metrics.get("best") or {}
    return best.get("val", {}) if best.get("checkpoint") == entry["name"] else {}


def _head_outputs(arch: str, state: dict) -> tuple[str, tuple]:
    """The classifier's state-dict key and shape, found by timm's own answer (`get_classifier`), not by guessing."""
    import timm

    probe = timm.create_model(arch, pretrained=False, num_classes=7)
    head = probe.get_classifier()
    name = next((n for n, m in probe.named_modules() if m is head), None)
    key = f"{name}.weight"
    if name is None or key not in state:
        raise DataError(f"checkpoint has no classifier weight for {arch} (expected {key!r})")
    return key, tuple(state[key].shape)


def export_run(run_dir: str | Path, out_dir: str | Path, which: str = "best", license: str = "CC-BY-4.0",
               description: str = "", shards: str | Path | None = None, resamples: int = 1000,
               force: bool = False) -> dict:
    """Write a pretrained package for a finished run; returns its metadata (with "digest": the package digest).

    Everything the metadata says is of the exported checkpoint: its validation metrics, the test metrics the run
    computed on it (with bootstrap intervals from its per-image predictions), and how it was chosen. Export refuses
    (DataError) when the class names, num_classes and the head's output size disagree, and when out_dir holds a
    package already unless force=True."""
    import timm

    from tltrain.engine.checkpoint import consolidate_checkpoint
    from tltrain.metrics import REFERABLE_GRADE, bootstrap_ci, read_predictions_csv, referable_threshold_for
    from tltrain.models import describe_mismatch

    run_dir = Path(run_dir).resolve()
    out_dir = Path(os.path.abspath(Path(out_dir).expanduser()))
    _check_target(out_dir, force)  # before the slow part
    if not (run_dir / "config.yaml").is_file():
        raise DataError(f"{run_dir}: no config.yaml (is this a tltrain run folder?)")
    config = read_run_config(run_dir)
    arch = config["model"]["arch"]
    if arch not in timm.list_models():
        raise ConfigError(f"{run_dir / 'config.yaml'}: model.arch {safe_io.printable(repr(arch), 100)} is not a timm "
                          "model")
    entry = _checkpoint_entry(run_dir, which)
    state = consolidate_checkpoint(run_dir, which)
    shard_dir = _shards_of(config, run_dir, shards)
    manifest_path = shard_dir / "manifest.json"
    manifest = load_manifest(shard_dir)  # bounded and validated (tltrain.data.manifest)
    loss = config.get("trainer", {}).get("loss", "cross_entropy")

    # classes: the manifest's names, its num_classes and the head must tell one story
    num_classes = int(manifest.get("num_classes") or 0)
    classes = [str(c) for c in (manifest.get("classes") or [])]
    class_names = [str(c) for c in (manifest.get("class_names") or classes)]
    outputs = 1 if loss == "ordinal" else num_classes
    head_key, head_shape = _head_outputs(arch, state)
    if not num_classes or len(classes) != num_classes or len(class_names) != num_classes or head_shape[0] != outputs:
        raise DataError(f"{run_dir}: cannot export: {manifest_path} says num_classes={num_classes} with "
                        f"{len(classes)} classes {classes} and {len(class_names)} names, loss={loss} needs "
                        f"{outputs} outputs, but the checkpoint's head {head_key} has shape {list(head_shape)}")
    model = timm.create_model(arch, pretrained=False, num_classes=outputs)
    problem = describe_mismatch(state, model.state_dict())
    if problem:
        raise DataError(f"{run_dir}: checkpoint {entry['name']} does not fit {arch}: {problem}")

    metrics = safe_io.load_json_object(run_dir / "metrics.json")
    validation = _validation_of(entry, metrics)
    test = metrics.get("test") or {}
    test_of_this = test.get("checkpoint") == entry["name"]
    test_set, ci = {}, {}
    predictions = run_dir / "predictions_test.csv"
    # the rule the run's own metrics followed (metrics.referable_threshold_for), not a restatement of it
    referable = referable_threshold_for(num_classes, config.get("trainer", {}).get("referable_threshold",
                                                                                   REFERABLE_GRADE))
    if test_of_this and predictions.is_file():
        _, labels, probs = read_predictions_csv(predictions)
        counts = np.bincount(labels, minlength=num_classes)
        test_set = {"split": config["data"].get("test_split", "test"), "count": int(len(labels)),
                    "class_counts": [int(c) for c in counts]}
        ci = bootstrap_ci(probs, labels, referable, resamples=resamples, seed=0)

    fraction = config["data"].get("fraction", 1.0)
    size = config["loader"]["size"]
    preprocessing = {"recipe": "ben_graham" if config["loader"]["preprocess"]["enabled"] else "crop_resize",
                     "filter_version": FILTER_VERSION,  # tltrain.preprocess: 2 = normalised masked blur
                     "size": size, **config["loader"]["preprocess"]}
    metadata = {
        "format": FORMAT,
        "architecture": arch,
        "num_classes": num_classes,
        "num_outputs": outputs,
        "loss": loss,
        "thresholds": validation.get("thresholds"),
        "classes": classes,
        "class_names": class_names,
        "referable_threshold": referable,
        "input_size": [3, size, size],
        "preprocessing": preprocessing,
        "training_data": {
            "name": config["data"].get("name"), "shards": str(shard_dir),
            "manifest_sha256": sha256_file(manifest_path), "source": manifest.get("source"), "fraction": fraction,
            "class_counts": manifest.get("fractions", {}).get(f"{fraction:g}", {}).get("class_counts"),
            "splits": {k: {"count": v["count"], "class_counts": v["class_counts"]}
                       for k, v in manifest.get("splits", {}).items()},
        },
        "schedule": config.get("schedule"),
        "initial_weights": config["model"].get("weights"),
        "checkpoint": _checkpoint_record(entry, which, config, metrics),
        "metrics": {"validation": {k: v for k, v in validation.items() if k != "confusion"},
                    "test": {k: v for k, v in test.items() if k != "confusion"} if test_of_this else {},
                    "test_set": test_set, "test_ci": ci},
        "config": config,
        "versions": {"tltrain": tltrain.__version__, "torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
        "license": license,
        "description": description,
    }
    validate_metadata({**metadata, "weights": {"file": WEIGHTS, "sha256": "0" * 64}},
                      f"{run_dir / 'config.yaml'} (as {METADATA})")  # never publish what load would refuse
    metadata["digest"] = _publish(out_dir, force,
                                  lambda folder: _write_package(folder, state, metadata, model, out_dir.name))
    return metadata


# -- writing a package: into a temporary folder beside the target, renamed into place ---------------------------
def _check_target(target: Path, force: bool) -> None:
    """Refuse a target that holds something: without force anything but an empty folder; with force anything but
    a tltrain package (a folder with tltrain.json) or an empty folder, so --force never deletes a user's folder."""
    if not os.path.lexists(target):
        return
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        return
    is_package = target.is_dir() and os.path.lexists(target / METADATA)
    if not force:
        what = "a package" if is_package else "files"
        raise DataError(f"{target}: already holds {what}; pass --force (export_run(force=True)) to replace it")
    if not is_package:
        raise DataError(f"{target}: exists and is not a tltrain package (no {METADATA}); refused to replace it")


def _temp_names(target: Path) -> tuple[str, str]:
    return f".{target.name}.export-{os.getpid()}-", f".{target.name}.old-{os.getpid()}-"


def _remove_stale_temps(target: Path) -> list[Path]:
    """Delete what a killed export of `target` left beside it: its temporary and moved-aside folders, once the
    process that made them (its pid is in the name) is gone; a live export's folders are left alone."""
    removed = []
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(export|old)-(\d+)-[^/]*")
    for path in target.parent.glob(f".{glob.escape(target.name)}.*-*"):
        found = pattern.fullmatch(path.name)
        if not found or _process_alive(int(found.group(2))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not exporting that target yet: anything of its own there is stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def _publish(target: Path, force: bool, write) -> str:
    """Run write(folder) on a new temporary folder beside `target`, then rename it into place; returns the digest.

    An existing package (force) is renamed aside, the new one renamed in, the old one removed: a reader sees the
    old package or the new one, never a mix; a kill leaves the old package (or none, between the two renames) and
    temporary folders, which the next export of the target removes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    export_prefix, old_prefix = _temp_names(target)
    folder = Path(tempfile.mkdtemp(prefix=export_prefix, dir=target.parent))
    try:
        digest = write(folder)
        os.chmod(folder, 0o777 & ~safe_io._umask())
        safe_io.fsync_folder(folder)
        _check_target(target, force)  # again: another export may have finished meanwhile
        aside = None
        if os.path.lexists(target) and not (target.is_dir() and not target.is_symlink()
                                            and not any(target.iterdir())):
            aside = target.parent / f"{old_prefix}{os.urandom(4).hex()}"
            os.rename(target, aside)
        os.replace(folder, target)  # replaces an empty folder too
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    safe_io.fsync_folder(target.parent)
    if aside is not None:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink(missing_ok=True)
    return digest


def _write_file(path: Path, data: bytes) -> None:
    """One file of a fresh temporary package folder (ours alone: no link to follow), flushed to disk."""
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _write_package(folder: Path, state: dict, metadata: dict, model, name: str) -> str:
    """The package's files, in an order that lets each describe the ones before it; returns the digest."""
    from safetensors.torch import save_file

    weights_path = folder / WEIGHTS
    # one metadata key only: safetensors keeps metadata in a hash map, whose order differs between processes
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights_path), metadata={"format": "pt"})
    metadata["weights"] = {"file": WEIGHTS, "sha256": sha256_file(weights_path), "bytes": weights_path.stat().st_size}
    _write_file(folder / METADATA, (json.dumps(metadata, indent=1, default=str) + "\n").encode())
    _write_file(folder / TIMM_CONFIG, (json.dumps(timm_config(model, metadata), indent=1) + "\n").encode())
    _write_file(folder / CARD, model_card(metadata, Path(name)).encode())  # the folder's name: no local path
    return write_checksums(folder, [WEIGHTS, METADATA, TIMM_CONFIG])


def write_checksums(folder: str | Path, names: list[str] | None = None) -> str:
    """Write SHA256SUMS for `names` (default: the files it lists now) in `folder`; returns the package digest.

    export calls it; it is also how a publisher who edits a package on purpose re-seals it (which is why the
    digest, compared with a value published elsewhere, is what tells a user the package is the announced one)."""
    folder = Path(folder)
    if names is None:
        names = [name for _, name in _read_checksums(folder)]
    lines = "".join(f"{sha256_file(safe_io.inside(folder, name, 'file'), 'package file')}  {name}\n" for name in sorted(names))
    safe_io.atomic_write_text(folder / CHECKSUMS, lines)
    return hashlib.sha256(lines.encode()).hexdigest()


def timm_config(model, meta: dict) -> dict:
    """timm's config.json, so `timm.create_model("local-dir:PKG", pretrained=True)` builds the model and loads
    model.safetensors from the package. Written by hand (a handful of keys) rather than with
    timm.models.save_config_for_hf, whose signature changes between timm releases.

    timm's data config then gives the input size, mean/std, bilinear interpolation and crop_pct 1.0 (the disc
    square already fills the image); it cannot express the Ben Graham filter, whose parameters sit beside it
    under "tltrain_preprocessing" (timm ignores that key; tltrain.load_pretrained applies them)."""
    pre = meta["preprocessing"]
    dropped = ("url", "hf_hub_id", "hf_hub_filename", "file", "state_dict", "source", "tag", "label_names",
               "label_descriptions", "label_offset", "test_input_size", "test_crop_pct", "pool_size", "origin_url",
               "paper_ids", "paper_name", "notes", "description")
    pretrained_cfg = {k: v for k, v in dict(model.pretrained_cfg).items() if k not in dropped and v is not None}
    pretrained_cfg.update({"input_size": list(meta["input_size"]), "interpolation": "bilinear", "crop_pct": 1.0,
                           "crop_mode": "center", "mean": list(pre["mean"]), "std": list(pre["std"]),
                           "num_classes": meta["num_outputs"], "license": meta["license"]})
    config = {"architecture": meta["architecture"], "num_classes": meta["num_outputs"],
              "num_features": int(getattr(model, "num_features", 0)) or None, "pretrained_cfg": pretrained_cfg,
              "tltrain_preprocessing": pre, "tltrain_metadata": METADATA}
    if meta["num_outputs"] == meta["num_classes"]:
        config["label_names"] = meta["class_names"]
    from tltrain.models import input_size_args

    size_args = input_size_args(meta["architecture"], meta["input_size"][-1])
    if size_args:  # a ViT trained at another size: timm builds it the same way (model_args) to accept it
        config["model_args"] = size_args
    return config


# -- reading a package: every value validated, every file that matters checksummed --------------------------------
MAX_OUTPUTS = 100_000  # classes / outputs (ImageNet-22k has 21 843); the head is features x outputs floats
MIN_SIZE, MAX_SIZE = 8, 4096  # input side in pixels (Ben Graham's recipe works at 512-1024)
MAX_NAME = 256
_WEIGHTS_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,200}\.(safetensors|pth|pt|bin)")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHECKSUM_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")
_TIMM_KEYS = {"architecture", "num_classes", "num_features", "pretrained_cfg", "tltrain_preprocessing",
              "tltrain_metadata", "label_names", "model_args"}


def _number(meta: dict, key: str, where: str, low, high, integer: bool, required: bool = True):
    if key not in meta and not required:
        return None
    return safe_io.finite_number(meta.get(key), f"{where}: {key}", low, high, integer)


def validate_metadata(meta: dict, path: str | Path) -> None:
    """Refuse a tltrain.json value a model, an array or a path would be built from unless it is of the right kind
    and within bounds: one DataError (ConfigError for an unknown architecture) naming the file and the key."""
    import timm

    where = str(path)
    arch = meta.get("architecture")
    if not isinstance(arch, str) or arch not in timm.list_models():
        raise ConfigError(f"{where}: architecture {safe_io.printable(repr(arch), 100)} is not a timm model")
    classes = _number(meta, "num_classes", where, 1, MAX_OUTPUTS, True)
    outputs = _number(meta, "num_outputs", where, 1, MAX_OUTPUTS, True)
    loss = meta.get("loss", "cross_entropy")
    if loss not in ("cross_entropy", "ordinal"):
        raise DataError(f"{where}: loss {safe_io.printable(repr(loss), 100)} is not cross_entropy or ordinal")
    if outputs != (1 if loss == "ordinal" else classes):
        raise DataError(f"{where}: num_outputs={outputs} does not fit num_classes={classes} with loss {loss}")
    for key in ("classes", "class_names"):
        names = meta.get(key)
        if names is not None and (not isinstance(names, list) or len(names) != classes or not all(
                isinstance(n, (str, int)) and not isinstance(n, bool) and len(str(n)) <= MAX_NAME for n in names)):
            raise DataError(f"{where}: {key} must be a list of {classes} names of at most {MAX_NAME} characters")
    thresholds = meta.get("thresholds")
    if thresholds is not None:
        if not isinstance(thresholds, list) or len(thresholds) != classes - 1:
            raise DataError(f"{where}: thresholds must be a list of {classes - 1} numbers")
        for i, value in enumerate(thresholds):
            safe_io.finite_number(value, f"{where}: thresholds[{i}]", -1e6, 1e6)
    if meta.get("referable_threshold") is not None:
        _number(meta, "referable_threshold", where, 1, max(classes - 1, 1), True)
    _validate_weights_entry(meta.get("weights"), where)
    size = _validate_preprocessing(meta.get("preprocessing"), where)
    if "input_size" in meta and meta["input_size"] != [3, size, size]:
        raise DataError(f"{where}: input_size {safe_io.printable(repr(meta['input_size']), 100)} is not "
                        f"[3, {size}, {size}] (preprocessing.size)")


def _validate_weights_entry(weights, where: str) -> None:
    if not isinstance(weights, dict):
        raise DataError(f"{where}: weights must be an object with file and sha256")
    safe_io.plain_name(weights.get("file"), _WEIGHTS_NAME, where, "weights.file")
    if not isinstance(weights.get("sha256"), str) or not _SHA256.fullmatch(weights["sha256"]):
        raise DataError(f"{where}: weights.sha256 must be 64 lower-case hex digits")


def _validate_preprocessing(pre, where: str) -> int:
    """The preprocessing values Preprocessing and the loaders use, bounded; returns the input size."""
    if not isinstance(pre, dict):
        raise DataError(f"{where}: preprocessing must be an object")
    where = f"{where}: preprocessing"
    size = _number(pre, "size", where, MIN_SIZE, MAX_SIZE, True)
    _number(pre, "radius", where, 0, MAX_RADIUS, True, required=False)  # the run config's bound
    _number(pre, "sigma_ratio", where, 1e-6, 0.999999, False, required=False)
    _number(pre, "gain", where, -1e4, 1e4, False, required=False)
    _number(pre, "offset", where, -1e4, 1e4, False, required=False)
    _number(pre, "mask_ratio", where, 0, 1.5, False, required=False)
    _number(pre, "filter_version", where, 1, 1000, True, required=False)
    for key in ("enabled", "applied_offline", "crop_to_disc"):
        if key in pre and not isinstance(pre[key], bool):
            raise DataError(f"{where}: {key} must be true or false, not {safe_io.printable(repr(pre[key]), 100)}")
    for key, low in (("mean", -1e3), ("std", 1e-6)):
        if key in pre:
            values = pre[key]
            if not isinstance(values, list) or len(values) != 3:
                raise DataError(f"{where}: {key} must be a list of 3 numbers")
            for i, value in enumerate(values):
                safe_io.finite_number(value, f"{where}: {key}[{i}]", low, 1e3)
    return size


def validate_timm_config(path: Path, meta: dict) -> None:
    """config.json is what plain timm builds the model from (`local-dir:PKG`): it must describe exactly the model
    tltrain.json does. model_args (keyword arguments to the model's constructor: an activation, a depth) must be
    the ones export writes for this architecture and size, and no others."""
    from tltrain.models import input_size_args

    config = safe_io.load_json(path, 1 * safe_io.MiB, "timm config")
    if not isinstance(config, dict):
        raise DataError(f"{path}: expected a JSON object")
    unknown = sorted(set(config) - _TIMM_KEYS)
    if unknown:
        raise DataError(f"{path}: unknown keys {safe_io.printable(unknown, 200)} (timm would apply them); refused")
    arch, size, pre = meta["architecture"], meta["preprocessing"]["size"], meta["preprocessing"]
    expected_args = input_size_args(arch, size)
    cfg = config.get("pretrained_cfg")
    checks = [("architecture", config.get("architecture"), arch),
              ("num_classes", config.get("num_classes"), meta["num_outputs"]),
              ("model_args", config.get("model_args", {}), expected_args),
              ("pretrained_cfg", type(cfg).__name__, "dict")]
    if isinstance(cfg, dict):
        checks += [("pretrained_cfg.num_classes", cfg.get("num_classes"), meta["num_outputs"]),
                   ("pretrained_cfg.input_size", cfg.get("input_size"), [3, size, size])]
        checks += [(f"pretrained_cfg.{key}", cfg.get(key), pre[key]) for key in ("mean", "std") if key in pre]
    if "tltrain_preprocessing" in config:
        checks.append(("tltrain_preprocessing", config["tltrain_preprocessing"], pre))
    for key, found, wanted in checks:
        if found != wanted:
            raise DataError(f"{path}: {key} {safe_io.printable(repr(found), 150)} differs from what {METADATA} "
                            f"describes ({safe_io.printable(repr(wanted), 150)}); refused")


def _read_checksums(folder: Path) -> list[tuple[str, str]]:
    """(sha256, name) pairs of SHA256SUMS: each a plain file name inside the package, listed once."""
    path = folder / CHECKSUMS
    entries, names = [], set()
    for number, line in enumerate(safe_io.read_text(path, CHECKSUMS_LIMIT, "checksum file").splitlines(), 1):
        found = _CHECKSUM_LINE.fullmatch(line)
        if not found:
            raise DataError(f"{path}: line {number} is not `<sha256>  <file name>`")
        name = safe_io.plain_name(found.group(2), None, str(path), "file")
        if name in names:
            raise DataError(f"{path}: {safe_io.printable(name, 100)} is listed twice")
        names.add(name)
        entries.append((found.group(1), name))
    return entries


def verify_checksums(folder: Path, meta: dict) -> str | None:
    """Check every file SHA256SUMS lists, and that it lists all that change what is loaded; returns the digest
    (sha256 of SHA256SUMS), or None with a warning for a package without one (exported before it existed)."""
    path = folder / CHECKSUMS
    if not os.path.lexists(path):
        warnings.warn(f"{folder}: no {CHECKSUMS} (a package exported before tltrain wrote one, or one it was removed "
                      f"from): only the weights' sha256 in {METADATA} is checked; re-export it to seal it",
                      RuntimeWarning, stacklevel=3)
        return None
    entries = _read_checksums(folder)
    required = {METADATA, meta["weights"]["file"]} | ({TIMM_CONFIG} if os.path.lexists(folder / TIMM_CONFIG) else set())
    missing = sorted(required - {name for _, name in entries})
    if missing:
        raise DataError(f"{path}: does not list {', '.join(missing)}, which change what is loaded; refused")
    for expected, name in entries:
        if sha256_file(safe_io.inside(folder, name, "file"), "package file") != expected:
            raise DataError(f"{folder / name}: sha256 does not match {CHECKSUMS} (edited or replaced after "
                            "export); refused")
    return hashlib.sha256(safe_io.read_bytes(path, CHECKSUMS_LIMIT, "checksum file")).hexdigest()


def _ci_text(ci: dict, name: str, fallback) -> str:
    entry = ci.get(name)
    if entry:
        return f"{entry['value']:.3f} ({entry['low']:.3f} to {entry['high']:.3f})"
    if isinstance(fallback, bool) or not isinstance(fallback, (int, float)) or fallback != fallback:
        return "-"  # absent, NaN, or not a number (metrics.json is a file someone may have edited)
    return f"{fallback:.3f}"


def model_card(meta: dict, out_dir: Path) -> str:
    data, pre, checkpoint = meta["training_data"], meta["preprocessing"], meta["checkpoint"]
    metrics = meta["metrics"]
    test, val, ci, test_set = metrics["test"], metrics["validation"], metrics.get("test_ci") or {}, metrics.get("test_set")
    referable = meta.get("referable_threshold")
    names = [safe_io.markdown_text(n, 200) for n in (meta["class_names"] or meta["classes"])]  # from the manifest
    value = checkpoint.get("value")
    chosen = (f"checkpoint `{checkpoint['name']}` (optimizer step {checkpoint['step']}, after epoch "
              f"{checkpoint['epoch']}), the {checkpoint['chosen_by']}"
              + (f" ({checkpoint['metric']} {value:.4f})" if isinstance(value, (int, float)) else "") + ".")
    rows = [("quadratic kappa", "kappa"), ("macro one-vs-rest AUC", "auc")]
    if referable is not None:
        rows += [("referable sensitivity", "sensitivity"), ("referable specificity", "specificity"),
                 ("referable AUC", "referable_auc")]
    rows += [("accuracy", "accuracy"), *([("top-2 accuracy", "top2_accuracy")] if meta["num_classes"] > 2 else []),
             ("cross-entropy", "cross_entropy")]
    table = "\n".join(f"| {label} | {_ci_text(ci, key, test.get(key)) if test else '-'} | "
                      f"{_ci_text({}, key, val.get(key))} |" for label, key in rows)
    if test_set:
        counts = ", ".join(f"{name}: {count}" for name, count in zip(names, test_set["class_counts"]))
        test_text = f"test split `{test_set['split']}`: {test_set['count']} images ({counts})."
    elif test:
        test_text = f"test split: {test.get('count')} images (no per-image predictions, so no intervals)."
    else:
        test_text = ("no test metrics of this checkpoint: the run tested another one "
                     "(run `tltrain evaluate` on this package for its own).")
    ci_text = (f"Intervals: 95 % {ci['method']}; {ci['resamples']} resamples, seed {ci['seed']}." if ci else
               "No intervals (no per-image test predictions of this checkpoint).")
    referable_text = (f"Referable DR means grade >= {referable} ({', '.join(names[referable:])}): moderate "
                      f"non-proliferative DR or worse, the usual threshold for referral to an ophthalmologist. "
                      f"Sensitivity and specificity count the predicted grade (argmax) against that threshold; "
                      f"referable AUC ranks images by P(grade >= {referable})." if referable is not None else
                      "Referable-DR metrics do not apply: the label set is not the 5-grade DR scale.")
    data = {**data, "name": safe_io.markdown_text(data["name"], 200)}
    return f"""# {meta['architecture']} pretrained on {data['name']} (tltrain)

{meta['description'] or 'An intermediate-domain checkpoint for transfer learning on fundus photographs.'}

## Intended use
Initialisation for fine-tuning on retinal (fundus) tasks or as the intermediate step of two-step transfer
(ImageNet -> fundus -> target). Not a medical device; not validated for clinical decisions.

## Data
- training data: {data['name']} ({data['fraction'] * 100:g} % of the training split), manifest sha256
  `{data['manifest_sha256']}`
- classes ({meta['num_classes']}): {', '.join(names)}
- class counts in training: {data['class_counts']}
- {test_text}

## Checkpoint
{chosen}

## Metrics
| metric | test (95 % CI) | validation |
|---|---|---|
{table}

{ci_text}
{referable_text}

## Preprocessing (applied by `tltrain.load_pretrained` and `tltrain predict`)
Ben Graham: disc crop resized to {pre['size']} px (radius {pre['size'] // 2}), out = {pre['gain']:g}*img -
{pre['gain']:g}*gauss(sigma = radius * {pre['sigma_ratio']:.4f}) + {pre['offset']:g}, outside {pre['mask_ratio']:g} *
radius set to {pre['offset']:g}; normalise with mean {pre['mean']} and std {pre['std']}. Recipe enabled:
{pre['enabled']}.

## How to load
```python
import tltrain
model, preprocess = tltrain.load_pretrained("{out_dir}")   # checks the sha256
x = preprocess(pil_image)[None]                             # (1, 3, {pre['size']}, {pre['size']})
probabilities = model(x).softmax(-1)
```
Plain timm (reads `{TIMM_CONFIG}` and `{WEIGHTS}`; timm's own transforms resize and normalise but do not apply
the Ben Graham filter, whose parameters are in `{TIMM_CONFIG}` under `tltrain_preprocessing`):
```python
import timm
model = timm.create_model("local-dir:{out_dir}", pretrained=True)
```
Weights: `{WEIGHTS}`, sha256 `{meta['weights']['sha256']}`. Licence: {meta['license']}.
Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}.
"""


@dataclass
class Preprocessing:
    """The package's preprocessing as a callable: PIL image (as opened: EXIF orientation, 16-bit, alpha and
    palette are handled by tltrain.data.decode, as in prepare and the loaders) or a decoded (H, W, 3) uint8 RGB
    array -> (3, S, S) float tensor. The disc is located as `prepare` locates it (tltrain.data.disc.locate_disc)."""

    size: int
    config: dict

    def __call__(self, image, source: str = "image") -> torch.Tensor:
        from tltrain import preprocess as P
        from tltrain.data.decode import to_rgb
        from tltrain.data.disc import locate_disc_fit

        if hasattr(image, "convert"):
            image.load()
            array = np.array(to_rgb(image, source))
        else:
            array = np.array(image)
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
                raise DataError(f"{source}: arrays must be decoded (H, W, 3) uint8 RGB, got {array.dtype} "
                                f"{array.shape} (pass the PIL image instead)")
        cfg = self.preprocess_config()
        fit = locate_disc_fit(array)
        if cfg.crop_to_disc and fit.problem:
            raise DataError(f"{source}: no fundus disc found ({fit.problem})")
        return P.reference([torch.from_numpy(array)], [fit.disc], self.size, cfg)[0]

    def preprocess_config(self):
        from tltrain.preprocess import PreprocessConfig

        fields = PreprocessConfig.__dataclass_fields__
        if self.config.get("filter_version", 1) != FILTER_VERSION:  # packages before it was recorded: version 1
            warnings.warn(f"package preprocessing is filter version {self.config.get('filter_version', 1)}; this "
                          f"tltrain applies version {FILTER_VERSION} (differs near photo edges)", RuntimeWarning)
        return PreprocessConfig(**{k: v for k, v in self.config.items() if k in fields})


def read_metadata(path: str | Path) -> dict:
    """A package's tltrain.json, read bounded and validated (validate_metadata) before anyone uses a value."""
    path = Path(path)
    meta_path = path / METADATA if path.is_dir() else path
    if not os.path.lexists(meta_path):
        raise DataError(f"{meta_path}: not found (is this a tltrain pretrained package?)")
    meta = safe_io.load_json(meta_path, METADATA_LIMIT, "package metadata")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{meta_path}: format {safe_io.printable(repr(found), 100)}, expected {FORMAT}")
    validate_metadata(meta, meta_path)
    return meta


def open_package(path: str | Path) -> tuple[dict, Path, str | None]:
    """(validated metadata, weights file, package digest or None) of a package folder, after every check that
    needs no model: tltrain.json validated, SHA256SUMS verified, the weights' sha256, config.json against
    tltrain.json. What load_pretrained, evaluate, predict and model.weights=<package> all go through."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    meta = read_metadata(path)
    digest = verify_checksums(folder, meta)
    weights = safe_io.inside(folder, meta["weights"]["file"], "weights.file")
    if not weights.is_file():
        raise DataError(f"{weights}: weights file missing")
    if sha256_file(weights, "package weights") != meta["weights"]["sha256"]:
        raise DataError(f"{weights}: sha256 does not match {METADATA} (corrupt or replaced file)")
    if os.path.lexists(folder / TIMM_CONFIG):
        validate_timm_config(folder / TIMM_CONFIG, meta)
    return meta, weights, digest


def load_pretrained(path: str | Path, device: str = "cpu", num_classes: int | None = None,
                    digest: str | None = None):
    """(model in eval mode, Preprocessing). num_classes differing from the package's gives a fresh head.

    digest: the package digest its publisher announced; a package whose SHA256SUMS hashes to another value is
    refused. The model carries the digest it was loaded from as `model.tltrain_package_digest`."""
    import timm

    from tltrain.models import describe_mismatch, input_size_args, load_weights, read_state_dict

    path = Path(path)
    meta, weights, found = open_package(path)
    if digest is not None and found != digest.strip().lower():
        raise DataError(f"{path}: package digest {found or '(no ' + CHECKSUMS + ')'} is not the expected {digest}")
    arch = meta["architecture"]
    outputs = num_classes or meta["num_outputs"]
    model = timm.create_model(arch, pretrained=False, num_classes=outputs,
                              **input_size_args(arch, meta["preprocessing"]["size"]))
    if outputs == meta["num_outputs"]:
        state = read_state_dict(weights)  # safetensors; any other file only weights-only (a package is data)
        problem = describe_mismatch(state, model.state_dict())
        if problem:  # one line with the first mismatched keys and shapes, not torch's multi-line message
            raise DataError(f"{weights}: weights do not fit {arch} with {outputs} outputs: {problem}")
        model.load_state_dict(state)
        model.tltrain_load_report = None
    else:
        model.tltrain_load_report = load_weights(model, weights)
    model.tltrain_package_digest = found
    return model.to(device).eval(), Preprocessing(meta["preprocessing"]["size"], meta["preprocessing"])


def _probabilities(outputs: torch.Tensor, meta: dict) -> torch.Tensor:
    from tltrain.engine.losses import outputs_to_probs

    if meta.get("loss") == "ordinal":
        thresholds = np.asarray(meta.get("thresholds") or np.arange(meta["num_classes"] - 1) + 0.5)
        return outputs_to_probs(outputs.float().cpu(), "ordinal", meta["num_classes"], thresholds)
    return outputs.float().softmax(-1).cpu()


def evaluation_loader(pre: Preprocessing, shards, split: str = "test", batch_size: int = 32, device: str = "cpu",
                      backend: str = "torch"):
    """The loader `evaluate` reads a split with: the backend's defaults plus the package's preprocessing."""
    from tltrain.data.loaders import LoaderConfig, build_loader

    cfg = LoaderConfig(backend=backend, batch_size=batch_size, size=pre.size, workers=2,
                       preprocess=pre.preprocess_config())
    return build_loader(cfg, shards, split, train=False, device=device)


def predict_input(pre: Preprocessing, path: str | Path) -> torch.Tensor:
    """One file as `predict` feeds it to the model: decoded by the shared rule, then the package's preprocessing."""
    from tltrain.data.decode import decode_image

    return pre(decode_image(path, str(path)), source=str(path))


def evaluate(package: str | Path, shards: str | Path, split: str = "test", batch_size: int = 32,
             device: str = "cpu", out: str | Path | None = None, backend: str = "torch",
             digest: str | None = None) -> dict:
    """Metrics of a package on a prepared split, with the package's own preprocessing.

    With `out` (a JSON file) the per-image predictions go beside it: <out stem>_predictions.csv with key, label,
    predicted class and the class probabilities."""
    from tltrain.metrics import compute_metrics, write_predictions_csv

    model, pre = load_pretrained(package, device, digest=digest)
    meta = read_metadata(package)
    loader = evaluation_loader(pre, shards, split, batch_size, device, backend)
    probs, labels, keys = [], [], []
    with torch.no_grad():
        for batch in loader:
            mask = batch.valid.cpu().numpy().astype(bool)
            probs.append(_probabilities(model(batch.images), meta).numpy()[mask])
            labels.append(batch.labels.cpu().numpy()[mask])
            keys += [k for k, m in zip(batch.keys, mask) if m]
    threshold = meta.get("referable_threshold", 2 if meta["num_classes"] == 5 else None)
    if not sum(len(part) for part in labels):  # every sample skipped (unreadable): there is nothing to score
        raise DataError(f"{shards}: split {split!r}: no sample could be read and scored; run `tltrain verify "
                        f"{shards}`")
    probs, labels = np.concatenate(probs), np.concatenate(labels)
    metrics = compute_metrics(probs, labels, threshold)
    metrics.update({"package": str(package), "package_digest": model.tltrain_package_digest,
                    "shards": str(shards), "split": split})
    if out:
        out = Path(out)
        predictions = out.with_name(out.stem + "_predictions.csv")
        write_predictions_csv(predictions, [safe_io.csv_cell(k) for k in keys], labels, probs)
        metrics["predictions"] = str(predictions)
        safe_io.atomic_write_text(out, json.dumps(metrics, indent=1, default=str))
    return metrics


def default_evaluation_path(package: str | Path, shards: str | Path, split: str) -> Path:
    """evaluate's output when --out is not given: beside the shards (the data it measures), named after the
    package, never inside the package (a folder someone else made)."""
    name = Path(os.path.abspath(package)).name or "package"
    return Path(shards) / f"evaluation_{split}_{name}.json"


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp")


def predict(package: str | Path, image_dir: str | Path, out_csv: str | Path, batch_size: int = 16,
            device: str = "cpu", progress: bool = True, digest: str | None = None) -> dict:
    """CSV of class probabilities and predicted class per image; unreadable or disc-less images are listed."""
    import csv

    from tqdm import tqdm

    model, pre = load_pretrained(package, device, digest=digest)
    meta = read_metadata(package)
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)  # before predicting, not after
    files = sorted(p for p in Path(image_dir).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{image_dir}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    names = [str(n) for n in (meta.get("class_names") or meta["classes"])]
    skipped, rows = [], []

    def flush(batch):
        if not batch:
            return
        with torch.no_grad():
            probs = _probabilities(model(torch.stack([t for _, t in batch]).to(device)), meta).numpy()
        for (path, _), p in zip(batch, probs):
            rows.append([safe_io.csv_cell(str(path.relative_to(image_dir))), *[f"{v:.6f}" for v in p],
                         int(p.argmax()), safe_io.csv_cell(names[int(p.argmax())])])

    pending = []
    for path in tqdm(files, desc="predict", disable=None if progress else True):
        try:
            tensor = predict_input(pre, path)
        except DataError as exc:
            skipped.append({"file": str(path), "reason": str(exc).split(": ", 1)[-1]})
            continue
        except Exception as exc:  # unreadable image: listed, the rest go on
            skipped.append({"file": str(path), "reason": f"cannot decode image ({type(exc).__name__}: {exc})"})
            continue
        pending.append((path, tensor))
        if len(pending) == batch_size:
            flush(pending)
            pending = []
    flush(pending)
    with safe_io.atomic_open(out_csv, "w", newline="") as f:  # creates the folder; never writes through a link
        writer = csv.writer(f)
        writer.writerow(["image", *[safe_io.csv_cell(f"p_{c}") for c in meta["classes"]], "predicted",
                         "predicted_name"])
        writer.writerows(rows)
    return {"csv": str(out_csv), "predicted": len(rows), "skipped": skipped,
            "package_digest": model.tltrain_package_digest}


__all__ = ["export_run", "load_pretrained", "open_package", "evaluate", "predict", "read_metadata", "Preprocessing",
           "write_checksums"]
