"""Pretrained packages: a run's weights as safetensors + metadata that says exactly what they are + a model card.

A package is a folder:
  model.safetensors   consolidated fp32 weights (single, DDP or DeepSpeed ZeRO runs alike)
  tltrain.json        architecture, classes, input size, the exact preprocessing, training data (manifest hash,
                      counts, fraction), schedule and resolved config, metrics, versions, licence, weights sha256
  README.md           model card: intended use, data, metrics, how to load it (tltrain or plain timm)
`load_pretrained` checks the sha256 before trusting the weights; plain timm loads the same file through
`pretrained_cfg_overlay=dict(file=..., num_classes=N)` (without num_classes timm compares against ImageNet's 1000
classes and silently drops the classifier).
"""
from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

import tltrain
from tltrain.data.shards import sha256_file
from tltrain.errors import ConfigError, DataError

WEIGHTS = "model.safetensors"
METADATA = "tltrain.json"
FORMAT = "tltrain-pretrained/1"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def export_run(run_dir: str | Path, out_dir: str | Path, which: str = "best", license: str = "CC-BY-4.0",
               description: str = "") -> dict:
    """Write a pretrained package for a finished run; returns its metadata."""
    import timm
    from safetensors.torch import save_file

    from tltrain.engine.checkpoint import consolidate_checkpoint

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "config.yaml").is_file():
        raise DataError(f"{run_dir}: no config.yaml (is this a tltrain run folder?)")
    config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    state = consolidate_checkpoint(run_dir, which)
    arch = config["model"]["arch"]
    manifest_path = Path(config["data"]["shards"]) / "manifest.json"
    manifest = _read_json(manifest_path)
    num_classes = int(manifest.get("num_classes") or next(v.shape[0] for k, v in state.items() if k.endswith("bias")))
    metrics = _read_json(run_dir / "metrics.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = out_dir / WEIGHTS
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights_path), metadata={"format": "pt", "arch": arch})
    loss = config.get("trainer", {}).get("loss", "cross_entropy")
    fraction = config["data"].get("fraction", 1.0)
    metadata = {
        "format": FORMAT,
        "architecture": arch,
        "num_classes": num_classes,
        "num_outputs": 1 if loss == "ordinal" else num_classes,
        "loss": loss,
        "thresholds": metrics.get("final", {}).get("thresholds"),
        "classes": manifest.get("classes") or [str(i) for i in range(num_classes)],
        "class_names": manifest.get("class_names") or manifest.get("classes"),
        "input_size": [3, config["loader"]["size"], config["loader"]["size"]],
        "preprocessing": {"recipe": "ben_graham" if config["loader"]["preprocess"]["enabled"] else "crop_resize",
                          "size": config["loader"]["size"], **config["loader"]["preprocess"]},
        "training_data": {
            "name": config["data"].get("name"), "manifest_sha256": sha256_file(manifest_path) if manifest else None,
            "source": manifest.get("source"), "fraction": fraction,
            "class_counts": manifest.get("fractions", {}).get(f"{fraction:g}", {}).get("class_counts"),
            "splits": {k: {"count": v["count"], "class_counts": v["class_counts"]}
                       for k, v in manifest.get("splits", {}).items()},
        },
        "schedule": config.get("schedule"),
        "initial_weights": config["model"].get("weights"),
        "checkpoint": which,
        "metrics": {"validation": {k: v for k, v in metrics.get("final", {}).items() if k != "confusion"},
                    "test": {k: v for k, v in metrics.get("test", {}).items() if k != "confusion"}},
        "config": config,
        "versions": {"tltrain": tltrain.__version__, "torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
        "license": license,
        "description": description,
        "weights": {"file": WEIGHTS, "sha256": sha256_file(weights_path), "bytes": weights_path.stat().st_size},
    }
    (out_dir / METADATA).write_text(json.dumps(metadata, indent=1, default=str))
    (out_dir / "README.md").write_text(model_card(metadata, out_dir))
    return metadata


def model_card(meta: dict, out_dir: Path) -> str:
    test = meta["metrics"]["test"] or meta["metrics"]["validation"]
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in test.items() if isinstance(v, (int, float)) and k != "count")
    data = meta["training_data"]
    pre = meta["preprocessing"]
    return f"""# {meta['architecture']} pretrained on {data['name']} (tltrain)

{meta['description'] or 'An intermediate-domain checkpoint for transfer learning on fundus photographs.'}

## Intended use
Initialisation for fine-tuning on retinal (fundus) tasks or as the intermediate step of two-step transfer
(ImageNet -> fundus -> target). Not a medical device; not validated for clinical decisions.

## Data
- training data: {data['name']} ({data['fraction'] * 100:g} % of the training split), manifest sha256
  `{data['manifest_sha256']}`
- classes ({meta['num_classes']}): {', '.join(map(str, meta['class_names'] or meta['classes']))}
- class counts in training: {data['class_counts']}

## Preprocessing (applied by `tltrain.load_pretrained` and `tltrain predict`)
Ben Graham: disc crop resized to {pre['size']} px (radius {pre['size'] // 2}), out = {pre['gain']:g}*img -
{pre['gain']:g}*gauss(sigma = radius * {pre['sigma_ratio']:.4f}) + {pre['offset']:g}, outside {pre['mask_ratio']:g} *
radius set to {pre['offset']:g}; normalise with mean {pre['mean']} and std {pre['std']}. Recipe enabled:
{pre['enabled']}.

## Metrics ({'test' if meta['metrics']['test'] else 'validation'} split, checkpoint: {meta['checkpoint']})
| metric | value |
|---|---|
{rows}

## How to load
```python
import tltrain
model, preprocess = tltrain.load_pretrained("{out_dir}")   # checks the sha256
x = preprocess(pil_image)[None]                             # (1, 3, {pre['size']}, {pre['size']})
probabilities = model(x).softmax(-1)
```
Plain timm:
```python
import timm
model = timm.create_model("{meta['architecture']}", pretrained=True, num_classes={meta['num_outputs']},
                          pretrained_cfg_overlay=dict(file="{out_dir}/{WEIGHTS}", num_classes={meta['num_outputs']}))
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
        from tltrain.data.disc import disc_found, locate_disc

        if hasattr(image, "convert"):
            image.load()
            array = np.array(to_rgb(image, source))
        else:
            array = np.array(image)
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
                raise DataError(f"{source}: arrays must be decoded (H, W, 3) uint8 RGB, got {array.dtype} "
                                f"{array.shape} (pass the PIL image instead)")
        cfg = self.preprocess_config()
        disc = locate_disc(array)
        if cfg.crop_to_disc and not disc_found(disc, array.shape[1], array.shape[0]):
            raise DataError(f"{source}: no fundus disc found (image too dark or not a fundus photograph)")
        return P.reference([torch.from_numpy(array)], [disc], self.size, cfg)[0]

    def preprocess_config(self):
        from tltrain.preprocess import PreprocessConfig

        fields = PreprocessConfig.__dataclass_fields__
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
    from safetensors.torch import load_file

    from tltrain.models import load_weights

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
    model = timm.create_model(arch, pretrained=False, num_classes=outputs)
    if outputs == meta["num_outputs"]:
        state = load_file(str(weights))
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise DataError(f"{weights}: weights do not fit {arch} ({str(exc).splitlines()[0]})") from None
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
    """Metrics of a package on a prepared split, with the package's own preprocessing."""
    from tltrain.metrics import compute_metrics

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
    threshold = 2 if meta["num_classes"] == 5 else None
    metrics = compute_metrics(np.concatenate(probs), np.concatenate(labels), threshold)
    metrics.update({"package": str(package), "shards": str(shards), "split": split})
    if out:
        Path(out).write_text(json.dumps(metrics, indent=1, default=str))
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
