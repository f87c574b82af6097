"""`tltrain explain PKG_OR_RUN IMAGES... --out DIR`: LayerCAM maps of every stage for each image.

Each image is read as `predict` reads it (tltrain.export.prediction.predict_input: the shared decoding rule, the
disc located as prepare locates it, the package's preprocessing), so the maps explain exactly what predict scores.
Written into --out, per image (named by a key that is unique however the images are named, tltrain.data.keys):
  <key>.png        the photo with the disc crop marked, the model input, one overlay per layer, the fused map
  <key>.npz        (no pickle) per layer `raw/<layer>` (feature-map size, before any scaling) and `scaled/<layer>`
                   (input size), `fused`, `photo_fused` (the fused map on the photo's pixels, uint8 = map x 255),
                   `box` (x0, y0, side of the crop in the photo), `scores`, `target`
  <key>_photo.jpg  the fused map laid on the photograph itself
and contact_sheet.png (every image's fused overlay) and explain.csv (image, key, target, predicted class and the
class probabilities). Images that cannot be read or show no disc are listed in explain.csv's skipped rows and
the rest go on, as in predict.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from tltrain import safe_io
from tltrain.errors import DataError
from tltrain.explain.geometry import map_on_photo
from tltrain.explain.layercam import default_layers, explain_batch, resolve_layers
from tltrain.explain.models import ExplainedModel, load_model
from tltrain.explain.render import contact_sheet, display_input, image_row, overlay, photo_overlay

MAX_SHEET = 60  # tiles in the contact sheet
TARGETS = ("predicted", "true")


def image_files(inputs: list[str | Path]) -> list[Path]:
    """Files as given, and the images inside folders (recursively, sorted); DataError for a path that is neither."""
    from tltrain.export.prediction import IMAGE_SUFFIXES

    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"{item}: no such image or folder")
    if not files:
        raise DataError(f"{', '.join(map(str, inputs))}: no images found")
    return files


def read_image(pre, path: Path) -> tuple[torch.Tensor, np.ndarray, tuple[int, int, int]]:
    """(model input, decoded photo (H, W, 3), the square the preprocessing crops from it) from one decode: the
    input is exactly predict's (tltrain.export.prediction.predict_input: the shared rule, then the package's
    preprocessing)."""
    from tltrain.data.decode import decode_image

    return pre.with_crop(decode_image(path, str(path)), source=str(path))


def explain(model_path: str | Path, inputs: list[str | Path], out: str | Path, layers: list[str] | None = None,
            target: str = "predicted", device: str = "cpu", batch_size: int = 8, progress: bool = True,
            labels: dict[str, int] | None = None) -> dict:
    """Write the maps of every image (module docstring); returns {"out", "explained", "skipped", "layers"}.
    labels: file path -> true class, for target="true"."""
    from tqdm import tqdm

    from tltrain.data.keys import make_keys

    explained = load_model(model_path, device)
    if target not in TARGETS and not (target.isdigit() and int(target) < len(explained.class_names)):
        raise DataError(f"--target {target!r}: choose predicted, true or a class index 0-"
                        f"{len(explained.class_names) - 1}")
    layers = resolve_layers(explained.model, layers or default_layers(explained.model))
    files = image_files(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys = make_keys([p.stem for p in files], [str(p) for p in files])
    rows, skipped, tiles, pending = [], [], [], []

    def flush():
        if not pending:
            return
        batch = torch.stack([read[0] for _, _, read in pending]).to(device)
        truth = [(labels or {}).get(str(path)) for path, _, _ in pending]
        with torch.enable_grad():
            maps = explain_batch(explained.model, batch, layers, target, truth, explained.probabilities)
        for (path, key, read), image_maps in zip(pending, maps):
            rows.append(_write_image(out, path, key, read, image_maps, explained))
            if len(tiles) < MAX_SHEET:
                tiles.append((overlay(display_input(read[0], explained.preprocessing), image_maps.fused),
                              f"{key[:18]}: {rows[-1]['predicted_name'][:12]}"))
        pending.clear()

    for path, key in tqdm(list(zip(files, keys)), desc="explain", disable=None if progress else True):
        try:
            pending.append((path, key, read_image(explained.preprocessing, path)))
        except DataError as exc:
            skipped.append({"file": str(path), "reason": str(exc).split(": ", 1)[-1]})
        except Exception as exc:  # an unreadable image: listed, the rest go on (as in predict)
            skipped.append({"file": str(path), "reason": f"cannot decode image ({type(exc).__name__}: {exc})"})
        if len(pending) == batch_size:
            flush()
    flush()
    if tiles:
        safe_io.atomic_write_bytes(out / "contact_sheet.png", contact_sheet(tiles))
    _write_csv(out / "explain.csv", rows, skipped, explained.class_names)
    return {"out": str(out), "explained": len(rows), "skipped": skipped, "layers": layers, "rows": rows}


def _write_image(out: Path, path: Path, key: str, read, maps, explained: ExplainedModel) -> dict:
    tensor, photo, box = read
    shown = display_input(tensor, explained.preprocessing)
    predicted = int(np.argmax(maps.scores))
    names = explained.class_names
    title = (f"{path.name}: predicted {names[predicted]} ({maps.scores[predicted]:.2f}); maps of "
             f"{names[maps.target] if len(maps.scores) > 1 else 'the score'}")
    on_photo = map_on_photo(maps.fused, box, photo.shape[1], photo.shape[0])
    safe_io.atomic_write_bytes(out / f"{key}.png", image_row(photo, box, shown, maps.layers, maps.scaled,
                                                             maps.fused, safe_io.printable(title, 200)))
    safe_io.atomic_write_bytes(out / f"{key}_photo.jpg", photo_overlay(photo, on_photo))
    arrays = {f"raw/{name}": raw for name, raw in zip(maps.layers, maps.raw)}
    arrays.update({f"scaled/{name}": scaled for name, scaled in zip(maps.layers, maps.scaled)})
    arrays.update(fused=maps.fused, photo_fused=np.round(on_photo * 255).astype(np.uint8),
                  box=np.asarray(box, np.int64), scores=maps.scores.astype(np.float32),
                  target=np.asarray(maps.target, np.int64))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    safe_io.atomic_write_bytes(out / f"{key}.npz", buffer.getvalue())
    return {"image": str(path), "key": key, "target": maps.target, "predicted": predicted,
            "predicted_name": names[predicted], "scores": maps.scores.tolist()}


def _write_csv(path: Path, rows: list[dict], skipped: list[dict], names: list[str]) -> None:
    with safe_io.atomic_open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "key", "target", "predicted", "predicted_name",
                         *[safe_io.csv_cell(f"p_{n}") for n in names], "skipped"])
        for row in rows:
            scores = row["scores"] + [""] * (len(names) - len(row["scores"]))
            writer.writerow([safe_io.csv_cell(row["image"]), row["key"], row["target"], row["predicted"],
                             safe_io.csv_cell(row["predicted_name"]), *[f"{v:.6f}" if v != "" else "" for v in scores],
                             ""])
        for item in skipped:
            writer.writerow([safe_io.csv_cell(item["file"]), "", "", "", "", *[""] * len(names),
                             safe_io.csv_cell(item["reason"])])
