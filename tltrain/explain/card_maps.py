"""The model card's picture: LayerCAM maps of a few test images of each class, drawn when a run is exported, so a
published checkpoint shows what it looks at (clinicians ask for that first)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

PER_CLASS = 2
MAPS_FILE = "layercam.png"  # in the package, beside README.md (not in SHA256SUMS: nothing loads it)


def test_examples(shard_dir: Path, manifest: dict, split: str, num_classes: int,
                  per_class: int = PER_CLASS) -> list[tuple[np.ndarray, int, str]]:
    """(decoded RGB photo, label, key) of the first `per_class` samples of each class in the split, in shard
    order (the shards' own order: the same images at every export)."""
    from tltrain.data.decode import decode_image
    from tltrain.data.loaders.plan import select_shards
    from tltrain.data.shards import image_ext, iter_tar_samples

    _, shards = select_shards(shard_dir, split, manifest=manifest)
    chosen: dict[int, list] = {label: [] for label in range(num_classes)}
    for shard in shards:
        for sample in iter_tar_samples(Path(shard_dir) / shard["tar"]):
            label = int.from_bytes(sample["lbl"], "little", signed=True)
            if 0 <= label < num_classes and len(chosen[label]) < per_class:
                photo = np.array(decode_image(sample[image_ext(sample)], sample["__key__"]))
                chosen[label].append((photo, label, sample["__key__"]))
            if all(len(v) >= per_class for v in chosen.values()):
                break
        if all(len(v) >= per_class for v in chosen.values()):
            break
    return [item for label in sorted(chosen) for item in chosen[label]]


def card_figure(model: torch.nn.Module, preprocessing, meta: dict, class_names: list[str],
                examples: list[tuple[np.ndarray, int, str]]) -> bytes | None:
    """PNG: per example the model input and its fused LayerCAM map of the true class, with the prediction; None
    when there is no example or no image passes the preprocessing."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from tltrain.errors import DataError
    from tltrain.explain.render import display_input
    from tltrain.explain.layercam import default_layers, explain_batch
    from tltrain.explain.render import overlay
    from tltrain.export.load import class_probabilities

    inputs, kept = [], []
    for photo, label, key in examples:
        try:
            inputs.append(preprocessing(photo, source=key))
            kept.append((label, key))
        except DataError:  # no disc found: that image is left out of the picture
            continue
    if not inputs:
        return None
    model = model.eval()
    with torch.enable_grad():
        maps = explain_batch(model, torch.stack(inputs), default_layers(model), "true", [label for label, _ in kept],
                             lambda outputs: class_probabilities(outputs, meta))
    columns = min(len(kept), 2 * PER_CLASS)
    rows = -(-len(kept) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, tensor, (label, _), image_maps in zip(axes.flat, inputs, kept, maps):
        predicted = int(np.argmax(image_maps.scores))
        axis.imshow(overlay(display_input(tensor, preprocessing), image_maps.fused))
        axis.set_title(f"true {class_names[label][:14]}\npredicted {class_names[predicted][:14]}", fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()
