"""Disc centre and radius for a whole batch at once, on whatever device the batch is on (GPU after nvJPEG).

Same rule as tltrain.data.disc.estimate_disc (Ben Graham's middle-row threshold, extended to the centre), written
with tensor ops instead of a per-image loop so that a decoded GPU batch never goes back to the host: the bright
span of a profile is found with argmax on the thresholded mask from each end.
"""
from __future__ import annotations

import torch

from tltrain.errors import choices_error

LAYOUTS = ("NHWC", "NCHW")


def _spans(profiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, L) profiles -> first and last index brighter than a tenth of the profile's mean, and whether any is."""
    bright = profiles > profiles.mean(dim=1, keepdim=True) / 10.0
    length = profiles.shape[1]
    first = bright.int().argmax(dim=1)
    last = length - 1 - bright.flip(1).int().argmax(dim=1)
    return first, last, bright.any(dim=1)


def estimate_discs(images: torch.Tensor, layout: str = "NHWC") -> torch.Tensor:
    """(N, H, W, C) or (N, C, H, W) batch -> (N, 3) float32 [cx, cy, r] in pixels; r == 0 where no disc is found."""
    if layout not in LAYOUTS:
        raise choices_error("layout", layout, LAYOUTS)
    if images.dim() != 4:
        raise ValueError(f"images must be a 4-D batch in layout {layout}, got shape {tuple(images.shape)}")
    gray = images.to(torch.float64).sum(dim=3 if layout == "NHWC" else 1)  # (N, H, W), exact integer sums
    n, h, w = gray.shape
    first, last, found = _spans(gray[:, h // 2, :])
    r = (last - first + 1).double() / 2.0
    cx = (first + last + 1).double() / 2.0

    column = cx.floor().long().clamp(max=w - 1)
    col_profiles = gray.gather(2, column.view(n, 1, 1).expand(n, h, 1)).squeeze(2)  # (N, H)
    top, bottom, col_found = _spans(col_profiles)
    touches_both = (top == 0) & (bottom == h - 1)
    cy = torch.where(col_found & ~touches_both, (top + bottom + 1).double() / 2.0, torch.full_like(cx, h / 2.0))

    no_disc = ~found
    cx = torch.where(no_disc, torch.full_like(cx, w / 2.0), cx)
    cy = torch.where(no_disc, torch.full_like(cy, h / 2.0), cy)
    r = torch.where(no_disc, torch.zeros_like(r), r)
    return torch.stack([cx, cy, r], dim=1).float()
