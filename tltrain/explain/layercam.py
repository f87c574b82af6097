"""LayerCAM (Jiang et al., IEEE TIP 2021) per layer, and the paper's fusion of several layers.

Per layer l and target class k: raw_l = sum over channels of ReLU(d y_k / d A_l) * A_l, at the layer's feature-map
size. The raw maps come from the grad-cam library (pytorch_grad_cam.LayerCAM: one forward and one backward pass
hooks every requested layer; its get_cam_image is that formula). The library then min-max scales every layer to
the input size and *averages* them; the paper does not, so the scaling and the fusion are done here:
- every map is upsampled to the input size (bilinear) and divided by its maximum (a map that is zero everywhere
  stays zero);
- the maps of the shallower layers (all but the deepest) are scaled with tanh(2 x map): shallow maps are weak and
  would vanish beside the deep one (the paper's gamma = 2);
- the fused map is the element-wise maximum over the layers (in [0, 1]).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tltrain.errors import ConfigError

SHALLOW_GAMMA = 2.0  # tanh(gamma x map) for the shallower layers (the LayerCAM paper's value)
VIT_LAYERS = 4  # a ViT has no stages: this many blocks, evenly spaced, the last included


@dataclass
class ImageMaps:
    """One image's LayerCAM: per layer the raw map (feature-map size) and the scaled map (input size), the fused
    map, the class the maps explain, and the model's class probabilities."""

    layers: list[str]
    raw: list[np.ndarray]
    scaled: list[np.ndarray]
    fused: np.ndarray
    target: int
    scores: np.ndarray


def default_layers(model: torch.nn.Module) -> list[str]:
    """The output of every stage, named as timm's feature_info names it (a stage's output is its last block's), so
    any timm CNN works; a ViT (blocks of tokens) gets VIT_LAYERS evenly spaced blocks."""
    info = getattr(model, "feature_info", None)
    if info is None:
        raise ConfigError(f"{type(model).__name__} has no timm feature_info: name the layers with --layers")
    names = [entry["module"] for entry in info]
    if _is_vit(model):
        step = len(names) / VIT_LAYERS
        names = [names[min(len(names) - 1, int(round((i + 1) * step)) - 1)] for i in range(VIT_LAYERS)]
    return list(dict.fromkeys(names))


def resolve_layers(model: torch.nn.Module, names: list[str]) -> list[str]:
    """`names` (dotted names of model.named_modules()) from shallow to deep: grad-cam pairs the k-th activation
    with the k-th gradient assuming the layers run in the order given. ConfigError listing the stages otherwise."""
    order = {name: number for number, (name, _) in enumerate(model.named_modules())}
    missing = [name for name in names if name not in order or not name]
    if missing:
        raise ConfigError(f"--layers: {', '.join(map(repr, missing))} is not a layer of {type(model).__name__}; "
                          f"its stages: {', '.join(default_layers(model))}")
    return sorted(dict.fromkeys(names), key=order.__getitem__)


def _is_vit(model) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")


def vit_reshape(model):
    """Tokens (B, prefix + H*W, C) -> (B, C, H, W): the reshape grad-cam applies to a ViT's activations and
    gradients (the class and register tokens dropped)."""
    grid = tuple(model.patch_embed.grid_size)
    prefix = int(model.num_prefix_tokens)

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3:
            return tokens
        body = tokens[:, prefix:, :]
        return body.reshape(body.shape[0], grid[0], grid[1], body.shape[2]).permute(0, 3, 1, 2)
    return reshape


def raw_maps(model: torch.nn.Module, inputs: torch.Tensor, targets: list[int], layers: list[str],
             target_output=None) -> tuple[list[list[np.ndarray]], np.ndarray]:
    """(per image, per layer: the raw LayerCAM map at feature-map size; the model's outputs), from one forward and
    backward pass through grad-cam's LayerCAM. targets: the output each image's map explains (its logit)."""
    from pytorch_grad_cam import LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    named = dict(model.named_modules())
    modules = [named[name] for name in layers]  # in forward order (resolve_layers)
    cam = LayerCAM(model=model, target_layers=modules, reshape_transform=vit_reshape(model) if _is_vit(model) else None)
    try:
        wanted = [ClassifierOutputTarget(int(k)) for k in targets]
        cam(input_tensor=inputs, targets=wanted)  # forward + backward; the scaled, averaged result is not used
        store = cam.activations_and_grads
        activations = [a.cpu().numpy() for a in store.activations]
        gradients = [g.cpu().numpy() for g in store.gradients]
        if len(activations) != len(modules) or len(gradients) != len(modules):
            raise ConfigError(f"--layers: {len(modules)} layers asked, {len(activations)} activations and "
                              f"{len(gradients)} gradients seen (a layer the forward pass does not use?)")
        per_layer = []
        for module, acts, grads in zip(modules, activations, gradients):
            if acts.ndim != 4:
                raise ConfigError(f"a layer's output has shape {list(acts.shape)}; LayerCAM needs (N, C, H, W) "
                                  "feature maps (a transformer's tokens need a reshape this model does not offer)")
            per_layer.append(cam.get_cam_image(inputs, module, wanted, acts, grads, False))
        outputs = cam.outputs.detach().float().cpu().numpy()
    finally:
        cam.activations_and_grads.release()
    return [[layer[i].astype(np.float32) for layer in per_layer] for i in range(len(targets))], outputs


def scale_and_fuse(raw: list[np.ndarray], size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """(scaled maps at size x size in [0, 1], the fused map): the module docstring's rule."""
    scaled = []
    for number, layer_map in enumerate(raw):
        up = F.interpolate(torch.from_numpy(np.maximum(layer_map, 0)).float()[None, None], size=(size, size),
                           mode="bilinear", align_corners=False)[0, 0].numpy()
        peak = float(up.max())
        up = up / peak if peak > 0 else np.zeros_like(up)
        if number < len(raw) - 1:  # shallower than the deepest layer
            up = np.tanh(SHALLOW_GAMMA * up)
        scaled.append(up.astype(np.float32))
    return scaled, np.maximum.reduce(scaled).astype(np.float32)


def explain_batch(model: torch.nn.Module, inputs: torch.Tensor, layers: list[str], target: str = "predicted",
                  labels: list[int] | None = None, to_scores=None) -> list[ImageMaps]:
    """LayerCAM of a batch of model inputs. target: "predicted" (the class the model gives), "true" (labels), or a
    class index as text. to_scores(outputs) -> class probabilities (default softmax). A model with one output
    (ordinal) is explained through its one score whatever the target."""
    with torch.no_grad():
        outputs = model(inputs).float()
    scores = to_scores(outputs) if to_scores is not None else outputs.softmax(-1)
    scores = scores.cpu().numpy()
    if outputs.shape[1] == 1:
        targets = [0] * len(inputs)
    elif target == "predicted":
        targets = scores.argmax(1).tolist()
    elif target == "true":
        if labels is None or any(label is None for label in labels):
            raise ConfigError("--target true needs each image's true class (images from a shard folder's split)")
        targets = list(labels)
    else:
        targets = [int(target)] * len(inputs)
    layers = resolve_layers(model, layers)
    raw, _ = raw_maps(model, inputs, targets, layers)
    results = []
    for i, maps in enumerate(raw):
        scaled, fused = scale_and_fuse(maps, inputs.shape[-1])
        results.append(ImageMaps(list(layers), maps, scaled, fused, int(targets[i]), scores[i]))
    return results
