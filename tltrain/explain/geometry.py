"""Where the model's input pixels lie in the original photograph: the inverse of the preprocessing's disc crop
and resize (tltrain.preprocess.disc_box, crop_square, resize_square), so a map can be laid on the photo itself.

Coordinates are continuous (pixel i covers [i, i+1), as in tltrain.data.disc): the input is the square
(x0, y0, side) of the photo resized to S x S, so input point u maps to photo x = x0 + u * side / S.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def input_to_photo(u: float, v: float, box: tuple[int, int, int], size: int) -> tuple[float, float]:
    """An input point (continuous, in [0, S)) -> the photo point it shows."""
    x0, y0, side = box
    return x0 + u * side / size, y0 + v * side / size


def photo_to_input(x: float, y: float, box: tuple[int, int, int], size: int) -> tuple[float, float]:
    """A photo point -> the input point showing it (may lie outside [0, S) when the photo point is off the crop)."""
    x0, y0, side = box
    return (x - x0) * size / side, (y - y0) * size / side


def map_on_photo(input_map: np.ndarray, box: tuple[int, int, int], width: int, height: int) -> np.ndarray:
    """(S, S) map over the input -> (height, width) map over the photo: the square resized back to side x side
    (bilinear) and placed at (x0, y0); zero where the crop did not reach (or reached beyond the photo)."""
    x0, y0, side = box
    square = F.interpolate(torch.from_numpy(np.ascontiguousarray(input_map, np.float32))[None, None],
                           size=(side, side), mode="bilinear", align_corners=False)[0, 0].numpy()
    out = np.zeros((height, width), np.float32)
    sx0, sy0 = max(0, x0), max(0, y0)
    sx1, sy1 = min(width, x0 + side), min(height, y0 + side)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0:sy1, sx0:sx1] = square[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0]
    return out
