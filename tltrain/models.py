"""Models come from timm by name; pretrained weights only from local files (never a hub download).

A weights file may be a timm/torch state dict (.pth/.pt/.bin/.safetensors), a tltrain checkpoint
(`{"model": state_dict, ...}`) or a tltrain export folder/file. When the saved classifier does not match the
task's classes, timm's `reset_classifier` gives a fresh head and the mismatched head weights are left out,
so ImageNet or intermediate-domain weights transfer to any class count.

Weight files are data, never code: .safetensors, or torch files read with weights_only=True (a plain
torchvision/timm `torch.save(model.state_dict())` file loads as before). A file holding other pickled objects is
refused unless `trust_pickle` (config: model.trust_pickle) says its author is trusted; see tltrain.safe_load.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from torch import nn

from tltrain.errors import ConfigError, DataError
# the package reader imports no model: a package is opened (and verified) through it; input_size_args is the one
# rule for a size's timm arguments, which a package's config.json records (importable from here, as before)
from tltrain.export.package_format import METADATA, METADATA_LIMIT, fixed_input_size, input_size_args, open_package
from tltrain.safe_io import load_json_or_empty
from tltrain.safe_load import torch_load


@dataclass
class LoadReport:
    """What loading a weights file did, so a user can see whether the transfer took."""

    matched: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)  # in the model, absent from the file: randomly initialised
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, saved_shape, model_shape)
    unused: list[str] = field(default_factory=list)  # in the file, absent from the model

    def summary(self) -> str:
        return (f"{len(self.matched)} tensors loaded, {len(self.new)} new, "
                f"{len(self.mismatched)} shape-mismatched, {len(self.unused)} unused")


def create_model(arch: str, num_classes: int, weights: str | None = None, trust_pickle: bool = False,
                 input_size: int | None = None, **timm_kwargs) -> nn.Module:
    """timm.create_model(arch, pretrained=False, num_classes=...) then, optionally, weights from a local file.

    input_size: the loader's image size. Models built for one fixed size (timm's `fixed_input_size`: ViTs) are
    created with `dynamic_img_size=True` when it differs, so the shipped vit preset trains at 512 px too: the
    position embedding keeps its shape (pretrained weights load unchanged) and is interpolated per forward."""
    if arch not in timm.list_models():
        close = timm.list_models(f"*{arch}*")[:10]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise ConfigError(f"model.arch={arch!r} is not a timm model{hint}")
    size_args = input_size_args(arch, input_size)
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **size_args, **timm_kwargs)
    except TypeError:
        if not size_args:
            raise
        raise ConfigError(f"model.arch={arch} takes only {fixed_input_size(arch)} px images: set loader.size="
                          f"{fixed_input_size(arch)}") from None
    if weights:
        report = load_weights(model, weights, trust_pickle=trust_pickle)
        model.tltrain_load_report = report  # kept for logging by the caller
    return model


def read_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A plain state dict from any of the supported weight files (see module docstring).

    trust_pickle=True reads torch files with plain pickle (legacy files whose author the user trusts).
    """
    path = Path(path)
    if path.is_dir() and (path / METADATA).exists():  # a tltrain package: verified as load_pretrained does
        return read_state_dict(open_package(path)[1], trust_pickle)
    if path.is_dir():  # a folder of weights or a run dir
        for candidate in ("model.safetensors", "pytorch_model.bin", "model.pth"):
            if (path / candidate).is_file():
                return read_state_dict(path / candidate, trust_pickle)
        from tltrain.engine.checkpoint import consolidate_checkpoint  # a run dir: latest checkpoint
        return consolidate_checkpoint(path, trust_pickle=trust_pickle)
    if not path.is_file():
        raise DataError(f"{path}: weights file not found")
    if _is_package_weights(path):  # a package's weights file named directly: the package is verified too
        path = open_package(path.parent)[1]
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        from tltrain.safe_load import check_safetensors_header

        check_safetensors_header(path)  # header length, entry count and declared bytes, before safetensors reads it
        try:
            return load_file(str(path))
        except Exception as exc:  # corrupt or foreign file: name it
            raise DataError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    obj = torch_load(path, trust_pickle=trust_pickle)
    if isinstance(obj, torch.jit.ScriptModule):  # a trusted TorchScript archive (only read with trust_pickle)
        obj = dict(obj.state_dict())
    for key in ("model", "state_dict", "module"):  # tltrain checkpoint / common wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"{path}: not a state dict of tensors (found {type(obj).__name__})")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


def _is_package_weights(path: Path) -> bool:
    """True for the weights file a package's tltrain.json names (read bounded; a broken one is open_package's to
    report, so it counts as a package)."""
    meta_path = path.parent / METADATA
    if not meta_path.exists():
        return False
    weights = load_json_or_empty(meta_path, METADATA_LIMIT).get("weights")
    return not isinstance(weights, dict) or weights.get("file") in (path.name, None)


def load_weights(model: nn.Module, path: str | Path, trust_pickle: bool = False) -> LoadReport:
    """Load matching tensors from `path` into `model`; reset the head when the saved one has another shape."""
    saved = read_state_dict(path, trust_pickle)
    own = model.state_dict()
    report = LoadReport()
    usable = {}
    for key, tensor in saved.items():
        if key not in own:
            report.unused.append(key)
        elif tuple(tensor.shape) != tuple(own[key].shape):
            report.mismatched.append((key, tuple(tensor.shape), tuple(own[key].shape)))
        else:
            usable[key] = tensor
            report.matched.append(key)
    report.new = [k for k in own if k not in usable]
    if saved and not report.matched and not report.mismatched:  # the run would silently start from random init
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
        raise DataError(f"{path}: none of its {len(saved)} tensors is a tensor of {arch} (file keys "
                        f"{', '.join(report.unused[:3])}, ...; model keys {', '.join(list(own)[:3])}, ...): weights "
                        "of another architecture, or keys under a prefix to strip")
    head_keys = _classifier_keys(model)
    if report.mismatched and not all(k in head_keys for k, _, _ in report.mismatched):
        bad = [m for m in report.mismatched if m[0] not in head_keys]
        raise DataError(f"{path}: weights do not fit this architecture ({_shape_list(bad)})")
    if any(k in head_keys for k, _, _ in report.mismatched) and hasattr(model, "reset_classifier"):
        model.reset_classifier(model.num_classes)  # a fresh head for the task's classes
    model.load_state_dict(usable, strict=False)
    return report


def _shape_list(mismatched: list[tuple[str, tuple, tuple]], first: int = 5) -> str:
    shown = "; ".join(f"{k}: file {list(a)} vs model {list(b)}" for k, a, b in mismatched[:first])
    more = f"; and {len(mismatched) - first} more" if len(mismatched) > first else ""
    return f"{len(mismatched)} shape mismatches: {shown}{more}"


def describe_mismatch(saved: dict[str, torch.Tensor], own: dict[str, torch.Tensor], first: int = 5) -> str:
    """One line naming the first keys whose shapes differ (with both shapes), and missing/unexpected keys;
    "" when the state dict fits the model exactly."""
    parts = []
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in saved.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        parts.append(_shape_list(mismatched, first))
    for label, keys in (("missing from the file", [k for k in own if k not in saved]),
                        ("not in the model", [k for k in saved if k not in own])):
        if keys:
            more = f" and {len(keys) - first} more" if len(keys) > first else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:first])}{more}")
    return "; ".join(parts)


def _classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier, from timm's pretrained_cfg (e.g. 'fc', 'head.fc')."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier", "fc")
    names = [names] if isinstance(names, str) else list(names)
    return {k for k in model.state_dict() if any(k == n or k.startswith(n + ".") for n in names)}
