"""Pretrained packages: a run's weights as safetensors + metadata that says exactly what they are + a model card.

A package is a folder:
  model.safetensors   consolidated fp32 weights (single, DDP or DeepSpeed ZeRO runs alike)
  tltrain.json        architecture, classes, input size, the exact preprocessing, training data (manifest hash,
                      counts, fraction), schedule and resolved config, which checkpoint and how it was chosen, its
                      validation and test metrics with bootstrap intervals, versions, licence, weights sha256
  config.json         timm's config: `timm.create_model("local-dir:PKG", pretrained=True)` loads the package
  README.md           model card: intended use, data, test set, checkpoint choice, metrics with 95 % intervals,
                      what referable means, how to load it (tltrain or plain timm)
`load_pretrained` checks the sha256 before trusting the weights.
"""
from __future__ import annotations

import json
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

import tltrain
from tltrain.data.shards import sha256_file
from tltrain.errors import ConfigError, DataError
from tltrain.preprocess import FILTER_VERSION

WEIGHTS = "model.safetensors"
METADATA = "tltrain.json"
FORMAT = "tltrain-pretrained/1"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


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
               description: str = "", shards: str | Path | None = None, resamples: int = 1000) -> dict:
    """Write a pretrained package for a finished run; returns its metadata.

    Everything the metadata says is of the exported checkpoint: its validation metrics, the test metrics the run
    computed on it (with bootstrap intervals from its per-image predictions), and how it was chosen. Export refuses
    (DataError) when the class names, num_classes and the head's output size disagree."""
    import timm
    from safetensors.torch import save_file

    from tltrain.engine.checkpoint import consolidate_checkpoint
    from tltrain.metrics import bootstrap_ci, read_predictions_csv
    from tltrain.models import describe_mismatch

    run_dir, out_dir = Path(run_dir).resolve(), Path(out_dir)
    if not (run_dir / "config.yaml").is_file():
        raise DataError(f"{run_dir}: no config.yaml (is this a tltrain run folder?)")
    config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    entry = _checkpoint_entry(run_dir, which)
    state = consolidate_checkpoint(run_dir, which)
    arch = config["model"]["arch"]
    shard_dir = _shards_of(config, run_dir, shards)
    manifest_path = shard_dir / "manifest.json"
    manifest = _read_json(manifest_path)
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

    metrics = _read_json(run_dir / "metrics.json")
    validation = _validation_of(entry, metrics)
    test = metrics.get("test") or {}
    test_of_this = test.get("checkpoint") == entry["name"]
    test_set, ci = {}, {}
    predictions = run_dir / "predictions_test.csv"
    referable = config.get("trainer", {}).get("referable_threshold", 2) if num_classes == 5 else None
    if test_of_this and predictions.is_file():
        _, labels, probs = read_predictions_csv(predictions)
        counts = np.bincount(labels, minlength=num_classes)
        test_set = {"split": config["data"].get("test_split", "test"), "count": int(len(labels)),
                    "class_counts": [int(c) for c in counts]}
        ci = bootstrap_ci(probs, labels, referable, resamples=resamples, seed=0)

    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = out_dir / WEIGHTS
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights_path), metadata={"format": "pt", "arch": arch})
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
        "weights": {"file": WEIGHTS, "sha256": sha256_file(weights_path), "bytes": weights_path.stat().st_size},
    }
    (out_dir / METADATA).write_text(json.dumps(metadata, indent=1, default=str))
    (out_dir / TIMM_CONFIG).write_text(json.dumps(timm_config(model, metadata), indent=1))
    (out_dir / "README.md").write_text(model_card(metadata, out_dir.resolve()))
    return metadata


TIMM_CONFIG = "config.json"


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


def _ci_text(ci: dict, name: str, fallback) -> str:
    entry = ci.get(name)
    if entry:
        return f"{entry['value']:.3f} ({entry['low']:.3f} to {entry['high']:.3f})"
    return "-" if fallback is None or (isinstance(fallback, float) and fallback != fallback) else f"{fallback:.3f}"


def model_card(meta: dict, out_dir: Path) -> str:
    data, pre, checkpoint = meta["training_data"], meta["preprocessing"], meta["checkpoint"]
    metrics = meta["metrics"]
    test, val, ci, test_set = metrics["test"], metrics["validation"], metrics.get("test_ci") or {}, metrics.get("test_set")
    referable = meta.get("referable_threshold")
    names = [str(n) for n in (meta["class_names"] or meta["classes"])]
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
    path = Path(path)
    meta_path = path / METADATA if path.is_dir() else path
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: not found (is this a tltrain pretrained package?)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise DataError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT}")
    return meta


def load_pretrained(path: str | Path, device: str = "cpu", num_classes: int | None = None):
    """(model in eval mode, Preprocessing). num_classes differing from the package's gives a fresh head."""
    import timm

    from tltrain.models import describe_mismatch, input_size_args, load_weights, read_state_dict

    path = Path(path)
    meta = read_metadata(path)
    weights = path / meta["weights"]["file"]
    if not weights.is_file():
        raise DataError(f"{weights}: weights file missing")
    if sha256_file(weights) != meta["weights"]["sha256"]:
        raise DataError(f"{weights}: sha256 does not match {METADATA} (corrupt or replaced file)")
    arch = meta["architecture"]
    if arch not in timm.list_models():
        raise ConfigError(f"{path / METADATA}: architecture {arch!r} is not a timm model")
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
             device: str = "cpu", out: str | Path | None = None, backend: str = "torch") -> dict:
    """Metrics of a package on a prepared split, with the package's own preprocessing.

    With `out` (a JSON file) the per-image predictions go beside it: <out stem>_predictions.csv with key, label,
    predicted class and the class probabilities."""
    from tltrain.metrics import compute_metrics, write_predictions_csv

    model, pre = load_pretrained(package, device)
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
    probs, labels = np.concatenate(probs), np.concatenate(labels)
    metrics = compute_metrics(probs, labels, threshold)
    metrics.update({"package": str(package), "shards": str(shards), "split": split})
    if out:
        out = Path(out)
        predictions = out.with_name(out.stem + "_predictions.csv")
        write_predictions_csv(predictions, keys, labels, probs)
        metrics["predictions"] = str(predictions)
        out.write_text(json.dumps(metrics, indent=1, default=str))
    return metrics


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


def predict(package: str | Path, image_dir: str | Path, out_csv: str | Path, batch_size: int = 16,
            device: str = "cpu", progress: bool = True) -> dict:
    """CSV of class probabilities and predicted class per image; unreadable or disc-less images are listed."""
    import csv

    from tqdm import tqdm

    model, pre = load_pretrained(package, device)
    meta = read_metadata(package)
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
            rows.append([str(path.relative_to(image_dir)), *[f"{v:.6f}" for v in p], int(p.argmax()),
                         names[int(p.argmax())]])

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
    with open(out_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", *[f"p_{c}" for c in meta["classes"]], "predicted", "predicted_name"])
        writer.writerows(rows)
    return {"csv": str(out_csv), "predicted": len(rows), "skipped": skipped}


__all__ = ["export_run", "load_pretrained", "evaluate", "predict", "read_metadata", "Preprocessing"]
