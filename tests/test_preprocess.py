"""The torch reference of Ben Graham's preprocessing (tltrain.preprocess), against independent implementations
(scipy's Gaussian filter) and against what the recipe must do to simple synthetic discs."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from tltrain import preprocess as P
from tltrain.errors import ConfigError

RAW = dict(mean=[0, 0, 0], std=[1 / 255] * 3)  # normalisation that leaves grey levels as they are


def test_gaussian_window_and_zero_border_match_scipy():
    sigma = 2.5
    assert len(P.gaussian_taps(sigma)) == 2 * 8 + 1  # 2 * ceil(3 sigma) + 1 taps
    image = torch.rand(1, 1, 40, 50, dtype=torch.float64) * 255
    ours = P.gaussian_blur(image, sigma)[0, 0].numpy()
    # gauss0: zero outside the image (scipy's "constant"); radius fixes the same window
    theirs = ndimage.gaussian_filter(image[0, 0].numpy(), sigma, mode="constant", cval=0.0, radius=8)
    assert np.abs(ours - theirs).max() < 1e-9
    profiles = torch.rand(3, 2, 40, dtype=torch.float64)
    blurred = P.blur_profiles(profiles, sigma).numpy()
    assert np.abs(blurred - ndimage.gaussian_filter1d(profiles.numpy(), sigma, axis=-1, mode="constant",
                                                      radius=8)).max() < 1e-12


@pytest.mark.parametrize("shape,sigma", [((2, 3, 64, 64), 4.3), ((1, 3, 37, 45), 2.0), ((1, 1, 96, 80), 0.3),
                                         ((1, 3, 512, 512), 512 / 2 * 1 / 30)])
def test_banded_matrix_blur_matches_the_1d_convolutions_on_random_images(shape, sigma):
    """float32 on the CPU blurs as two banded matrix products; the conv2d passes are its reference (and the float64
    conv2d the ground truth for both)."""
    x = torch.rand(shape, generator=torch.Generator().manual_seed(3)) * 255
    fast = P.gaussian_blur(x, sigma)
    conv = P._conv_blur(x, P.gaussian_taps(sigma, torch.float32))
    exact = P.gaussian_blur(x.double(), sigma)
    assert fast.dtype == torch.float32 and fast.shape == x.shape
    assert (fast - conv).abs().max() < 2e-4
    assert (fast.double() - exact).abs().max() < 2e-4


def test_flat_photo_filters_to_offset_everywhere_even_at_square_and_cut_edges():
    """The normalised blur of a flat photo is the photo itself, so 4*(img - blur) vanishes up to every edge:
    at the square's border (no reflect) and at a cut (no black bar inside, no white bar outside)."""
    image = torch.full((70, 100, 3), 150, dtype=torch.uint8)  # a disc of radius 50 cut at top and bottom
    out = P.reference([image], [(50.0, 35.0, 50.0)], 64, P.PreprocessConfig(mask_ratio=0, **RAW))[0]
    assert (out - 128).abs().max() <= 1


def test_valid_profile_is_the_resized_photo_indicator():
    v = P.valid_profile(-3, 10, 5, 10)  # square pixels -3..6 on a 5-pixel photo: rows 3..7 are photo
    assert v.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 0, 0]
    part = P.valid_profile(-4, 40, 20, 10)  # photo at square pixels 4..23, shrunk 4x: edge pixels partly photo
    assert part[-1] == 0 and part[2] == part[4] == 1 and 0 < part[1] < 1 and 0 < part[6] < 1
    assert torch.equal(P.square_valid(0, 0, 16, 16, 16, 8), torch.ones(2, 8))


def test_blur_window_larger_than_image_is_an_error():
    with pytest.raises(ValueError, match="taps"):
        P.gaussian_blur(torch.zeros(1, 3, 8, 8), sigma=3.0)


def test_reference_is_ben_graham_recipe():
    """Flat areas of the disc become 128 (4f - 4blur = 0), a small bright spot is amplified, outside 0.9 R is 128."""
    image = torch.zeros((100, 100, 3), dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.arange(100), torch.arange(100), indexing="ij")
    image[((yy - 50) ** 2 + (xx - 50) ** 2) < 40 ** 2] = 90
    image[48:52, 48:52] = 110  # a small bright lesion at the centre
    raw = P.PreprocessConfig(mean=[0, 0, 0], std=[1 / 255] * 3)
    out = P.reference([image], [(50.0, 50.0, 40.0)], 64, raw)[0]
    assert out.shape == (3, 64, 64)
    assert torch.all(out[:, 32, 12] == 128) and torch.all(out[:, 0, 0] == 128)
    assert torch.all(out[:, 32, 32] > 128 + 8)  # 4 * (110 - blur) at the spot: amplified local contrast
    with pytest.raises(Exception, match="radius"):
        P.PreprocessConfig(radius=2).validate()



def test_radius_sets_filter_scale_independently_of_model_size():
    image = torch.zeros((120, 120, 3), dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.arange(120), torch.arange(120), indexing="ij")
    image[((yy - 60) ** 2 + (xx - 60) ** 2) < 50 ** 2] = 100
    image[55:65, 30:90] = 140  # a bright band: its enhanced edges depend on the blur scale
    at_model = P.reference([image], [(60.0, 60.0, 50.0)], 32, P.PreprocessConfig(**RAW))[0]
    at_radius = P.reference([image], [(60.0, 60.0, 50.0)], 32, P.PreprocessConfig(radius=48, **RAW))[0]
    assert at_model.shape == at_radius.shape == (3, 32, 32)
    assert P.PreprocessConfig(radius=48).work_size(32) == 96 and P.PreprocessConfig().work_size(32) == 32
    assert P.PreprocessConfig(radius=48, enabled=False).work_size(32) == 32  # no filter: one resize only
    assert (at_model - at_radius).abs().max() > 5.0  # filtered at 96 px then resized != filtered at 32 px


def test_filter_off_or_offline_only_crops_resizes_and_normalises():
    image = torch.full((50, 50, 3), 77, dtype=torch.uint8)
    for cfg in (P.PreprocessConfig(enabled=False, **RAW), P.PreprocessConfig(applied_offline=True, **RAW)):
        out = P.reference([image], [(25.0, 25.0, 25.0)], 16, cfg)[0]
        assert torch.all(out == 77)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_output_dtype_layout_and_normalisation(dtype):
    crops = torch.full((2, 3, 16, 16), 128, dtype=torch.uint8)
    out = P.finish(crops, P.PreprocessConfig(enabled=False), dtype, channels_last=True)
    assert out.dtype == P.DTYPES[dtype] and out.is_contiguous(memory_format=torch.channels_last)
    expected = (128 / 255 - torch.tensor(P.IMAGENET_MEAN)) / torch.tensor(P.IMAGENET_STD)
    assert torch.allclose(out[0, :, 5, 5].float(), expected, atol=0.02)


def test_disc_box_reaches_outside_the_photo_black_in_the_crop():
    image = torch.full((40, 60, 3), 200, dtype=torch.uint8)
    x0, y0, side = P.disc_box((30.0, 20.0, 25.0), 60, 40)
    assert (x0, y0, side) == (5, -5, 50)
    square = P.crop_square(image, x0, y0, side)
    assert torch.all(square[:5] == 0) and torch.all(square[5:45] == 200) and torch.all(square[45:] == 0)


def test_bad_config_values_name_the_key():
    with pytest.raises(ConfigError, match="radius"):
        P.PreprocessConfig(radius=2).validate()
    with pytest.raises(ConfigError, match="sigma_ratio"):
        P.PreprocessConfig(sigma_ratio=0).validate()
    with pytest.raises(ConfigError, match="crop_scale"):
        P.AugmentConfig(crop_scale=[0.9, 0.5]).validate()
    with pytest.raises(ConfigError, match="fp8"):
        P.validate_dtype("fp8")


def test_rotate_batch_turns_each_image_by_its_angle_and_fills_offset_grey():
    """Training rotates after the filter: 90 degrees is an exact quarter turn, 0 leaves the image alone, and the
    corners a 45-degree turn brings in are the normalised offset grey."""
    cfg = P.PreprocessConfig()
    x = torch.randn(3, 3, 16, 16)
    out = P.rotate_batch(x, [0.0, 90.0, 45.0], cfg)
    assert torch.allclose(out[0], x[0], atol=1e-5)
    quarter = torch.rot90(x[1], 1, dims=(-2, -1))
    assert torch.allclose(out[1], quarter, atol=1e-5) or torch.allclose(out[1], torch.rot90(x[1], -1, (-2, -1)),
                                                                        atol=1e-5)
    grey = (cfg.offset / 255 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    assert torch.allclose(out[2, :, 0, 0], grey, atol=1e-5)
