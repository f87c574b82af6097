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

The package is split by job, each module with its own floor (the project's layers):
  package_format  reading a package: file names, value bounds, SHA256SUMS, open_package (below tltrain.models,
                  which reads `model.weights=<package>` through it; it imports no model)
  load            load_pretrained, Preprocessing, the outputs as class probabilities (uses tltrain.models)
  package         export_run: a run's checkpoint written as a package; card (the model card); publish (the
                  folder written beside the target and renamed into place)
  evaluation      `tltrain evaluate`;  prediction: `tltrain predict`
The names below are importable from tltrain.export as before; each is imported from its module on first use, so
that importing package_format (tltrain.models does) does not import the writing, evaluating and predicting parts.
"""
from __future__ import annotations

import importlib

#: Where each public name lives (module of this package).
_HOMES = {
    "package_format": ("WEIGHTS", "METADATA", "TIMM_CONFIG", "CHECKSUMS", "CARD", "FORMAT", "METADATA_LIMIT",
                       "TIMM_CONFIG_LIMIT", "CHECKSUMS_LIMIT", "MAX_OUTPUTS", "MIN_SIZE", "MAX_SIZE", "MAX_NAME",
                       "input_size_args", "validate_metadata", "validate_timm_config", "read_metadata",
                       "read_checksums", "verify_checksums", "package_digest", "open_package"),
    "load": ("Preprocessing", "load_pretrained", "class_probabilities"),
    "package": ("export_run", "read_run_config", "write_checksums", "timm_config"),
    "card": ("model_card",),
    "evaluation": ("evaluate", "evaluation_loader", "default_evaluation_path"),
    "prediction": ("predict", "predict_input", "IMAGE_SUFFIXES"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = ["export_run", "load_pretrained", "open_package", "evaluate", "predict", "read_metadata", "Preprocessing",
           "write_checksums"]


def __getattr__(name: str):
    """A public name of the package, imported from its module on first use (then kept here)."""
    home = _HOME_OF.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME_OF})
