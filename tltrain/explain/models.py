"""The model `tltrain explain` looks into: an exported package (as `predict` loads it) or a run folder (its best
checkpoint, else its latest, with the run's own preprocessing and its shards' class names)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tltrain.errors import DataError
from tltrain.export.load import Preprocessing, class_probabilities
from tltrain.run_folder import RunFolder


@dataclass
class ExplainedModel:
    model: torch.nn.Module  # eval mode, on its device
    preprocessing: Preprocessing
    class_names: list[str]
    meta: dict  # what class_probabilities needs: loss, num_classes, thresholds
    origin: str  # "package" or "run <checkpoint>"

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        return class_probabilities(outputs, self.meta)


def load_model(path: str | Path, device: str = "cpu") -> ExplainedModel:
    path = Path(path)
    from tltrain.export.package_format import METADATA

    if (path / METADATA).is_file():
        from tltrain.export.load import load_pretrained
        from tltrain.export.package_format import read_metadata

        model, pre = load_pretrained(path, device)
        meta = read_metadata(path)
        names = [str(n) for n in (meta.get("class_names") or meta["classes"])]
        return ExplainedModel(model, pre, names, meta, "package")
    if RunFolder(path).config.is_file():
        return _from_run(path, device)
    raise DataError(f"{path}: neither a package (no {METADATA}) nor a run folder (no {RunFolder.CONFIG})")


def _from_run(run_dir: Path, device: str) -> ExplainedModel:
    import timm

    from tltrain.data.shard_set import load_shard_set
    from tltrain.engine.checkpoint import CheckpointManager, consolidate_checkpoint
    from tltrain.export.package import package_preprocessing, read_run_config
    from tltrain.models import describe_mismatch, input_size_args

    config = read_run_config(run_dir)
    manager = CheckpointManager(run_dir, is_main=False)
    which = "best" if manager.best() is not None else "latest"
    state = consolidate_checkpoint(run_dir, which)
    manifest = load_shard_set(config["data"]["shards"])
    loss = config.get("trainer", {}).get("loss", "cross_entropy")
    num_classes = int(manifest["num_classes"])
    arch, size = config["model"]["arch"], int(config["loader"]["size"])
    preprocessing = package_preprocessing(config)
    model = timm.create_model(arch, pretrained=False, num_classes=1 if loss == "ordinal" else num_classes,
                              **input_size_args(arch, size))
    problem = describe_mismatch(state, model.state_dict())
    if problem:
        raise DataError(f"{run_dir}: its {which} checkpoint does not fit {arch}: {problem}")
    model.load_state_dict(state)
    names = [str(n) for n in (manifest.get("class_names") or manifest["classes"])]
    meta = {"loss": loss, "num_classes": num_classes, "thresholds": None}
    return ExplainedModel(model.to(device).eval(), Preprocessing(size, preprocessing), names, meta, f"run {which}")
