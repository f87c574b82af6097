"""The fused CPU kernels (tltrain/preprocess_cpu.py) against the torch code of the definition and the float64
definition itself, on random inputs and on the geometry users meet (squares cut by the photo's edges, up- and
downscaling, odd sizes, masks, offsets that do not fit uint8)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tltrain import preprocess as P
from tltrain import preprocess_cpu as K

pytestmark = pytest.mark.skipif(not K.AVAILABLE, reason="numba is not installed")


def _photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth structure plus noise: sharp edges and flat parts, like a fundus photo, in one random image."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = 120 + 80 * np.sin(xx / (3 + rng.uniform(0, 20))) * np.cos(yy / (3 + rng.uniform(0, 20)))
    image = base[..., None] + rng.normal(0, 25, (h, w, 3))
    image[rng.uniform(size=(h, w)) < 0.02] = 255  # speckles: the worst case for the rounding
    return np.clip(image, 0, 255).astype(np.uint8)


BOXES = [  # (x0, y0, side) relative to a 97 x 71 photo: inside, cut on each side, around it, outside, tiny
    (10, 5, 60), (-20, 3, 64), (40, -15, 70), (50, 20, 80), (-30, -40, 160), (200, 0, 50), (0, 0, 71), (7, 9, 2)]


@pytest.mark.parametrize("size", [16, 33, 64, 150])
@pytest.mark.parametrize("box", BOXES, ids=[str(b) for b in BOXES])
def test_crop_resize_matches_torch(box, size):
    """Against the float64 resize: off by at most one level, where a value sits on a .5 tie (upscaling makes
    many) and float32 sums round it either way, and no more often than torch's own float32 resize (+0.5 %)."""
    rng = np.random.default_rng(sum(box) * 1000 + size)
    image = _photo(rng, 71, 97)
    square = P.crop_square(torch.from_numpy(image), *box)
    exact = F.interpolate(square.permute(2, 0, 1)[None].double(), size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False).round().clamp(0, 255)[0].numpy()
    torch32 = P.resize_square(square, size).numpy()
    got = K.crop_resize_u8(image, *box, size)
    diff = np.abs(got.astype(int) - exact)
    assert diff.max() <= 1, diff.max()
    assert (diff > 0).mean() <= (torch32 != exact).mean() + 0.005, ((diff > 0).mean(), (torch32 != exact).mean())
    if box == (200, 0, 50):
        assert not got.any(), "a square wholly outside the photo is black"


def test_crop_resize_of_a_5mp_photo_matches_torch():
    rng = np.random.default_rng(1)
    image = _photo(rng, 1944, 2592)
    for box in [(403, 41, 1829), (-50, -30, 2064)]:
        want = P.resize_square(P.crop_square(torch.from_numpy(image), *box), 512).numpy().astype(int)
        diff = np.abs(K.crop_resize_u8(image, *box, 512).astype(int) - want)
        assert diff.max() <= 1 and (diff > 0).mean() <= 1e-4


def _random_valid(rng, n: int, size: int) -> torch.Tensor:
    """Profiles of squares cut by the photo's edges (0 outside, fractional at the cut) and whole ones."""
    rows = []
    for _ in range(n):
        w, h = int(rng.integers(size // 2, 2 * size)), int(rng.integers(size // 2, 2 * size))
        side = int(rng.integers(size // 2, 2 * size))
        rows.append(P.square_valid(int(rng.integers(-side // 2, w // 2)), int(rng.integers(-side // 2, h // 2)),
                                   side, w, h, size))
    return torch.stack(rows)


CONFIGS = {
    "default": {},
    "no_mask": {"mask_ratio": 0.0},
    "wide_mask": {"mask_ratio": 1.3},
    "gain_1_offset_0": {"gain": 1.0, "offset": 0.0},
    "fractional_offset": {"offset": 127.5},  # no longer fits uint8: float32 grey levels
    "offset_out_of_range": {"offset": 300.0},
    "small_sigma": {"sigma_ratio": 0.01},
    "large_sigma": {"sigma_ratio": 0.2},
}


@pytest.mark.parametrize("size", [16, 37, 128])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_filter_matches_torch_code(name, size):
    cfg = P.PreprocessConfig(**CONFIGS[name])
    rng = np.random.default_rng(size)
    crops = torch.from_numpy(rng.integers(0, 256, (3, 3, size, size), dtype=np.uint8))
    crops[1] = torch.from_numpy(_photo(rng, size, size)).permute(2, 0, 1)
    valid = _random_valid(rng, 3, size)
    valid[2] = 1.0  # a whole photo
    if (len(P.gaussian_taps(size / 2 * cfg.sigma_ratio)) - 1) // 2 >= size:
        with pytest.raises(ValueError, match="larger than"):
            P.grey_levels(crops, cfg, valid=valid)
        return
    got = P.grey_levels(crops, cfg, valid=valid)
    want = P.grey_levels(crops, cfg, valid=valid, kernel="torch")
    exact = float(cfg.offset).is_integer() and 0 <= cfg.offset <= 255
    assert got.dtype == (torch.uint8 if exact else torch.float32)
    diff = (got.double() - want.double()).abs()
    assert diff.max() <= cfg.gain + 1e-3 and (diff > 1e-3).double().mean() <= 2e-3, (diff.max(), (diff > 0).mean())
    model_input = P.finish(crops, cfg, valid=valid)
    assert torch.equal(model_input, P.normalise(got, cfg)), "finish is normalise(grey_levels)"


def test_rounding_is_half_to_even_like_torch():
    """The kernel rounds with the float32 magic-number trick; torch.round rounds halves to even: an offset of
    .5 with gain 0 puts every pixel exactly on a half."""
    cfg = P.PreprocessConfig(gain=0.0, offset=126.5, mask_ratio=0.0)
    crops = torch.zeros((1, 3, 16, 16), dtype=torch.uint8)
    got = P.grey_levels(crops, cfg)
    assert torch.equal(got, P.grey_levels(crops, cfg, kernel="torch"))
    assert got.unique().tolist() == [126.0]


def test_whole_recipe_within_bound_of_float64_definition():
    """P.reference (crop, resize and filter by the kernels) against definition_float64 on photos whose disc
    square is cut by the photo's edges: the bound every path is held to."""
    rng = np.random.default_rng(7)
    cfg = P.PreprocessConfig()
    diffs = []
    for disc in [(160.0, 120.0, 110.0), (100.0, 120.0, 140.0), (200.0, 90.0, 125.0)]:
        image = torch.from_numpy(_photo(rng, 240, 320))
        got = P.reference([image], [disc], 96, cfg)[0].double()
        grey = got * (torch.tensor(cfg.std).view(3, 1, 1) * 255) + torch.tensor(cfg.mean).view(3, 1, 1) * 255
        diffs.append((grey - P.definition_float64(image, disc, 96, cfg)).abs().flatten())
    diffs = torch.cat(diffs)
    assert diffs.mean() <= 0.1 and diffs.quantile(0.99) <= 1.0, (diffs.mean(), diffs.quantile(0.99))


def test_normalise_table_equals_arithmetic():
    cfg = P.PreprocessConfig()
    grey = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, 3, 20, 20), dtype=np.uint8))
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.std).view(1, 3, 1, 1) * 255
    assert torch.equal(P.normalise(grey, cfg), (grey.float() - mean) / std)
    assert P.normalise(grey, cfg, "bf16", channels_last=True).is_contiguous(memory_format=torch.channels_last)


def test_resize_after_filter_and_no_filter():
    """radius set (the filter at 2R, then resized to the model size) and the filter off: float32 grey levels
    resized like the torch code."""
    crops = torch.from_numpy(np.random.default_rng(4).integers(0, 256, (2, 3, 40, 40), dtype=np.uint8))
    for cfg in (P.PreprocessConfig(radius=20), P.PreprocessConfig(enabled=False)):
        got = P.grey_levels(crops, cfg, size=32)
        want = P.grey_levels(crops, cfg, size=32, kernel="torch")
        assert got.dtype == torch.float32 and (got - want).abs().max() <= 1e-3 or \
            ((got - want).abs() > 1e-3).double().mean() <= 2e-3
    assert P.grey_levels(crops, P.PreprocessConfig(enabled=False)).dtype == torch.uint8  # untouched crops


def test_threads_give_the_same_batch():
    cfg = P.PreprocessConfig()
    crops = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (4, 3, 48, 48), dtype=np.uint8))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = P.grey_levels(crops, cfg)
        torch.set_num_threads(2)
        two = P.grey_levels(crops, cfg)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
