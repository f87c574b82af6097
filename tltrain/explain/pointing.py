"""Does a map point at the lesion? Two scores where the truth is known by construction (the synthetic
macular-oedema target, tltrain.data.synth_dme: class 1 has its exudates within a circle around the macula):
- pointing game: the map's maximum falls inside the lesion circle (share of positive images where it does);
- energy share: the share of the map's sum inside the circle.
Both are compared with a uniform map, whose expected scores are the circle's share of the input square (a
uniform map's maximum is anywhere; its energy spreads evenly). Maps and circles live on the model input's pixels:
the circle is moved there through the crop (tltrain.explain.geometry).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tltrain.explain.geometry import photo_to_input


def circle_mask(size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """(size, size) bool: input pixels whose centre lies in the circle (continuous coordinates)."""
    centres = np.arange(size) + 0.5
    return (centres[None, :] - cx) ** 2 + (centres[:, None] - cy) ** 2 <= r * r


def lesion_mask(region: dict, box: tuple[int, int, int], size: int) -> np.ndarray:
    """The lesion circle of a synth_dme image (its truth record) on the model input's pixels."""
    u, v = photo_to_input(region["macula"][0], region["macula"][1], box, size)
    return circle_mask(size, u, v, region["lesion_radius"] * size / box[2])


def scores(heat: np.ndarray, mask: np.ndarray) -> tuple[bool, float]:
    """(the maximum lies in the mask, the share of the map's sum inside it); a map that is zero everywhere points
    nowhere and has no energy inside."""
    total = float(heat.sum())
    if total <= 0:
        return False, 0.0
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return bool(mask[peak]), float(heat[mask].sum() / total)


def read_lesions(root: str | Path) -> dict[str, dict]:
    """The truth file written beside a synth_dme target (synth_dme.LESIONS_FILE), by image path relative to it."""
    from tltrain import safe_io
    from tltrain.data.synth_dme import LESIONS_FILE

    return safe_io.load_json_object(Path(root) / LESIONS_FILE, 64 * safe_io.MiB, LESIONS_FILE)


def measure_model(model_path: str | Path, images: list[tuple[Path, dict]], layers: list[str] | None = None,
                  device: str = "cpu", batch_size: int = 16) -> dict:
    """Per layer and for the fused map: pointing-game score, mean energy share and the uniform map's expected
    score, over `images` [(file, truth record of a class-1 image)], maps of the true class (1)."""
    import torch

    from tltrain.explain.command import read_image
    from tltrain.explain.layercam import default_layers, explain_batch, resolve_layers
    from tltrain.explain.models import load_model

    explained = load_model(model_path, device)
    layers = resolve_layers(explained.model, layers or default_layers(explained.model))
    hits: dict[str, list[bool]] = {name: [] for name in [*layers, "fused"]}
    energy: dict[str, list[float]] = {name: [] for name in hits}
    uniform: list[float] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        reads = [read_image(explained.preprocessing, path) for path, _ in chunk]
        inputs = torch.stack([tensor for tensor, _, _ in reads]).to(device)
        with torch.enable_grad():
            maps = explain_batch(explained.model, inputs, layers, "true", [1] * len(chunk), explained.probabilities)
        for (_, region), (_, _, box), image_maps in zip(chunk, reads, maps):
            mask = lesion_mask(region, box, inputs.shape[-1])
            uniform.append(float(mask.mean()))
            for name, heat in zip([*layers, "fused"], [*image_maps.scaled, image_maps.fused]):
                hit, share = scores(heat, mask)
                hits[name].append(hit)
                energy[name].append(share)
    return {"layers": [*layers, "fused"], "images": len(images), "uniform": float(np.mean(uniform)),
            "pointing": {name: float(np.mean(values)) for name, values in hits.items()},
            "energy": {name: float(np.mean(values)) for name, values in energy.items()}}


def positive_test_images(shard_dir: str | Path, lesions_root: str | Path, limit: int) -> list[tuple[Path, dict]]:
    """The class-1 images of a synth_dme target's test split (read from its shards' sample .json, which names
    each sample's source file) with their truth records, the first `limit` in key order."""
    from tltrain.data.loaders.plan import select_shards
    from tltrain.data.shards import iter_tar_samples

    lesions = read_lesions(lesions_root)
    root = Path(lesions_root).resolve()
    _, shards = select_shards(shard_dir, "test")
    found = []
    for shard in shards:
        for sample in iter_tar_samples(Path(shard_dir) / shard["tar"]):
            meta = json.loads(sample["json"])
            relative = Path(meta["source"]).resolve().relative_to(root).as_posix()
            record = lesions.get(relative)
            if record and record["label"] == 1:
                found.append((meta["key"], Path(meta["source"]), record))
    return [(path, record) for _, path, record in sorted(found, key=lambda item: item[0])[:limit]]
