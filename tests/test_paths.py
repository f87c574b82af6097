"""One photograph, one input tensor, whichever path brings it to the model (issue 13, points 3 and 4).

Paths: the torch loader and the DALI CPU loader with the shipped presets (configs/loader/*.yaml; only batch size,
workers and the output dtype are changed: bf16 is the model's input precision, not preprocessing), the loader
`tltrain evaluate` builds (torch and dali backends), `tltrain predict`'s input (a file decoded by
tltrain.data.decode) and load_pretrained's preprocess applied to an image as the user opened it with PIL.
Each is compared, in grey levels before normalisation, with the definition applied to the file
(tltrain.preprocess.reference on decode_rgb's pixels, disc by locate_disc): mean <= 0.1 and p99 <= 1.

Data: camera-size 2592x1944 JPEGs at model size 512 (the acceptance case); to stay fast, one 1296x972 photograph
under all 8 EXIF orientations (the disc must be found on the oriented image) and 640x480 files in every format
the decoding rule handles (16-bit PNG and TIFF, grey and RGB; greyscale; palette with and without a transparent
colour; RGBA; CMYK; 8-bit TIFF; an oriented PNG), both at model size 256 under the same bound.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tltrain import preprocess as P
from tltrain.config import compose, to_typed
from tltrain.data.decode import decode_rgb, passes_through, to_rgb
from tltrain.data.disc import locate_disc
from tltrain.data.loaders import LoaderConfig, build_loader
from tltrain.data.loaders.plan import sample_refs, select_shards
from tltrain.data.prepare import PrepareConfig, run_prepare
from tltrain.data.sources import SourceConfig
from tltrain.data.synth import _rng, generate_target_domain, render_fundus
from tltrain.errors import DataError
from tltrain.export import Preprocessing, evaluation_loader, predict_input

SIZE = 512  # model input side of the acceptance test on camera-size photographs
CAMERA = (2592, 1944)
VARIANT, VARIANT_SIZE = (1296, 972), 256  # orientations: half the camera size and model size, to stay fast
SMALL = (640, 480)  # the other formats
# Pillow's transpose that undoes each EXIF orientation's display transform (the raw pixels a camera stores).
TO_RAW = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
          4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
          7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}
GREY = torch.tensor(P.IMAGENET_STD).view(3, 1, 1) * 255  # normalised units -> grey levels


def png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG (grey (H, W) or RGB (H, W, 3)) written by hand: Pillow cannot write 16-bit RGB."""
    h, w = array.shape[:2]
    colour = 2 if array.ndim == 3 else 0
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in array)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 1)) + chunk(b"IEND", b""))


def tiff16_rgb(array: np.ndarray) -> bytes:
    """An uncompressed 16-bit RGB TIFF written by hand (Pillow reads these but cannot write them)."""
    h, w, _ = array.shape
    data = array.astype("<u2").tobytes()
    tags = [(256, 3, w), (257, 3, h), (258, 3, None), (259, 3, 1), (262, 3, 2), (273, 4, None), (277, 3, 3),
            (278, 3, h), (279, 4, len(data)), (284, 3, 1)]
    ifd_end = 8 + 2 + 12 * len(tags) + 4
    out = bytearray(b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", len(tags)))
    for tag, kind, value in tags:
        if tag == 258:  # bits per sample: three shorts, stored after the IFD
            out += struct.pack("<HHII", tag, kind, 3, ifd_end)
        elif tag == 273:  # strip offset: the pixels follow the bits-per-sample shorts
            out += struct.pack("<HHII", tag, kind, 1, ifd_end + 6)
        elif kind == 3:
            out += struct.pack("<HHIHH", tag, kind, 1, value, 0)
        else:
            out += struct.pack("<HHII", tag, kind, 1, value)
    return bytes(out + struct.pack("<I", 0) + struct.pack("<HHH", 16, 16, 16) + data)


def _save(img: Image.Image, path: Path, **kw) -> None:
    buffer = io.BytesIO()
    img.save(buffer, **kw)
    path.write_bytes(buffer.getvalue())


def _write_formats(folder: Path, upright: np.ndarray) -> None:
    """The same small photograph in every format the rule covers (16-bit ones with a random low byte, so that
    v >> 8 is told apart from rounding v / 257)."""
    rgb = np.asarray(Image.fromarray(upright).resize(SMALL, Image.BILINEAR))
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    low = np.random.default_rng(0).integers(0, 256, rgb.shape, dtype=np.uint16)
    rgb16, grey16 = rgb.astype(np.uint16) * 256 + low, grey.astype(np.uint16) * 256 + low[..., 0]
    (folder / "grey16_png.png").write_bytes(png16(grey16))
    (folder / "rgb16_png.png").write_bytes(png16(rgb16))
    (folder / "rgb16_tif.tif").write_bytes(tiff16_rgb(rgb16))
    _save(Image.fromarray(grey16), folder / "grey16_tif.tif", format="TIFF")
    _save(Image.fromarray(grey), folder / "grey_jpg.jpg", format="JPEG", quality=92)
    _save(Image.fromarray(grey), folder / "grey_png.png", format="PNG")
    _save(Image.fromarray(rgb).quantize(256), folder / "palette.png", format="PNG")
    palette_t = Image.fromarray(rgb).quantize(255)
    _save(palette_t, folder / "palette_transparent.png", format="PNG", transparency=int(np.asarray(palette_t)[0, 0]))
    inside = (grey > 8).astype(np.uint8) * 255  # transparent outside the retina, white underneath
    rgba = np.dstack([np.where(inside[..., None] > 0, rgb, 255), inside])
    _save(Image.fromarray(rgba, "RGBA"), folder / "rgba.png", format="PNG")
    _save(Image.fromarray(rgb).convert("CMYK"), folder / "cmyk.jpg", format="JPEG", quality=92)
    _save(Image.fromarray(rgb), folder / "rgb8.tif", format="TIFF")
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(Image.fromarray(rgb).transpose(TO_RAW[6]), folder / "oriented6.png", format="PNG", exif=exif)


def _prepare(root: Path, shards: Path) -> dict:
    run_prepare(PrepareConfig(source=SourceConfig(kind="imagefolder", root=str(root)), out=str(shards),
                              val_fraction=0.0, test_fraction=0.0, workers=2, progress=False))
    files = {f"{p.parent.name}_{p.stem}": p for p in sorted(root.glob("*/*")) if p.is_file()}
    return {"root": root, "shards": shards, "files": files}


@pytest.fixture(scope="module")
def camera_set(tmp_path_factory):
    """Two camera-size 2592x1944 JPEGs (ImageFolder, two classes) and the shards `prepare` writes by default."""
    root = tmp_path_factory.mktemp("camera_raw")
    for label, (seed, grade) in enumerate(((0, 2), (1, 0))):
        (root / f"class{label}").mkdir()
        _save(Image.fromarray(render_fundus(_rng(13, seed, 0), grade, *CAMERA)), root / f"class{label}" / "photo.jpg",
              format="JPEG", quality=90)
    return _prepare(root, tmp_path_factory.mktemp("camera_shards"))


@pytest.fixture(scope="module")
def variant_set(tmp_path_factory):
    """One photograph under all 8 EXIF orientations (JPEG, VARIANT size) and in every format (SMALL size)."""
    root = tmp_path_factory.mktemp("variants_raw")
    upright = render_fundus(_rng(13, 2, 0), 2, *VARIANT)
    (root / "camera").mkdir()
    for o, to_raw in TO_RAW.items():
        raw = Image.fromarray(upright) if to_raw is None else Image.fromarray(upright).transpose(to_raw)
        exif = Image.Exif()
        if o != 1:
            exif[0x0112] = o
        _save(raw, root / "camera" / f"orient{o}.jpg", format="JPEG", quality=90, exif=exif)
    (root / "formats").mkdir()
    _write_formats(root / "formats", upright)
    return {**_prepare(root, tmp_path_factory.mktemp("variants_shards")), "upright": upright}


def _package(size: int) -> Preprocessing:
    """The preprocessing a package exported with the default recipe carries (export.py's metadata shape)."""
    return Preprocessing(size, {"recipe": "ben_graham", "filter_version": P.FILTER_VERSION, "size": size,
                                **dataclasses.asdict(P.PreprocessConfig())})


def _preset(name: str, **changes) -> LoaderConfig:
    cfg = to_typed(compose("config", [f"loader={name}"]).loader, LoaderConfig, where="loader")
    return dataclasses.replace(cfg, **changes)


def _loader_outputs(loader) -> dict[str, torch.Tensor]:
    out = {}
    for batch in loader:
        for i, key in enumerate(batch.keys):
            if batch.valid[i]:
                out[key] = batch.images[i].float().cpu()
    return out


def _path_outputs(files: dict, shards: Path, size: int, device: str = "cpu") -> dict[str, dict[str, torch.Tensor]]:
    pre = _package(size)
    dali_device = "gpu" if device == "cuda" else "cpu"
    common = dict(batch_size=4, size=size)
    outputs = {
        "torch loader (loader=torch preset)": _loader_outputs(build_loader(
            _preset("torch", workers=1, **common), shards, "train", train=False, device=device)),
        f"dali {dali_device} (loader=dali preset)": _loader_outputs(build_loader(
            _preset("dali", workers=2, dtype="fp32", dali_device=dali_device, **common), shards, "train",
            train=False, device=device)),
        "evaluate (torch backend)": _loader_outputs(evaluation_loader(pre, shards, "train", 4, device)),
        "evaluate (dali backend)": _loader_outputs(evaluation_loader(pre, shards, "train", 4, device, "dali")),
        "predict": {key: predict_input(pre, path) for key, path in files.items()},
    }
    user_opened = {}
    for key, path in files.items():
        with Image.open(path) as img:  # what a load_pretrained user does: open the file, call preprocess
            user_opened[key] = pre(img)
    outputs["load_pretrained preprocess"] = user_opened
    return outputs


def _definition(files: dict, size: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, path in files.items():
        pixels = decode_rgb(path)
        out[key] = P.reference([torch.from_numpy(pixels)], [locate_disc(pixels)], size, P.PreprocessConfig())[0]
    return out


@pytest.fixture(scope="module")
def camera_outputs(camera_set):
    return _path_outputs(camera_set["files"], camera_set["shards"], SIZE), _definition(camera_set["files"], SIZE)


@pytest.fixture(scope="module")
def variant_outputs(variant_set):
    files, shards = variant_set["files"], variant_set["shards"]
    return _path_outputs(files, shards, VARIANT_SIZE), _definition(files, VARIANT_SIZE)


def _grey_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b).abs() * GREY).flatten()


def _check(outputs: dict, reference: dict, keys: list[str]) -> list[str]:
    """Per path over the given images: the bound, or a line saying by how much it was missed."""
    failures = []
    for path, got in outputs.items():
        assert set(keys) <= set(got), f"{path}: images missing: {sorted(set(keys) - set(got))}"
        diffs = torch.cat([_grey_diff(got[k], reference[k]) for k in keys])
        mean, p99 = float(diffs.mean()), float(diffs.quantile(0.99))
        if not (mean <= 0.1 and p99 <= 1.0):
            failures.append(f"{path}: mean {mean:.3f}, p99 {p99:.2f}, max {float(diffs.max()):.0f} grey levels")
    return failures


def test_camera_jpegs_same_tensor_on_every_path(camera_set, camera_outputs):
    outputs, reference = camera_outputs
    keys = sorted(camera_set["files"])
    assert not _check(outputs, reference, keys)
    # the pure-torch paths compute the same thing from the same pixels: equal, not merely close
    for key in keys:
        assert torch.equal(outputs["predict"][key], outputs["load_pretrained preprocess"][key])
        assert _grey_diff(outputs["evaluate (torch backend)"][key], outputs["predict"][key]).max() <= 1e-3


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_on_every_path(orientation, variant_set, variant_outputs):
    outputs, reference = variant_outputs
    key = f"camera_orient{orientation}"
    assert not _check(outputs, reference, [key])
    # prepare found the disc on the oriented photograph: the upright render's disc, whatever the tag
    refs = {r.key: r for r in sample_refs(variant_set["shards"], select_shards(variant_set["shards"], "train")[1])}
    with open(refs[key].tar, "rb") as f:
        offset, size, _ = refs[key].members["disc"]
        f.seek(offset)
        stored = np.frombuffer(f.read(size), "<f4")
    upright = np.asarray(locate_disc(variant_set["upright"]))
    assert np.abs(stored - upright).max() <= 0.01 * upright[2], (stored, upright)
    assert refs[key].members.get("jpg"), "an 8-bit RGB JPEG keeps its own bytes (DALI applies the tag itself)"


FORMATS = ["grey16_png.png", "rgb16_png.png", "grey16_tif.tif", "rgb16_tif.tif", "grey_jpg.jpg", "grey_png.png",
           "palette.png", "palette_transparent.png", "rgba.png", "cmyk.jpg", "rgb8.tif", "oriented6.png"]


@pytest.mark.parametrize("name", FORMATS)
def test_image_format_on_every_path(name, variant_outputs):
    outputs, reference = variant_outputs
    assert not _check(outputs, reference, ["formats_" + name.split(".")[0]])


def test_sixteen_bit_is_scaled_not_clipped(variant_set):
    folder = variant_set["root"] / "formats"
    eight = decode_rgb(folder / "grey_png.png")
    for name in ("grey16_png.png", "grey16_tif.tif"):
        pixels = decode_rgb(folder / name)
        with Image.open(folder / name) as img:
            high_byte = (np.asarray(img).astype(np.int64) >> 8).astype(np.uint8)
        assert np.array_equal(pixels, np.repeat(high_byte[..., None], 3, axis=2))
        assert np.array_equal(pixels[..., 0], eight[..., 0])  # the 8-bit file is exactly the high byte
        assert (pixels == 255).mean() < 0.01  # Pillow's own convert("RGB") clips: most pixels become 255
        assert np.allclose(locate_disc(pixels), locate_disc(eight))
    for name in ("rgb16_png.png", "rgb16_tif.tif"):
        assert np.array_equal(decode_rgb(folder / name), decode_rgb(folder / "rgb16_png.png"))


def test_alpha_palette_and_cmyk_conversions(variant_set):
    folder = variant_set["root"] / "formats"
    with Image.open(folder / "rgba.png") as img:
        rgba = np.asarray(img).astype(np.int64)
    expected = (rgba[..., :3] * rgba[..., 3:] + 127) // 255  # composited on black
    assert np.array_equal(decode_rgb(folder / "rgba.png"), expected)
    assert decode_rgb(folder / "rgba.png")[0, 0].tolist() == [0, 0, 0]  # white under transparent -> black
    with Image.open(folder / "palette.png") as img:
        assert np.array_equal(decode_rgb(folder / "palette.png"), np.asarray(img.convert("RGB")))
    transparent = decode_rgb(folder / "palette_transparent.png")
    assert transparent[0, 0].tolist() == [0, 0, 0]
    with Image.open(folder / "cmyk.jpg") as img:
        assert img.mode == "CMYK"
        assert np.array_equal(decode_rgb(folder / "cmyk.jpg"), np.asarray(img.convert("RGB")))
    rgb = np.full((4, 4, 3), 200, np.uint8)
    rgb[0, 0] = (255, 255, 255)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", transparency=(255, 255, 255))  # an RGB PNG's tRNS colour
    with Image.open(io.BytesIO(buffer.getvalue())) as img:
        assert not passes_through(img)
    assert decode_rgb(buffer.getvalue())[0, 0].tolist() == [0, 0, 0]
    assert decode_rgb(buffer.getvalue())[1, 1].tolist() == [200, 200, 200]
    with pytest.raises(DataError, match="pixel mode 'F'"):
        to_rgb(Image.fromarray(np.zeros((4, 4), np.float32)), "float.tif")


def test_prepare_keeps_bytes_only_where_every_decoder_agrees(variant_set):
    """JPEGs (any orientation) and 8-bit RGB/grey PNGs pass through; the rest become lossless .png members."""
    refs = sample_refs(variant_set["shards"], select_shards(variant_set["shards"], "train")[1])
    stored = {r.key: ("jpg" if "jpg" in r.members else "png") for r in refs}
    for key, path in variant_set["files"].items():
        with Image.open(path) as img:
            keep = passes_through(img)
        assert stored[key] == ("jpg" if keep and path.suffix == ".jpg" else "png"), key
        assert keep == (path.name in ("grey_jpg.jpg", "grey_png.png") or path.parent.name == "camera"), path.name


def test_oriented_photo_is_stored_upright_with_its_size(variant_set):
    import json
    import tarfile

    shards = variant_set["shards"]
    metas = {}
    for tar_path in shards.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    metas[meta["key"]] = meta
    for o in range(1, 9):
        assert (metas[f"camera_orient{o}"]["width"], metas[f"camera_orient{o}"]["height"]) == VARIANT
    assert (metas["formats_oriented6"]["width"], metas["formats_oriented6"]["height"]) == SMALL


def test_draft_decode_is_off_by_default_and_warns_when_on(variant_set, caplog):
    assert LoaderConfig().draft_decode is False
    assert _preset("torch").draft_decode is False
    from tltrain.data.decode import warn_draft_decode
    from tltrain.data.loaders.torch_wds import decode_fundus

    warn_draft_decode.cache_clear()
    with caplog.at_level(logging.WARNING):
        build_loader(_preset("torch", draft_decode=True), variant_set["shards"], "train", train=False)
    assert "differ from DALI" in caplog.text
    data = (variant_set["root"] / "camera" / "orient6.jpg").read_bytes()
    disc = locate_disc(decode_rgb(data))
    image, scaled = decode_fundus(data, disc, 256, draft=True)
    assert image.shape[:2] == (VARIANT[1] // 2, VARIANT[0] // 2)  # 1/2 DCT scale, oriented like the full decode
    assert np.allclose(scaled, np.asarray(disc) / 2)


def test_demo_target_data_same_input_in_evaluate_and_predict(tmp_path):
    """The demo's target domain at its own sizes: evaluate's loader and predict feed identical tensors (the
    reported flip came from the torch loader's draft decode and a disc found on different pixels)."""
    raw, shards = tmp_path / "raw", tmp_path / "shards"
    generate_target_domain(raw, n_per_class=4, size=256, seed=1, workers=1, progress=False)
    run_prepare(PrepareConfig(source=SourceConfig(kind="imagefolder", root=str(raw)), out=str(shards),
                              val_fraction=0.0, test_fraction=0.0, workers=1, progress=False))
    pre = _package(128)
    evaluated = _loader_outputs(evaluation_loader(pre, shards, "train", 4))
    files = {f"{p.parent.name}_{p.stem}": p for p in sorted(raw.glob("*/*")) if p.is_file()}
    assert set(evaluated) == set(files)
    for key, path in files.items():
        assert _grey_diff(evaluated[key], predict_input(pre, path)).max() <= 1e-3, key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("which", ["camera", "variants"])
def test_gpu_paths_same_tensor(which, request):
    """DALI on the GPU (nvJPEG through nvImageCodec, EXIF orientation) and the torch loader with the Triton
    filter, every image of both sets, same bound."""
    data = request.getfixturevalue("camera_set" if which == "camera" else "variant_set")
    size = SIZE if which == "camera" else VARIANT_SIZE
    outputs = _path_outputs(data["files"], data["shards"], size, device="cuda")
    failures = _check(outputs, _definition(data["files"], size), sorted(data["files"]))
    assert not failures, failures
