"""Layer groups of any timm model, from bottom (stem) to top (head), without per-architecture code.

timm's `group_matcher(coarse=True)` already orders a model's parameters into blocks (stem, stages, final norm,
classifier); the classifier is then split out as its own group so that "train only the head" means exactly the
classifier named in the model's pretrained_cfg, whatever else timm put in the last block.
"""
from __future__ import annotations

from dataclasses import dataclass

from timm.models import group_parameters
from torch import nn


@dataclass
class LayerGroup:
    name: str
    params: list[str]  # parameter names (as in model.named_parameters())


def classifier_prefixes(model: nn.Module) -> list[str]:
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or "fc"
    return [names] if isinstance(names, str) else list(names)


def layer_groups(model: nn.Module) -> list[LayerGroup]:
    """Groups bottom-up; the last one is 'head' (the classifier). Every parameter lands in exactly one group."""
    head_prefixes = classifier_prefixes(model)

    def is_head(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in head_prefixes)

    if hasattr(model, "group_matcher"):
        grouped = group_parameters(model, model.group_matcher(coarse=True))
        ordered = [grouped[k] for k in sorted(grouped)]
    else:  # not a timm model: one backbone group
        ordered = [[n for n, _ in model.named_parameters()]]
    groups = []
    for index, names in enumerate(ordered):
        body = [n for n in names if not is_head(n)]
        if body:
            groups.append(LayerGroup(f"group{index}", body))
    head = [n for n, _ in model.named_parameters() if is_head(n)]
    if not head:
        raise ValueError(f"{type(model).__name__}: no classifier parameters under {head_prefixes}")
    groups.append(LayerGroup("head", head))
    return groups
