"""`tltrain predict`: class probabilities and the predicted class of every image in a folder, as CSV; images that
cannot be read or show no fundus disc are listed, and the rest go on."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from tltrain import safe_io
from tltrain.errors import DataError
from tltrain.export.load import Preprocessing, class_probabilities, load_pretrained
from tltrain.export.package_format import read_metadata

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp")


def predict_input(pre: Preprocessing, path: str | Path) -> torch.Tensor:
    """One file as `predict` feeds it to the model: decoded by the shared rule, then the package's preprocessing."""
    from tltrain.data.decode import decode_image

    return pre(decode_image(path, str(path)), source=str(path))


def predict(package: str | Path, image_dir: str | Path, out_csv: str | Path, batch_size: int = 16,
            device: str = "cpu", progress: bool = True, digest: str | None = None) -> dict:
    """CSV of class probabilities and predicted class per image; unreadable or disc-less images are listed."""
    from tqdm import tqdm

    model, pre = load_pretrained(package, device, digest=digest)
    meta = read_metadata(package)
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)  # before predicting, not after
    files = sorted(p for p in Path(image_dir).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{image_dir}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    names = [str(n) for n in (meta.get("class_names") or meta["classes"])]
    skipped, rows = [], []

    def flush(batch):
        if not batch:
            return
        with torch.no_grad():
            probs = class_probabilities(model(torch.stack([t for _, t in batch]).to(device)), meta).numpy()
        for (path, _), p in zip(batch, probs):
            rows.append([safe_io.csv_cell(str(path.relative_to(image_dir))), *[f"{v:.6f}" for v in p],
                         int(p.argmax()), safe_io.csv_cell(names[int(p.argmax())])])

    pending = []
    for path in tqdm(files, desc="predict", disable=None if progress else True):
        try:
            tensor = predict_input(pre, path)
        except DataError as exc:
            skipped.append({"file": str(path), "reason": str(exc).split(": ", 1)[-1]})
            continue
        except Exception as exc:  # unreadable image: listed, the rest go on
            skipped.append({"file": str(path), "reason": f"cannot decode image ({type(exc).__name__}: {exc})"})
            continue
        pending.append((path, tensor))
        if len(pending) == batch_size:
            flush(pending)
            pending = []
    flush(pending)
    with safe_io.atomic_open(out_csv, "w", newline="") as f:  # creates the folder; never writes through a link
        writer = csv.writer(f)
        writer.writerow(["image", *[safe_io.csv_cell(f"p_{c}") for c in meta["classes"]], "predicted",
                         "predicted_name"])
        writer.writerows(rows)
    return {"csv": str(out_csv), "predicted": len(rows), "skipped": skipped,
            "package_digest": model.tltrain_package_digest}
