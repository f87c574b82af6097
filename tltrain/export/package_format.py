"""The package format, read: its file names, the bounds on every value tltrain.json may hold, SHA256SUMS,
open_package.

A package is someone else's data, so nothing here builds a model or imports one: this is what tltrain.models reads
a `model.weights=<package>` through, and what load_pretrained, evaluate and predict open a package with. It also
holds the one rule for the timm keyword arguments an input size needs (input_size_args), because config.json
records them and open_package checks them; tltrain.models builds models with the same rule.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path

from tltrain import safe_io
from tltrain.errors import ConfigError, DataError
from tltrain.preprocess_config import MAX_GAIN, MAX_MEAN, MAX_RADIUS, MAX_SIGMA_RATIO, MIN_SIGMA_RATIO, MIN_STD
from tltrain.safe_io import sha256_file

WEIGHTS = "model.safetensors"
METADATA = "tltrain.json"
TIMM_CONFIG = "config.json"
CHECKSUMS = "SHA256SUMS"
CARD = "README.md"
FORMAT = "tltrain-pretrained/1"
#: tltrain.json holds the run's config and metrics: a few hundred KB at most; config.json a few KB.
METADATA_LIMIT = 16 * safe_io.MiB
TIMM_CONFIG_LIMIT = 1 * safe_io.MiB
CHECKSUMS_LIMIT = 64 * 1024
MAX_OUTPUTS = 100_000  # classes / outputs (ImageNet-22k has 21 843); the head is features x outputs floats
MIN_SIZE, MAX_SIZE = 8, 4096  # input side in pixels (Ben Graham's recipe works at 512-1024)
MAX_NAME = 256
_WEIGHTS_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,200}\.(safetensors|pth|pt|bin)")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHECKSUM_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")
_TIMM_KEYS = {"architecture", "num_classes", "num_features", "pretrained_cfg", "tltrain_preprocessing",
              "tltrain_metadata", "label_names", "model_args"}


# -- what timm needs to build a model for an input size ------------------------------------------------------------
def input_size_args(arch: str, input_size: int | None) -> dict:
    """timm kwargs for images of input_size: {"dynamic_img_size": True} for a fixed-size model (ViT) fed another
    size, else {}."""
    native = fixed_input_size(arch)
    return {"dynamic_img_size": True} if input_size and native and input_size != native else {}


def fixed_input_size(arch: str) -> int | None:
    """The one image size a timm architecture accepts, or None when it takes any size (CNNs)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    return int(cfg.input_size[-1]) if cfg is not None and getattr(cfg, "fixed_input_size", False) else None


# -- tltrain.json: every value validated before anyone uses it ------------------------------------------------------
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
    """The preprocessing values Preprocessing and the loaders use, bounded (the run config's own bounds, so every
    run exports); returns the input size."""
    if not isinstance(pre, dict):
        raise DataError(f"{where}: preprocessing must be an object")
    where = f"{where}: preprocessing"
    size = _number(pre, "size", where, MIN_SIZE, MAX_SIZE, True)
    _number(pre, "radius", where, 0, MAX_RADIUS, True, required=False)
    _number(pre, "sigma_ratio", where, MIN_SIGMA_RATIO, MAX_SIGMA_RATIO, False, required=False)
    _number(pre, "gain", where, -MAX_GAIN, MAX_GAIN, False, required=False)
    _number(pre, "offset", where, -MAX_GAIN, MAX_GAIN, False, required=False)
    _number(pre, "mask_ratio", where, 0, 1.5, False, required=False)
    _number(pre, "filter_version", where, 1, 1000, True, required=False)
    for key in ("enabled", "applied_offline", "crop_to_disc"):
        if key in pre and not isinstance(pre[key], bool):
            raise DataError(f"{where}: {key} must be true or false, not {safe_io.printable(repr(pre[key]), 100)}")
    for key, low in (("mean", -MAX_MEAN), ("std", MIN_STD)):
        if key in pre:
            values = pre[key]
            if not isinstance(values, list) or len(values) != 3:
                raise DataError(f"{where}: {key} must be a list of 3 numbers")
            for i, value in enumerate(values):
                safe_io.finite_number(value, f"{where}: {key}[{i}]", low, MAX_MEAN)
    return size


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


# -- config.json: what plain timm builds must be what tltrain.json describes ----------------------------------------
def validate_timm_config(path: Path, meta: dict) -> None:
    """config.json is what plain timm builds the model from (`local-dir:PKG`): it must describe exactly the model
    tltrain.json does. model_args (keyword arguments to the model's constructor: an activation, a depth) must be
    the ones export writes for this architecture and size, and no others."""
    config = safe_io.load_json(path, TIMM_CONFIG_LIMIT, "timm config")
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


# -- SHA256SUMS and the package digest -------------------------------------------------------------------------------
def package_digest(checksums: bytes) -> str:
    """The package digest: the sha256 of SHA256SUMS, the value a publisher announces and a user compares."""
    return hashlib.sha256(checksums).hexdigest()


def read_checksums(folder: Path) -> list[tuple[str, str]]:
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
    entries = read_checksums(folder)
    required = {METADATA, meta["weights"]["file"]} | ({TIMM_CONFIG} if os.path.lexists(folder / TIMM_CONFIG) else set())
    missing = sorted(required - {name for _, name in entries})
    if missing:
        raise DataError(f"{path}: does not list {', '.join(missing)}, which change what is loaded; refused")
    for expected, name in entries:
        if sha256_file(safe_io.inside(folder, name, "file"), "package file") != expected:
            raise DataError(f"{folder / name}: sha256 does not match {CHECKSUMS} (edited or replaced after "
                            "export); refused")
    return package_digest(safe_io.read_bytes(path, CHECKSUMS_LIMIT, "checksum file"))


# -- a package opened: every check that needs no model ---------------------------------------------------------------
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
