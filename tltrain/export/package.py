"""Writing a package: a finished run's checkpoint as model.safetensors, tltrain.json (what the weights are, how
they were trained and chosen, their metrics), timm's config.json, the model card and SHA256SUMS.

The format and its checks are tltrain.export.package_format's; this module writes only what that reader accepts
(the metadata is validated before anything is written) and publishes it with tltrain.export.publish.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

import tltrain
from tltrain import safe_io
from tltrain.data.manifest import MANIFEST_NAME, load_manifest
from tltrain.data.shard_set import load_shard_set
from tltrain.explain.card_maps import MAPS_FILE
from tltrain.errors import ConfigError, DataError
from tltrain.export.card import model_card
from tltrain.export.publish import check_target, publish, write_new_file
from tltrain.export.package_format import (CARD, CHECKSUMS, FORMAT, METADATA, TIMM_CONFIG, WEIGHTS, input_size_args,
                                   package_digest, read_checksums, validate_metadata)
from tltrain.preprocess import FILTER_VERSION
from tltrain.run_folder import METRICS_LIMIT, RunFolder
from tltrain.safe_io import sha256_file


def read_run_config(run_dir: Path) -> dict:
    """The run's config.yaml as plain containers, read without resolving anything (safe_io.load_yaml).

    A run writes config.yaml resolved, so a `${...}` left in it was put there by hand; resolving it would publish
    whatever it names (`${oc.env:AWS_SECRET_ACCESS_KEY}`) in tltrain.json and the card, and keeping it as text
    would publish a config that is not the one the run used. It is refused, naming the key."""
    path = RunFolder(run_dir).config
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


def _shards_of(config: dict, run_dir: Path, shards: str | Path | None) -> list[Path]:
    """The run's shard folders: `shards` if given, else config.yaml's data.shards (absolute since runs record it
    so; a run on several folders lists them all).

    An older run may hold a path relative to the folder it was launched from: it is tried from the current folder
    and otherwise refused with a message saying how to point at the shards."""
    given = shards if shards is not None else config["data"]["shards"]
    folders = []
    for folder in given if isinstance(given, list) else [given]:
        path = Path(str(folder)).expanduser()
        if not (path / "manifest.json").is_file():
            how = ("it is relative to the folder the run was started from; export from there or pass --shards DIR"
                   if not path.is_absolute() else "pass --shards DIR if the shards moved")
            raise DataError(f"{RunFolder(run_dir).config}: data.shards={str(path)!r}: no manifest.json there "
                            f"({how})")
        folders.append(path.resolve())
    return folders


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
    from tltrain.metrics import REFERABLE_GRADE, referable_threshold_for

    run_dir = Path(run_dir).resolve()
    run = RunFolder(run_dir)
    out_dir = Path(os.path.abspath(Path(out_dir).expanduser()))
    check_target(out_dir, force)  # before the slow part
    if not run.config.is_file():
        raise DataError(f"{run_dir}: no {RunFolder.CONFIG} (is this a tltrain run folder?)")
    config = read_run_config(run_dir)
    arch = config["model"]["arch"]
    if arch not in timm.list_models():
        raise ConfigError(f"{run.config}: model.arch {safe_io.printable(repr(arch), 100)} is not a timm model")
    entry = _checkpoint_entry(run_dir, which)
    state = consolidate_checkpoint(run_dir, which)
    shard_dirs = _shards_of(config, run_dir, shards)
    shard_dir = shard_dirs[0]  # several folders share one label set (tltrain.data.shard_set): the first names it
    # bounded and validated (tltrain.data.manifest); several folders: their combined manifest
    manifest = load_manifest(shard_dir) if len(shard_dirs) == 1 else load_shard_set([str(d) for d in shard_dirs])
    loss = config.get("trainer", {}).get("loss", "cross_entropy")
    classes, class_names, model = _checked_model(run_dir, entry, arch, loss, state, manifest, shard_dir)
    metrics = safe_io.load_json_object(run.metrics, METRICS_LIMIT, RunFolder.METRICS)
    # the rule the run's own metrics followed (metrics.referable_threshold_for), not a restatement of it
    referable = referable_threshold_for(len(classes), config.get("trainer", {}).get("referable_threshold",
                                                                                    REFERABLE_GRADE))
    metadata = {
        "format": FORMAT, "architecture": arch, "num_classes": len(classes),
        "num_outputs": 1 if loss == "ordinal" else len(classes), "loss": loss,
        "thresholds": _validation_of(entry, metrics).get("thresholds"),
        "classes": classes, "class_names": class_names, "referable_threshold": referable,
        "input_size": [3, config["loader"]["size"], config["loader"]["size"]],
        "preprocessing": package_preprocessing(config), "training_data": _training_data(config, manifest, shard_dirs),
        "schedule": config.get("schedule"), "initial_weights": config["model"].get("weights"),
        "checkpoint": _checkpoint_record(entry, which, config, metrics),
        "metrics": _metrics_of(entry, metrics, run, config, referable, len(classes), resamples),
        "config": config,
        "versions": {"tltrain": tltrain.__version__, "torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
        "license": license, "description": description,
    }
    validate_metadata({**metadata, "weights": {"file": WEIGHTS, "sha256": "0" * 64}},
                      f"{run.config} (as {METADATA})")  # never publish what load would refuse
    maps = _card_maps(state, metadata, config, shard_dir, manifest)
    metadata["layercam"] = {"file": MAPS_FILE, "images": maps[1]} if maps else None
    metadata["digest"] = publish(out_dir, force, lambda folder: _write_package(folder, state, metadata, model,
                                                                               out_dir.name, maps and maps[0]))
    return metadata


def _card_maps(state: dict, metadata: dict, config: dict, shard_dir: Path, manifest: dict):
    """(PNG, image keys) of LayerCAM maps of a few test images per class for the card, or None (no test or
    validation split, no image with a disc, or a model the maps cannot be drawn for: said on stderr, the export
    goes on)."""
    import sys

    import timm

    from tltrain.explain.card_maps import card_figure, test_examples
    from tltrain.export.load import Preprocessing
    from tltrain.models import input_size_args

    split = next((s for s in (config["data"].get("test_split", "test"), config["data"].get("val_split", "val"))
                  if s and s in manifest["splits"]), None)
    if split is None:
        return None
    size = metadata["preprocessing"]["size"]
    try:
        model = timm.create_model(metadata["architecture"], pretrained=False, num_classes=metadata["num_outputs"],
                                  **input_size_args(metadata["architecture"], size))
        model.load_state_dict(state)
        examples = test_examples(shard_dir, manifest, split, metadata["num_classes"])
        picture = card_figure(model, Preprocessing(size, metadata["preprocessing"]), metadata,
                              [str(n) for n in metadata["class_names"]], examples)
    except (DataError, ConfigError, RuntimeError, ValueError) as exc:
        print(f"export: no LayerCAM picture in the card ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None
    return (picture, [key for _, _, key in examples]) if picture else None


def _checked_model(run_dir: Path, entry: dict, arch: str, loss: str, state: dict, manifest: dict,
                   shard_dir: Path) -> tuple[list[str], list[str], torch.nn.Module]:
    """(classes, class names, the model the weights load into): the manifest's names, its num_classes and the
    checkpoint's head must tell one story, and the weights must fit the architecture."""
    import timm

    from tltrain.models import describe_mismatch

    num_classes = int(manifest.get("num_classes") or 0)
    classes = [str(c) for c in (manifest.get("classes") or [])]
    class_names = [str(c) for c in (manifest.get("class_names") or classes)]
    outputs = 1 if loss == "ordinal" else num_classes
    head_key, head_shape = _head_outputs(arch, state)
    if not num_classes or len(classes) != num_classes or len(class_names) != num_classes or head_shape[0] != outputs:
        raise DataError(f"{run_dir}: cannot export: {shard_dir / MANIFEST_NAME} says num_classes={num_classes} "
                        f"with {len(classes)} classes {classes} and {len(class_names)} names, loss={loss} needs "
                        f"{outputs} outputs, but the checkpoint's head {head_key} has shape {list(head_shape)}")
    model = timm.create_model(arch, pretrained=False, num_classes=outputs)
    problem = describe_mismatch(state, model.state_dict())
    if problem:
        raise DataError(f"{run_dir}: checkpoint {entry['name']} does not fit {arch}: {problem}")
    return classes, class_names, model


def _metrics_of(entry: dict, metrics: dict, run: RunFolder, config: dict, referable: int | None,
                num_classes: int, resamples: int) -> dict:
    """The exported checkpoint's validation metrics, and its test metrics (with bootstrap intervals from the
    per-image predictions) only when the run tested this very checkpoint."""
    from tltrain.metrics import bootstrap_ci, read_predictions_csv

    validation = _validation_of(entry, metrics)
    test = metrics.get("test") or {}
    test_of_this = test.get("checkpoint") == entry["name"]
    test_set, ci = {}, {}
    if test_of_this and run.predictions_test.is_file():
        _, labels, probs = read_predictions_csv(run.predictions_test)
        counts = np.bincount(labels, minlength=num_classes)
        test_set = {"split": config["data"].get("test_split", "test"), "count": int(len(labels)),
                    "class_counts": [int(c) for c in counts]}
        ci = bootstrap_ci(probs, labels, referable, resamples=resamples, seed=0)
    return {"validation": {k: v for k, v in validation.items() if k != "confusion"},
            "test": {k: v for k, v in test.items() if k != "confusion"} if test_of_this else {},
            "test_set": test_set, "test_ci": ci}


def package_preprocessing(config: dict) -> dict:
    """The preprocessing record of a package (tltrain.json "preprocessing") from a run's config."""
    return {"recipe": "ben_graham" if config["loader"]["preprocess"]["enabled"] else "crop_resize",
            "filter_version": FILTER_VERSION,  # tltrain.preprocess: 2 = normalised masked blur
            "size": config["loader"]["size"], **config["loader"]["preprocess"]}


def _training_data(config: dict, manifest: dict, shard_dirs: list[Path]) -> dict:
    fraction = config["data"].get("fraction", 1.0)
    one = len(shard_dirs) == 1
    digests = [sha256_file(folder / MANIFEST_NAME) for folder in shard_dirs]
    return {"name": config["data"].get("name"), "shards": str(shard_dirs[0]) if one else list(map(str, shard_dirs)),
            "manifest_sha256": digests[0] if one else digests, "source": manifest.get("source"),
            "weights": config["data"].get("weights"),
            "fraction": fraction,
            "class_counts": manifest.get("fractions", {}).get(f"{fraction:g}", {}).get("class_counts"),
            "splits": {k: {"count": v["count"], "class_counts": v["class_counts"]}
                       for k, v in manifest.get("splits", {}).items()}}


# -- the package's files, written into publish's temporary folder ------------------------------------------------
def _write_package(folder: Path, state: dict, metadata: dict, model, name: str, maps: bytes | None = None) -> str:
    """The package's files, in an order that lets each describe the ones before it; returns the digest."""
    from safetensors.torch import save_file

    weights_path = folder / WEIGHTS
    # one metadata key only: safetensors keeps metadata in a hash map, whose order differs between processes
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights_path), metadata={"format": "pt"})
    metadata["weights"] = {"file": WEIGHTS, "sha256": sha256_file(weights_path), "bytes": weights_path.stat().st_size}
    write_new_file(folder / METADATA, (json.dumps(metadata, indent=1, default=str) + "\n").encode())
    write_new_file(folder / TIMM_CONFIG, (json.dumps(timm_config(model, metadata), indent=1) + "\n").encode())
    if maps:
        write_new_file(folder / MAPS_FILE, maps)  # the card's picture: nothing loads it, so not in SHA256SUMS
    write_new_file(folder / CARD, model_card(metadata, Path(name)).encode())  # the folder's name: no local path
    return write_checksums(folder, [WEIGHTS, METADATA, TIMM_CONFIG])


def write_checksums(folder: str | Path, names: list[str] | None = None) -> str:
    """Write SHA256SUMS for `names` (default: the files it lists now) in `folder`; returns the package digest.

    export calls it; it is also how a publisher who edits a package on purpose re-seals it (which is why the
    digest, compared with a value published elsewhere, is what tells a user the package is the announced one)."""
    folder = Path(folder)
    if names is None:
        names = [name for _, name in read_checksums(folder)]
    lines = "".join(f"{sha256_file(safe_io.inside(folder, name, 'file'), 'package file')}  {name}\n"
                    for name in sorted(names))
    safe_io.atomic_write_text(folder / CHECKSUMS, lines)
    return package_digest(lines.encode())


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
    size_args = input_size_args(meta["architecture"], meta["input_size"][-1])
    if size_args:  # a ViT trained at another size: timm builds it the same way (model_args) to accept it
        config["model_args"] = size_args
    return config

