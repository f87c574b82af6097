"""`tltrain explain` and its parts: the raw LayerCAM map against an independent hook computation, the paper's
scaling and fusion on known arrays, the inverse of the crop (a marked photo pixel found again through the model
input), the default layers of several timm families, and the command on a run folder and a package."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from tltrain.errors import ConfigError, DataError
from tltrain.explain.geometry import input_to_photo, map_on_photo, photo_to_input
from tltrain.explain.layercam import SHALLOW_GAMMA, default_layers, raw_maps, resolve_layers, scale_and_fuse


def _hook_maps(model, inputs, target, names):
    """Independent LayerCAM: forward hooks keep each layer's output, autograd gives d logit / d output."""
    modules = dict(model.named_modules())
    outputs = {}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o)) for n in names]
    try:
        logits = model(inputs)
        grads = torch.autograd.grad(logits[:, target].sum(), [outputs[n] for n in names])
    finally:
        for handle in handles:
            handle.remove()
    return [(torch.relu(g) * outputs[n]).sum(1).detach().numpy() for n, g in zip(names, grads)]


@pytest.mark.parametrize("arch", ["resnet10t", "efficientnet_b0", "convnext_atto"])
def test_raw_map_equals_an_independent_hook_computation(arch):
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=3).eval()
    inputs = torch.randn(2, 3, 64, 64)
    names = default_layers(model)
    ours, outputs = raw_maps(model, inputs, [2, 2], names)
    expected = _hook_maps(model, inputs, 2, names)
    for layer, reference in enumerate(expected):
        for image in range(2):
            assert ours[image][layer].shape == reference[image].shape
            np.testing.assert_allclose(ours[image][layer], reference[image], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(outputs, model(inputs).detach().numpy(), atol=1e-5)


def test_layers_given_in_any_order_are_explained_shallow_to_deep_and_unknown_ones_refused():
    model = timm.create_model("resnet10t", pretrained=False, num_classes=2).eval()
    assert resolve_layers(model, ["layer4", "layer2"]) == ["layer2", "layer4"]
    with pytest.raises(ConfigError, match=r"'layer9' is not a layer of .* its stages: act1, layer1"):
        resolve_layers(model, ["layer9"])
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, img_size=64)
    assert default_layers(vit) == ["blocks.2", "blocks.5", "blocks.8", "blocks.11"]


def test_a_vit_is_explained_through_its_token_grid():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, img_size=64).eval()
    maps, _ = raw_maps(vit, torch.randn(1, 3, 64, 64), [1], ["blocks.5", "blocks.11"])
    assert [m.shape for m in maps[0]] == [(4, 4), (4, 4)]


def test_scaling_and_fusion_follow_the_layercam_paper():
    shallow = np.array([[0.0, 1.0], [2.0, 4.0]], np.float32)
    deep = np.array([[3.0, 0.0], [0.0, 0.0]], np.float32)
    scaled, fused = scale_and_fuse([shallow, deep], 2)  # same size: no resampling
    np.testing.assert_allclose(scaled[0], np.tanh(SHALLOW_GAMMA * shallow / 4.0), atol=1e-6)
    np.testing.assert_allclose(scaled[1], deep / 3.0, atol=1e-6)  # the deepest: divided by its maximum only
    np.testing.assert_allclose(fused, np.maximum(scaled[0], scaled[1]), atol=1e-6)
    zero, fused_zero = scale_and_fuse([np.zeros((2, 2), np.float32)], 4)
    assert fused_zero.shape == (4, 4) and not fused_zero.any()
    negative, _ = scale_and_fuse([-np.ones((2, 2), np.float32)], 2)
    assert not negative[0].any()  # ReLU before scaling


def test_input_points_map_back_to_photo_pixels():
    box, size = (-40, 25, 300), 64
    for u, v in ((0.0, 0.0), (10.5, 50.25), (63.9, 31.0)):
        x, y = input_to_photo(u, v, box, size)
        assert photo_to_input(x, y, box, size) == pytest.approx((u, v))
    delta = np.zeros((size, size), np.float32)
    delta[40, 12] = 1.0  # input pixel (u=12, v=40): its centre (12.5, 40.5)
    placed = map_on_photo(delta, box, 400, 320)
    y, x = np.unravel_index(placed.argmax(), placed.shape)
    cx, cy = input_to_photo(12.5, 40.5, box, size)
    assert abs(x + 0.5 - cx) <= box[2] / size and abs(y + 0.5 - cy) <= box[2] / size
    assert placed[:box[1]].sum() == 0 and placed[box[1] + box[2]:].sum() == 0  # nothing outside the crop


def test_a_marked_photo_pixel_is_found_again_through_the_model_input():
    """A bright spot drawn on a synthetic fundus is the brightest pixel of the model input (filter off); mapped
    back through the crop it lands on the spot in the photo (within one input pixel)."""
    from PIL import Image, ImageDraw

    from tltrain.data.synth import render_fundus
    from tltrain.explain.command import read_image
    from tltrain.export.load import Preprocessing
    from tltrain.export.prediction import predict_input

    photo = Image.fromarray(render_fundus(7, 0, width=320, height=240))
    spot = (190, 140)
    ImageDraw.Draw(photo).ellipse((spot[0] - 2, spot[1] - 2, spot[0] + 2, spot[1] + 2), fill=(255, 255, 255))
    path = Path(__file__).parent / "_spot.png"
    try:
        photo.save(path)
        pre = Preprocessing(96, {"enabled": False, "filter_version": 2, "mean": [0, 0, 0], "std": [1, 1, 1]})
        tensor = predict_input(pre, path)
        _, _, box = read_image(pre, path)
    finally:
        path.unlink(missing_ok=True)
    brightness = tensor.sum(0).numpy()
    v, u = np.unravel_index(brightness.argmax(), brightness.shape)
    x, y = input_to_photo(u + 0.5, v + 0.5, box, 96)
    step = box[2] / 96
    assert abs(x - (spot[0] + 0.5)) <= step + 1 and abs(y - (spot[1] + 0.5)) <= step + 1


def test_explain_a_run_folder_writes_every_output(trained_run, fundus_raw, tmp_path, capsys):
    from tltrain.cli import main as cli_main

    images = sorted((fundus_raw / "train").iterdir())[:5]
    out = tmp_path / "maps"
    assert cli_main(["explain", str(trained_run), *map(str, images), "--out", str(out)]) in (0, None)
    printed = capsys.readouterr().out
    assert "5 images explained at layers act1, layer1, layer2, layer3, layer4" in printed
    with open(out / "explain.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["image"]).name for r in rows] == [p.name for p in images]
    for row in rows:
        assert (out / f"{row['key']}.png").is_file() and (out / f"{row['key']}_photo.jpg").is_file()
        maps = np.load(out / f"{row['key']}.npz", allow_pickle=False)
        raw_shapes = [maps[f"raw/{name}"].shape for name in ("act1", "layer1", "layer2", "layer3", "layer4")]
        assert raw_shapes[0][0] > raw_shapes[-1][0]  # each at its own feature-map size
        size = json.loads(json.dumps(maps["fused"].shape))
        assert size == [32, 32] and maps["fused"].max() <= 1 + 1e-6
        assert int(maps["target"]) == int(row["predicted"])  # --target predicted
        from PIL import Image

        with Image.open(images[rows.index(row)]) as photo:
            assert maps["photo_fused"].shape == (photo.height, photo.width)
    assert (out / "contact_sheet.png").is_file()


def test_explain_a_package_with_a_class_target_and_lists_unreadable_images(trained_run, fundus_raw, tmp_path):
    from tltrain.cli import main as cli_main
    from tltrain.explain.command import explain

    package = tmp_path / "pkg"
    assert cli_main(["export", str(trained_run), str(package)]) in (0, None)
    folder = tmp_path / "images"
    folder.mkdir()
    for image in sorted((fundus_raw / "train").iterdir())[:2]:
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "broken.jpeg").write_bytes(b"not a jpeg")
    result = explain(package, [folder], tmp_path / "out", target="3", layers=["layer4", "layer2"], progress=False)
    assert result["explained"] == 2 and result["layers"] == ["layer2", "layer4"]
    assert [Path(s["file"]).name for s in result["skipped"]] == ["broken.jpeg"]
    assert all(row["target"] == 3 for row in result["rows"])
    with pytest.raises(DataError, match="--target 'seven'"):
        explain(package, [folder], tmp_path / "out2", target="seven", progress=False)
    with pytest.raises(DataError, match="neither a package"):
        explain(tmp_path, [folder], tmp_path / "out3", progress=False)
