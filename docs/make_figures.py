"""Draw docs/img/preprocessing_*.png: what the disc finder and the Ben Graham filter do to a photograph.

For a clean, a top/bottom-cut (EyePACS), a left-cut and a framed synthetic photograph: on the left the photo with
the circle `tltrain prepare` finds (green; centre cross), on the right the model's input from the torch reference
(tltrain.preprocess.reference, the definition every loader is tested against), de-normalised to grey levels.
The photographs go through the real paths: written as JPEG, inspected by prepare, decoded by PIL, so when the
disc finder or the filter definition changes, re-running this script shows the new behaviour:

  python docs/make_figures.py            # writes docs/img/preprocessing_{clean,cut_top_bottom,cut_left,framed}.png
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from tltrain import preprocess as P
from tltrain.data.prepare import inspect_image
from tltrain.data.synth import _rng, defect_disc, draw_defects, render_fundus_disc

PANEL = 256
CASES = {  # name: (placement from synth.defect_disc or None, overlays from synth.draw_defects, seed)
    "clean": (None, (), 1),
    "cut_top_bottom": ("cut_top_bottom", (), 2),
    "cut_left": ("cut_left", (), 3),
    "framed": (None, ("frame", "legend", "axis_lines"), 4),
}


def _photo(name: str, width: int, height: int, folder: Path) -> Path:
    placement, overlays, seed = CASES[name]
    rng = _rng(13, seed)
    disc = defect_disc(placement, width, height, rng) if placement else None
    image, truth = render_fundus_disc(rng, 2, width, height, right_eye=True, disc=disc)
    path = folder / f"{name}.jpeg"
    Image.fromarray(draw_defects(image, truth, overlays, rng)).save(path, quality=92)
    return path


def _photo_panel(photo: Image.Image, disc) -> Image.Image:
    """The photo scaled into a PANEL-high strip, with the found circle drawn."""
    scale = PANEL / photo.height
    panel = photo.resize((round(photo.width * scale), PANEL), Image.BICUBIC)
    draw = ImageDraw.Draw(panel)
    cx, cy, r = (v * scale for v in disc)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(0, 255, 0), width=2)
    draw.line([(cx - 6, cy), (cx + 6, cy)], fill=(0, 255, 0), width=2)
    draw.line([(cx, cy - 6), (cx, cy + 6)], fill=(0, 255, 0), width=2)
    return panel


def _model_input_panel(photo: Image.Image, disc, cfg: P.PreprocessConfig) -> Image.Image:
    """The torch reference's model input at PANEL px, mean/std undone: the grey levels the network sees."""
    tensor = P.reference([torch.from_numpy(np.array(photo))], [disc], PANEL, cfg)[0]
    mean = torch.tensor(cfg.mean).view(3, 1, 1) * 255
    std = torch.tensor(cfg.std).view(3, 1, 1) * 255
    grey = (tensor * std + mean).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(grey.permute(1, 2, 0).numpy())


def draw(name: str, out_dir: Path, width: int, height: int) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        path = _photo(name, width, height, Path(tmp))
        info = inspect_image(str(path))  # prepare's check and disc (on its thumbnail)
        if "problem" in info:
            raise SystemExit(f"{name}: prepare rejects it: {info['problem']}")
        with Image.open(path) as img:
            photo = img.convert("RGB")
    left = _photo_panel(photo, info["disc"])
    right = _model_input_panel(photo, info["disc"], P.PreprocessConfig())
    sheet = Image.new("RGB", (left.width + 8 + PANEL, PANEL + 18), (255, 255, 255))
    sheet.paste(left, (0, 18))
    sheet.paste(right, (left.width + 8, 18))
    label = ImageDraw.Draw(sheet)
    cx, cy, r = info["disc"]
    label.text((2, 3), f"{name}: {width}x{height}, disc ({cx:.0f}, {cy:.0f}) r {r:.0f}", fill=(0, 0, 0))
    label.text((left.width + 10, 3), "model input (torch reference)", fill=(0, 0, 0))
    out = out_dir / f"preprocessing_{name}.png"
    sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)  # small files
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "img"))
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in CASES:
        print(draw(name, out, args.width, args.height))


if __name__ == "__main__":
    main()
