"""Image bytes -> RGB pixels: the one decoding rule of every path (prepare, both loaders, evaluate, predict,
load_pretrained), so the same file gives the same pixels wherever it is read.

The rule (docs/architecture.md, "Decoding"):
1. EXIF orientation is applied once, with Pillow's ImageOps.exif_transpose: pixels as a viewer shows them.
   DALI's decoders apply the tag the same way (tests/test_paths.py checks all 8 orientations), so JPEGs can
   keep their original bytes in the shard.
2. 16-bit samples (I;16 PNG/TIFF greyscale, 16-bit RGB PNG/TIFF) keep their high byte: v >> 8. That is what
   Pillow and libpng already do for 16-bit RGB, so greyscale follows suit (Pillow's own convert("RGB") of
   I;16 clips at 255 instead, turning most of a photograph white). 32-bit integer greyscale ("I") is read as
   16-bit data in a wider container (clipped to 0..65535, then >> 8).
3. Greyscale and bilevel images are replicated to three channels; palettes are expanded; CMYK, YCbCr, LAB and
   HSV go through Pillow's convert("RGB").
4. Alpha (RGBA, LA, PA, a palette or PNG with a transparent colour) is composited on black:
   rgb * alpha / 255, rounded. Transparent parts of a photograph hold no photo, and black is what the disc
   finder and the filter's mask take for "outside the photo"; dropping alpha instead would show whatever
   colour the writer left under it (often white), which moves the disc.
5. Anything else (32-bit float pixels, multi-band scientific modes) is a DataError naming the mode.
6. Bounded work: an image over MAX_PIXELS (50 megapixels) is a DataError naming the file and its size, checked
   from the header before a pixel is decoded. Why 50 MP: the largest fundus cameras give ~24 MP (EyePACS tops
   out near 18 MP), and the costliest file, an RGBA one, peaks near 23 bytes per pixel (Pillow's pixels, their
   RGBA copy, the 16-bit products of the alpha composite, the RGB result): measured 1.1 GB for 49 MP (2.3 GB with
   the former 32-bit composite), so two prepare workers stay near 2.2 GB on a 24 GiB, 2-core machine, with room
   for the loaders' workers. A 0.56 MB PNG of 12000 x 12000 (144 MP, under Pillow's own limit of 179 MP) took
   6.6 GB to decode before this check; it is now refused in 31 MB.
7. One picture per file: a file holding several frames or pages (an animated GIF/WebP/PNG, a multi-page TIFF) is
   a DataError naming the file and the frame count: which page is the photograph is not for tltrain to guess,
   and using the first without a word trained on whatever it was. (An MPO camera JPEG, whose extra pictures
   follow the main one and which every decoder reads as that main one, is one picture.)

What `prepare` stores: the original bytes where every decoder meets the rule by itself
(8-bit RGB or greyscale JPEG, any orientation; 8-bit RGB or greyscale PNG without orientation or
transparency), otherwise the decoded RGB pixels re-encoded as lossless PNG. So DALI, which cannot apply
rules 2-4, only ever meets images that need none of them, and no path loses a grey level.
"""
from __future__ import annotations

import io
import logging
import warnings
from functools import lru_cache

import numpy as np
from PIL import Image, ImageOps

from tltrain.errors import DataError

log = logging.getLogger(__name__)

DECODE_RULE = "tltrain-decode/1"  # part of prepare's plan hash: shards written under an older rule are rewritten
ORIENTATION_TAG = 0x0112
JPEG_FORMATS = ("JPEG", "MPO")  # MPO: a camera JPEG with extra pictures after the main one (every decoder reads it)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
_CONVERTIBLE = ("RGB", "L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX")
PNG_COMPRESS_LEVEL = 1  # lossless either way; level 1 writes 5 MP in a fraction of the default level's time
MAX_PIXELS = 50_000_000  # rule 6: width x height of any image tltrain decodes (a header check)


def open_image(source, name: str | None = None) -> Image.Image:
    """A lazily opened Pillow image from a path, raw bytes or a file object, refused (DataError naming `name`,
    else the path) from its header when it is over MAX_PIXELS or holds several frames (rules 6 and 7)."""
    raw = isinstance(source, (bytes, bytearray, memoryview))
    name = name or ("image" if raw else str(source))
    with warnings.catch_warnings():  # our own limit (rule 6) is lower than Pillow's and says which file
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(bytes(source)) if raw else source)
        except Image.DecompressionBombError as exc:
            raise DataError(f"{name}: over the {MAX_PIXELS / 1e6:.0f} MP limit for one image ({exc}); "
                            "not decoded") from None
    try:
        check_header(img, name)
    except BaseException:
        img.close()
        raise
    return img


def check_header(img: Image.Image, name: str) -> None:
    """Rules 6 and 7 on an opened, not yet decoded image."""
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise DataError(f"{name}: {width} x {height} pixels ({width * height / 1e6:.0f} MP) is over the "
                        f"{MAX_PIXELS / 1e6:.0f} MP limit for one image (tltrain.data.decode); not decoded")
    frames = getattr(img, "n_frames", 1)
    if frames > 1 and img.format not in JPEG_FORMATS:
        raise DataError(f"{name}: {img.format} file with {frames} frames/pages; tltrain reads one picture per "
                        "file (save the photograph on its own as PNG or JPEG)")


def orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1..8), 1 when absent or out of range."""
    try:
        value = int(img.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # a damaged EXIF block: Pillow's exif_transpose ignores it too
        return 1
    return value if 1 <= value <= 8 else 1


def _composite_on_black(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3) uint8: rgb * alpha / 255, rounded half up."""
    rgb = rgba[..., :3].astype(np.uint16)  # 255 * 255 + 127 fits 16 bits: half the memory of 32-bit products
    product = rgb * rgba[..., 3:].astype(np.uint16)
    product += 127
    product //= 255
    return product.astype(np.uint8)


def to_rgb(img: Image.Image, source: str = "image") -> Image.Image:
    """The rule applied to an opened image: oriented, 8-bit, 3-channel RGB (the input itself when it already is)."""
    if orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in _ALPHA or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"))
        return Image.fromarray(_composite_on_black(rgba), "RGB")
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT:
        values = np.asarray(img).astype(np.int64)
        grey = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    if mode in _CONVERTIBLE:
        return img.convert("RGB")
    raise DataError(f"{source}: pixel mode {mode!r} has no defined 8-bit RGB form (convert the file to 8- or "
                    "16-bit RGB or greyscale)")


def decode_image(source, name: str = "image", draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode fully and apply the rule -> RGB Pillow image. draft_size (the torch loader's opt-in
    draft_decode) lets libjpeg decode at 1/2, 1/4 or 1/8 scale no smaller than that size: faster, but no
    longer the definition's pixels."""
    img = open_image(source, name)  # not `with`: closing would also drop the pixels of an image returned as is
    try:
        if draft_size is not None and img.format in JPEG_FORMATS:
            img.draft("RGB", draft_size)
        img.load()  # a full decode: truncated or corrupt data fails here (Pillow then closes its own file)
        return to_rgb(img, name)
    except BaseException:
        img.close()
        raise


def decode_rgb(source, name: str = "image", draft_size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, 3) uint8, writable (torch warns on read-only buffers), by the rule."""
    return np.array(decode_image(source, name, draft_size))


def passes_through(img: Image.Image) -> bool:
    """True when the file's own bytes give the rule's pixels in every decoder (call before img.load())."""
    args = img.tile[0].args if img.tile else None
    rawmode = args[0] if isinstance(args, tuple) else args  # 'RGB;16B' for a 16-bit PNG
    if img.format in JPEG_FORMATS:
        return img.mode in ("RGB", "L")
    if img.format == "PNG":
        return (img.mode in ("RGB", "L") and rawmode in ("RGB", "L") and "transparency" not in img.info
                and orientation(img) == 1)
    return False


def encode_png(rgb: Image.Image) -> bytes:
    """Lossless PNG of the rule's pixels: what `prepare` stores when a file's own bytes would not pass through."""
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


@lru_cache(maxsize=1)
def warn_draft_decode() -> None:
    """Said once per process: draft decoding is a speed option outside the shared definition."""
    log.warning("loader.draft_decode=true: JPEGs are decoded at a reduced DCT scale, so this run's images differ "
                "from DALI's, `tltrain predict`'s and load_pretrained's (about 1-2 grey levels on average, up to "
                "~100 at edges); keep it off to train on the definition's pixels")
