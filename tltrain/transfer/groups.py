"""Layer groups of any timm model, from bottom (stem) to top (head), without per-architecture code.

timm's `group_matcher(coarse=True)` already orders a model's parameters into blocks (stem, stages, final norm);
`group_parameters` turns it into ordered lists of names. Parameters no pattern matches (the classifier, and in
some models conv_head/norm) land in timm's last group, so the classifier is split out by identity with
`get_classifier()`: "train only the head" then means exactly the layer a new num_classes replaced.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from timm.models import group_parameters
from torch import nn

from tltrain.errors import ConfigError


@dataclass
class LayerGroup:
    name: str  # "stem", "head", or the modules it holds, e.g. "layer3" or "features.denseblock2+features.transition2"
    params: list[str]  # parameter names as in model.named_parameters()


def layer_groups(model: nn.Module) -> list[LayerGroup]:
    """Groups bottom-up: group 0 is the stem, the last is 'head' (the classifier); every parameter in exactly one."""
    model_name = type(model).__name__
    if not (hasattr(model, "group_matcher") and hasattr(model, "get_classifier")):
        raise ConfigError(f"{model_name} is not a timm model (no group_matcher/get_classifier): "
                          "create it with tltrain.models.create_model or timm.create_model")
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    if not head_ids:
        raise ConfigError(f"{model_name} has no classifier parameters (num_classes=0?): transfer schedules need a head")
    id_of = {name: id(p) for name, p in model.named_parameters()}
    grouped = group_parameters(model, model.group_matcher(coarse=True))
    body = [[n for n in grouped[k] if id_of[n] not in head_ids] for k in sorted(grouped)]
    body = [names for names in body if names]
    groups = [LayerGroup("stem" if i == 0 else _describe(names), names) for i, names in enumerate(body)]
    groups.append(LayerGroup("head", [n for n, p in model.named_parameters() if id(p) in head_ids]))
    return groups


def _describe(names: list[str]) -> str:
    """The distinct blocks a group holds, e.g. 'layer3' or 'blocks.5', for logs that say what trains."""
    blocks = list(dict.fromkeys(_block_of(n) for n in names))
    return "+".join(blocks[:3]) + ("+..." if len(blocks) > 3 else "")


def _block_of(param_name: str) -> str:
    """Module path up to its first numbered part: 'layer3.1.conv1.weight' -> 'layer3', 'head.norm.weight' ->
    'head.norm' (no number: the whole module path)."""
    parts = param_name.split(".")[:-1] or param_name.split(".")
    for i, part in enumerate(parts):
        if re.search(r"\d", part):
            return ".".join(parts[:i + 1])
    return ".".join(parts)
