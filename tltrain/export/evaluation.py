"""`tltrain evaluate`: a package's metrics on a prepared split, read with the package's own preprocessing, and the
per-image predictions beside the metrics file (never inside the package)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from tltrain import safe_io
from tltrain.errors import DataError
from tltrain.export.load import Preprocessing, class_probabilities, load_pretrained
from tltrain.export.package_format import read_metadata
from tltrain.contracts import sample_sources
from tltrain.metrics import (REFERABLE_GRADE, bootstrap_ci, compute_metrics, per_source_metrics,
                             write_predictions_csv)


def evaluation_loader(pre: Preprocessing, shards, split: str = "test", batch_size: int = 32, device: str = "cpu",
                      backend: str = "torch"):
    """The loader `evaluate` reads a split with: the backend's defaults plus the package's preprocessing."""
    from tltrain.data.loaders import LoaderConfig, build_loader

    cfg = LoaderConfig(backend=backend, batch_size=batch_size, size=pre.size, workers=2,
                       preprocess=pre.preprocess_config())
    return build_loader(cfg, shards, split, train=False, device=device)


def evaluate(package: str | Path, shards: str | Path, split: str = "test", batch_size: int = 32,
             device: str = "cpu", out: str | Path | None = None, backend: str = "torch",
             digest: str | None = None, resamples: int = 0) -> dict:
    """Metrics of a package on a prepared split, with the package's own preprocessing.

    With `out` (a JSON file) the per-image predictions go beside it: <out stem>_predictions.csv with key, label,
    predicted class and the class probabilities. With resamples > 0, 95 % stratified-bootstrap intervals
    (metrics.bootstrap_ci, seed 0) of the whole split ("ci") and of each source's part (per_source.<name>.ci)."""
    model, pre = load_pretrained(package, device, digest=digest)
    meta = read_metadata(package)
    loader = evaluation_loader(pre, shards, split, batch_size, device, backend)
    probs, labels, keys = [], [], []
    with torch.no_grad():
        for batch in loader:
            mask = batch.valid.cpu().numpy().astype(bool)
            probs.append(class_probabilities(model(batch.images), meta).numpy()[mask])
            labels.append(batch.labels.cpu().numpy()[mask])
            keys += [k for k, m in zip(batch.keys, mask) if m]
    # which referable metrics exist is compute_metrics' rule (metrics.referable_threshold_for); a package exported
    # before tltrain.json recorded the threshold had the run default
    threshold = meta.get("referable_threshold", REFERABLE_GRADE)
    if not sum(len(part) for part in labels):  # every sample skipped (unreadable): there is nothing to score
        raise DataError(f"{shards}: split {split!r}: no sample could be read and scored; run `tltrain verify "
                        f"{shards}`")
    probs, labels = np.concatenate(probs), np.concatenate(labels)
    metrics = compute_metrics(probs, labels, threshold)
    if resamples:
        metrics["ci"] = bootstrap_ci(probs, labels, threshold, resamples=resamples, seed=0)
    if sample_sources(loader):  # a dataset of several sources: each one's metrics beside the pooled ones
        metrics["per_source"] = per_source_metrics(probs, labels, keys, sample_sources(loader), threshold)
        if resamples:
            names = np.array([sample_sources(loader).get(key, "unknown") for key in keys])
            for name, part in metrics["per_source"].items():
                part["ci"] = bootstrap_ci(probs[names == name], labels[names == name], threshold,
                                          resamples=resamples, seed=0)
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
