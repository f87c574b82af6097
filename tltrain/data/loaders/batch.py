"""The one batch structure every loader yields and the engine consumes."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Batch(NamedTuple):
    images: torch.Tensor  # (B, 3, H, W) model input, on the loader's device, dtype/layout per config
    labels: torch.Tensor  # (B,) int64 class indices
    keys: list[str]  # sample keys (e.g. 10_left): labels travel with their sample, never by position
    valid: torch.Tensor  # (B,) bool; False marks padding that keeps ranks' batch counts equal
