"""Triton preprocessing kernels against float64 / torch references, on the CPU through Triton's interpreter.

How the interpreter is switched on: Triton reads TRITON_INTERPRET whenever a function is decorated with
@triton.jit, including its own library functions (tl.zeros, ...) when triton is first imported. So on a machine
without CUDA this file sets the variable before it imports triton, if nothing imported triton earlier in this
pytest process, and leaves it set for the process (other test files do not use triton on a CPU). If triton was
already imported without the interpreter, the in-process tests skip and one test reruns this file in a
subprocess with the interpreter on, so the checks still run.

Bounds: grey levels (before normalisation) within 1 of a float64 reference, and at most 1 % of pixels off by one
(float32 sums landing on the other side of a .5 rounding boundary); bf16 within one bf16 ulp on the interpreter
(its float32 -> bf16 cast truncates; the GPU rounds to nearest even, checked exactly by the gpu tests).
"""
from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tltrain import preprocess as P
from tltrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
MAX_OFF_BY_ONE = 0.01  # fraction of grey levels allowed to differ by exactly 1 from the float64 reference
METHODS = ["direct", "dot"]  # every correctness test runs both kernels: float32 taps vs tensor-core hi/lo splits


def _import_kernels():
    """The kernel module, interpreted when there is no GPU; None if triton was already imported compiled."""
    if not HAS_CUDA and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    import triton.language.standard
    from triton.runtime.interpreter import InterpretedFunction

    if not HAS_CUDA and not isinstance(triton.language.standard.zeros, InterpretedFunction):
        return None
    return importlib.import_module("tltrain.kernels.ben_graham")


K = _import_kernels()
in_process = pytest.mark.skipif(K is None, reason="kernels imported compiled on a CPU: checked in a subprocess")


def _batch(n, h, w, seed, layout="NCHW"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, h, w, 3), generator=gen, dtype=torch.uint8)
    x = x if layout == "NHWC" else x.permute(0, 3, 1, 2).contiguous()
    return x.to(DEVICE)


def _reference_grey(images, centers, radii, sigmas, gain=4.0, offset=128.0, mask_ratio=0.9, layout="NCHW",
                    valid=None):
    """float64 definition for any H x W, per-sample disc, sigma and valid profiles (vy, vx): the numbers the kernel
    must reproduce. The normaliser is the 2-D blur of the outer product vy (x) vx, not the separable shortcut."""
    x = images.cpu().double()
    x = x.permute(0, 3, 1, 2) if layout == "NHWC" else x
    n, _, h, w = x.shape
    out = []
    for i in range(n):
        vy, vx = (torch.ones(h), torch.ones(w)) if valid is None else (valid[0][i].cpu(), valid[1][i].cpu())
        weight = torch.outer(vy.double(), vx.double()).view(1, 1, h, w)
        den = P.gaussian_blur(weight, float(sigmas[i]))
        blurred = P.gaussian_blur(x[i:i + 1], float(sigmas[i])) / torch.where(den > 0, den, 1.0)
        grey = torch.round(gain * (x[i:i + 1] - weight * blurred) + offset).clamp(0, 255)
        yy = torch.arange(h, dtype=torch.float64).view(-1, 1) + 0.5 - float(centers[i][1])
        xx = torch.arange(w, dtype=torch.float64).view(1, -1) + 0.5 - float(centers[i][0])
        if mask_ratio > 0:
            grey = torch.where(yy ** 2 + xx ** 2 <= (mask_ratio * float(radii[i])) ** 2, grey, offset)
        out.append(grey)
    return torch.cat(out)


def _cut_profiles(n, h, w, seed):
    """Per-sample valid profiles like a cut photo's: zero beyond a cut, a fractional edge pixel, ones inside."""
    gen = torch.Generator().manual_seed(seed)
    vy, vx = torch.ones(n, h), torch.ones(n, w)
    for i in range(n):
        top = int(torch.randint(2, h // 3, (1,), generator=gen))
        left = int(torch.randint(2, w // 3, (1,), generator=gen))
        vy[i, :top], vy[i, top] = 0.0, float(torch.rand(1, generator=gen))
        vx[i, w - left:], vx[i, w - left - 1] = 0.0, float(torch.rand(1, generator=gen))
    return vy, vx


def _assert_grey_close(got, want):
    diff = (got.cpu().double() - want).abs()
    assert diff.max().item() <= 1, f"max grey-level error {diff.max().item()}"
    assert (diff > 0).double().mean().item() <= MAX_OFF_BY_ONE


def _poisoned(shape, dtype, channels_last=False, value=float("nan")):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.full(shape, value, dtype=dtype, device=DEVICE).contiguous(memory_format=fmt)


@in_process
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_grey_levels_match_float64_reference_with_per_sample_disc_and_sigma(layout, method):
    images = _batch(2, 37, 45, seed=1, layout=layout)
    centers = [[20.5, 17.0], [24.0, 19.5]]
    radii, sigmas = [18.0, 15.5], [1.7, 3.2]
    for sentinel in (7, 201):  # two sentinels: an element left unwritten cannot match the reference both times
        out = _poisoned((2, 3, 37, 45), torch.uint8, value=sentinel)
        got = K.ben_graham_triton(images, centers, radii, sigmas, out_dtype=torch.uint8, layout=layout, out=out,
                                  method=method)
        assert got.data_ptr() == out.data_ptr()
        _assert_grey_close(got, _reference_grey(images, centers, radii, sigmas, layout=layout))


@in_process
@pytest.mark.parametrize("method", METHODS)
def test_valid_profiles_of_cut_photos_match_float64_definition(method):
    """Cut photos: pixels outside the photo carry no weight in the blur and come out as the offset grey."""
    images = _batch(2, 37, 45, seed=12)
    vy, vx = _cut_profiles(2, 37, 45, seed=12)
    images = (images.cpu().double() * torch.einsum("nh,nw->nhw", vy, vx)[:, None]).round().to(torch.uint8).to(DEVICE)
    centers, radii, sigmas = [[22.5, 18.5], [21.0, 20.0]], [22.0, 21.0], [1.9, 2.7]
    got = K.ben_graham_triton(images, centers, radii, sigmas, out_dtype=torch.uint8, valid=(vy.to(DEVICE), vx),
                              out=_poisoned((2, 3, 37, 45), torch.uint8, value=9), method=method)
    want = _reference_grey(images, centers, radii, sigmas, valid=(vy, vx))
    _assert_grey_close(got, want)
    assert (got[0, :, :int((vy[0] == 0).sum())] == 128).all()  # outside the photo: offset grey
    with pytest.raises(ValueError, match="valid must be"):
        K.ben_graham_triton(images, centers, radii, sigmas, valid=(vy[:, :5], vx), method=method)


@in_process
@pytest.mark.parametrize("method", METHODS)
def test_cut_fundus_crop_within_bound_of_float64_definition(method):
    """The loaders' call on a disc square cut at top and bottom, against tltrain.preprocess.definition_float64."""
    from tltrain.data.synth import render_fundus

    image = torch.from_numpy(render_fundus(3, grade=2, width=96))
    disc = (48.0, 36.0, 40.0)
    keep = slice(int(36 - 0.8 * 40), int(36 + 0.8 * 40))  # rows |y - cy| > 0.8 r removed
    image, disc = image[keep].contiguous(), (48.0, 36.0 - keep.start, 40.0)
    cfg = P.PreprocessConfig(sigma_ratio=1 / 15)
    crop, valid = P.crop_resize(image, disc, 64, cfg)
    got = K.ben_graham_batch(crop[None].to(DEVICE), cfg, "fp32", method=method, valid=valid[None].to(DEVICE))
    std = torch.tensor(cfg.std).view(3, 1, 1) * 255
    grey = got[0].cpu().double() * std + torch.tensor(cfg.mean).view(3, 1, 1) * 255
    diff = (grey - P.definition_float64(image, disc, 64, cfg)).abs()
    assert diff.mean().item() <= 0.1 and diff.flatten().quantile(0.99).item() <= 1


@in_process
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sigma", [0.3, 12.0])
def test_sigma_extremes_three_taps_and_window_nearly_the_image(sigma, method):
    images = _batch(1, 37, 45, seed=2)  # 12.0 -> 73 taps: half-window 36 on a 37-row image
    got = K.ben_graham_triton(images, [[22.5, 18.5]], [40.0], sigma, gain=3.0, offset=100.0, mask_ratio=0.0,
                              out_dtype=torch.uint8, out=_poisoned((1, 3, 37, 45), torch.uint8, value=3),
                              method=method)
    _assert_grey_close(got, _reference_grey(images, [[22.5, 18.5]], [40.0], [sigma], 3.0, 100.0, 0.0))


@in_process
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype,channels_last", [("fp32", False), ("fp16", True), ("bf16", False)])
def test_batch_wrapper_equals_torch_finish(dtype, channels_last, method):
    crops = _batch(2, 41, 41, seed=3)
    cfg = P.PreprocessConfig(sigma_ratio=0.2)
    got = K.ben_graham_batch(crops, cfg, dtype, channels_last, method=method)
    want = P.finish(crops.cpu(), cfg, dtype, channels_last)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    one_grey = 1.0 / (255 * min(cfg.std))
    diff = (got.cpu().float() - want.float()).abs()
    if dtype == "bf16" and not HAS_CUDA:  # interpreter truncates to bf16: within one ulp of the fp32 value
        exact = P.finish(crops.cpu(), cfg, "fp32", channels_last)
        assert ((got.cpu().float() - exact).abs() <= exact.abs() * 2.0 ** -7 + 1e-6).all()
        return
    assert diff.max().item() <= one_grey * 1.001
    assert (diff > 0).double().mean().item() <= MAX_OFF_BY_ONE


@in_process
@pytest.mark.parametrize("method", METHODS)
def test_every_normalised_element_written_in_both_layouts(method):
    images = _batch(2, 23, 31, seed=4, layout="NHWC")
    args = ([[15.5, 11.5], [15.5, 11.5]], [11.5, 11.5], 1.1)
    plain = K.ben_graham_triton(images, *args, layout="NHWC", out=_poisoned((2, 3, 23, 31), torch.float32),
                                method=method)
    strided = K.ben_graham_triton(images, *args, layout="NHWC", channels_last=True, out_dtype=torch.float16,
                                  out=_poisoned((2, 3, 23, 31), torch.float16, channels_last=True), method=method)
    assert not torch.isnan(plain.float()).any() and not torch.isnan(strided.float()).any()
    assert plain.dtype == torch.float32 and strided.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(plain.half().float(), strided.float(), atol=0, rtol=0)


@in_process
@pytest.mark.parametrize("method", METHODS)
def test_per_sample_flip_mirrors_only_flipped_samples(method):
    images = _batch(2, 19, 27, seed=5)
    args = ([[10.0, 9.0], [16.0, 8.5]], [9.0, 8.0], 0.9)
    plain = K.ben_graham_triton(images, *args, out_dtype=torch.uint8, method=method)
    flipped = K.ben_graham_triton(images, *args, out_dtype=torch.uint8, flip=torch.tensor([True, False]),
                                  method=method)
    assert torch.equal(flipped[0], plain[0].flip(-1))
    assert torch.equal(flipped[1], plain[1])
    assert not torch.equal(flipped[0], plain[0])


@in_process
@pytest.mark.parametrize("method", METHODS)
def test_batch_of_one_off_centre_disc_masks_to_offset(method):
    images = _batch(1, 21, 29, seed=6)
    got = K.ben_graham_triton(images, [[8.0, 12.0]], [6.0], 0.6, out_dtype=torch.uint8, method=method)
    assert got[0, :, 0, -1].tolist() == [128, 128, 128]  # far corner: outside 0.9 * 6 px of (8, 12)
    _assert_grey_close(got, _reference_grey(images, [[8.0, 12.0]], [6.0], [0.6]))


@in_process
def test_bad_input_names_the_problem():
    images = _batch(1, 16, 16, seed=7)
    with pytest.raises(ConfigError, match="layout"):
        K.ben_graham_triton(images, [[8, 8]], [8], 1.0, layout="CHW")
    with pytest.raises(ConfigError, match="larger than the 16x16 image"):
        K.ben_graham_triton(images, [[8, 8]], [8], 6.0)
    with pytest.raises(ValueError, match="uint8"):
        K.ben_graham_triton(images.float(), [[8, 8]], [8], 1.0)
    with pytest.raises(ValueError, match="centers"):
        K.ben_graham_triton(images, [[8, 8], [8, 8]], [8], 1.0)
    with pytest.raises(ValueError, match="out must be"):
        K.ben_graham_triton(images, [[8, 8]], [8], 1.0, out=torch.empty(1, 3, 16, 15, device=DEVICE))
    with pytest.raises(ConfigError, match="sigma must be > 0"):
        K.ben_graham_triton(images, [[8, 8]], [8], [0.0])
    with pytest.raises(ValueError, match="flip"):
        K.ben_graham_triton(images, [[8, 8]], [8], 1.0, flip=[True, False])


@in_process
@pytest.mark.parametrize("method,tile", [("direct", None), ("dot", None), ("dot", (16, 128)), ("dot", (32, 128))])
def test_production_window_53_taps_across_several_tiles(method, tile):
    """sigma 8.53 = 256/30, the default at 512 px: the dot kernel's (64, 128) tile and two narrower ones, on an
    image that is not a multiple of any tile (several tiles each way, ragged last ones)."""
    images = _batch(2, 97, 83, seed=9)
    centers, radii = [[41.5, 48.0], [40.0, 50.5]], [41.0, 44.0]
    out = _poisoned((2, 3, 97, 83), torch.uint8, value=251)
    got = K.ben_graham_triton(images, centers, radii, 8.53, out_dtype=torch.uint8, out=out, method=method, tile=tile)
    diff = (got.cpu().double() - _reference_grey(images, centers, radii, [8.53, 8.53])).abs()
    assert diff.max().item() <= 1 and (diff > 0).double().mean().item() <= 1e-3


@in_process
def test_auto_takes_the_dot_kernel_where_its_tile_fits_and_direct_beyond():
    cpu = torch.device("cpu")
    assert K._choose_method("auto", 2 * 26 + 1, cpu, None) == ("dot", (64, 128))
    assert K._choose_method("auto", 2 * 8 + 1, cpu, None) == ("dot", (16, 32))
    assert K._choose_method("auto", 2 * 57 + 1, cpu, None) == ("direct", None)
    with pytest.raises(ConfigError, match="method='direct'"):
        K._choose_method("dot", 2 * 57 + 1, cpu, None)
    with pytest.raises(ConfigError, match="method"):
        K._choose_method("fft", 5, cpu, None)
    images = _batch(1, 121, 118, seed=10)  # sigma 19: 115 taps, wider than any tensor-core tile
    got = K.ben_graham_triton(images, [[59.0, 60.5]], [58.0], 19.0, out_dtype=torch.uint8)
    _assert_grey_close(got, _reference_grey(images, [[59.0, 60.5]], [58.0], [19.0]))


def test_dot_warps_avoid_the_tile_old_triton_cannot_compile_for_hopper():
    """triton 3.0/3.1 (torch 2.4/2.5) abort in a C++ assertion on the 8-warp 64/128 tile for sm_90, measured with
    benchmarks/kernel_resources.py: the default drops to 4 warps there and an explicit 8 is a clear error."""
    blur_dot = importlib.import_module("tltrain.kernels.blur_dot")
    hopper, ampere = (9, 0), (8, 0)
    assert blur_dot.default_num_warps((64, 128), hopper, (3, 8)) == 8
    assert blur_dot.default_num_warps((64, 128), hopper, (3, 1)) == 4
    assert blur_dot.default_num_warps((64, 128), ampere, (3, 0)) == 8
    assert blur_dot.default_num_warps((32, 64), hopper, (3, 8)) == 4
    assert blur_dot.default_num_warps((64, 128), None, (3, 0)) == 8  # the interpreter compiles nothing
    assert "num_warps=4" in blur_dot.unsupported((64, 128), 8, hopper, (3, 0))
    assert blur_dot.unsupported((64, 128), 4, hopper, (3, 0)) is None
    assert blur_dot.unsupported((64, 128), 8, hopper, (3, 2)) is None


@in_process
def test_shared_parameters_come_from_cached_device_tables_and_equal_per_sample_ones():
    """The loaders' call (one sigma, one centred disc) builds no table after the first batch, so it never waits
    for a host-to-device copy; the same values given per sample, as tensors, give the same output."""
    crops = _batch(3, 33, 33, seed=11)
    cfg = P.PreprocessConfig(sigma_ratio=0.1)
    first = K.ben_graham_batch(crops, cfg, "fp16")
    misses = K._constant.cache_info().misses, K._shared_taps.cache_info().misses
    again = K.ben_graham_batch(crops, cfg, "fp16")
    assert (K._constant.cache_info().misses, K._shared_taps.cache_info().misses) == misses
    assert torch.equal(first, again)
    per_sample = K.ben_graham_triton(crops, torch.full((3, 2), 16.5, device=DEVICE), torch.full((3,), 16.5),
                                     torch.full((3,), 1.65, device=DEVICE), cfg.gain, cfg.offset, cfg.mask_ratio,
                                     out_dtype=torch.float16)
    assert torch.equal(per_sample, first)


def test_in_subprocess_when_kernels_were_imported_compiled():
    if K is not None:
        pytest.skip("the in-process tests ran with the interpreter (or on a GPU)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout


def test_benchmark_smoke_mode_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_kernels.py"), "--device", "cpu",
                           "--small", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["batch"] >= 1
    for name in ("triton_direct", "torch_reference"):
        assert result["variants"][name]["images_per_s"] > 0
    assert result["variants"]["triton_direct"]["max_grey_error_vs_reference"] <= 1
    dot = [name for name in result["variants"] if name.startswith("triton_dot_") and "nhwc" not in name]
    assert dot and all(result["variants"][name]["max_grey_error_vs_reference"] <= 1 for name in dot)


@pytest.mark.parametrize("arch,only", [(90, "dot_b64_s128_w8"), (80, "dot_b32_s64_w4")])
def test_kernels_compile_for_hopper_and_ampere_without_spills(tmp_path, arch, only):
    """An ahead-of-time compile to PTX and ptxas (no GPU needed) catches what the interpreter lets through, and
    keeps the default tile's register budget honest: no spills, and tensor-core instructions on Hopper."""
    out = tmp_path / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernel_resources.py"), "--arch", str(arch),
                           "--only", only, "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    kernels = json.loads(out.read_text())["kernels"]
    assert set(kernels) == {only}
    report = kernels[only]
    assert report["registers"] <= 255 and report["spill_store_bytes"] == 0 and report["spill_load_bytes"] == 0
    assert (report["wgmma"] > 0) if arch == 90 else (report["mma_sync"] > 0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_gpu_full_size_matches_float64_reference_and_finish(dtype, method):
    """512 px, the production window (53 taps): grey levels against float64, normalised output against the
    torch reference run on the same GPU (float32 cuDNN, TF32 off)."""
    crops = _batch(4, 512, 512, seed=8)
    cfg = P.PreprocessConfig(radius=256)
    half = [256.0] * 4
    grey = K.ben_graham_triton(crops, [[256.0, 256.0]] * 4, half, 256 * cfg.sigma_ratio, out_dtype=torch.uint8,
                               method=method, out=_poisoned((4, 3, 512, 512), torch.uint8, value=7))
    diff = (grey.cpu().double() - _reference_grey(crops, [[256.0, 256.0]] * 4, half, [256 * cfg.sigma_ratio] * 4)).abs()
    assert diff.max().item() <= 1 and (diff > 0).double().mean().item() <= 1e-4

    got = K.ben_graham_batch(crops, cfg, dtype, channels_last=True, method=method)
    want = P.finish(crops, cfg, dtype, channels_last=True)
    diff = (got.float() - want.float()).abs()
    assert diff.max().item() <= 1.001 / (255 * min(cfg.std))
    assert (diff > 0).double().mean().item() <= 1e-3
    assert math.isfinite(got.float().sum().item())
