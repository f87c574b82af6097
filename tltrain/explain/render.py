"""Pictures of LayerCAM maps: the per-image row (photo with the crop marked, model input, one overlay per layer,
the fused map), the map laid on the photo, and a contact sheet of many images. Matplotlib's Agg backend, written to
bytes and saved by the caller (atomic, never through a link)."""
from __future__ import annotations

import io

import numpy as np
import torch

CMAP = "jet"
ALPHA = 0.45


def _figure(columns: int, rows: int = 1, size: float = 2.4):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows + 0.3), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    return plt, figure, axes


def _png(plt, figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 image with a (H, W) map in [0, 1] blended on top (jet colours)."""
    from matplotlib import colormaps

    colours = colormaps[CMAP](np.clip(heat, 0, 1))[..., :3]
    return (np.clip((1 - ALPHA) * image / 255.0 + ALPHA * colours, 0, 1) * 255).astype(np.uint8)


def image_row(photo: np.ndarray, box: tuple[int, int, int], model_input: np.ndarray, layers: list[str],
              scaled: list[np.ndarray], fused: np.ndarray, title: str) -> bytes:
    """PNG: the photo (disc crop marked), the filtered model input, one overlay per layer, the fused map."""
    from matplotlib.patches import Rectangle

    plt, figure, axes = _figure(3 + len(layers))
    axes[0, 0].imshow(photo)
    axes[0, 0].add_patch(Rectangle((box[0], box[1]), box[2], box[2], fill=False, edgecolor="yellow", linewidth=1.5))
    axes[0, 0].set_title("photo (crop)", fontsize=8)
    axes[0, 1].imshow(model_input)
    axes[0, 1].set_title("model input", fontsize=8)
    for column, (name, heat) in enumerate(zip(layers, scaled), start=2):
        axes[0, column].imshow(overlay(model_input, heat))
        axes[0, column].set_title(name, fontsize=8)
    axes[0, -1].imshow(overlay(model_input, fused))
    axes[0, -1].set_title("fused (max)", fontsize=8)
    figure.suptitle(title, fontsize=9)
    return _png(plt, figure)


def photo_overlay(photo: np.ndarray, heat: np.ndarray) -> bytes:
    """JPEG bytes: the fused map laid on the original photograph's own pixels."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(overlay(photo, heat)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def contact_sheet(tiles: list[tuple[np.ndarray, str]], columns: int = 6) -> bytes:
    """PNG grid of (overlay image, caption) tiles."""
    rows = max(1, -(-len(tiles) // columns))
    plt, figure, axes = _figure(min(columns, max(1, len(tiles))), rows, size=2.0)
    for axis, (image, caption) in zip(axes.flat, tiles):
        axis.imshow(image)
        axis.set_title(caption, fontsize=7)
    return _png(plt, figure)


def display_input(tensor: torch.Tensor, pre) -> np.ndarray:
    """A model input (3, S, S), normalised -> (S, S, 3) uint8 as the model sees it (the filtered image)."""
    cfg = pre.preprocess_config()
    mean = torch.tensor(cfg.mean).view(3, 1, 1) * 255
    std = torch.tensor(cfg.std).view(3, 1, 1) * 255
    return (tensor.float().cpu() * std + mean).clamp(0, 255).round().byte().permute(1, 2, 0).numpy()
