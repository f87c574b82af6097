"""Loading a package: the model with its weights (load_pretrained), its preprocessing as a callable, and what the
model's outputs mean as class probabilities. Every package is opened through package_format.open_package first."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tltrain.errors import DataError
from tltrain.export.package_format import CHECKSUMS, open_package
from tltrain.models import describe_mismatch, input_size_args, load_weights, read_state_dict
from tltrain.preprocess import FILTER_VERSION


@dataclass
class Preprocessing:
    """The package's preprocessing as a callable: PIL image (as opened: EXIF orientation, 16-bit, alpha and
    palette are handled by tltrain.data.decode, as in prepare and the loaders) or a decoded (H, W, 3) uint8 RGB
    array -> (3, S, S) float tensor. The disc is located as `prepare` locates it (tltrain.data.disc.locate_disc)."""

    size: int
    config: dict

    def __call__(self, image, source: str = "image") -> torch.Tensor:
        return self.with_crop(image, source)[0]

    def with_crop(self, image, source: str = "image") -> tuple[torch.Tensor, np.ndarray, tuple[int, int, int]]:
        """(the model input, the decoded photo as an (H, W, 3) array, the square (x0, y0, side) cropped from it):
        what tltrain explain needs to lay a map back on the photo, from one decode and one disc search."""
        from tltrain import preprocess as P
        from tltrain.data.decode import to_rgb
        from tltrain.data.disc import locate_disc_fit

        if hasattr(image, "convert"):
            image.load()
            array = np.array(to_rgb(image, source))
        else:
            array = np.array(image)
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
                raise DataError(f"{source}: arrays must be decoded (H, W, 3) uint8 RGB, got {array.dtype} "
                                f"{array.shape} (pass the PIL image instead)")
        cfg = self.preprocess_config()
        fit = locate_disc_fit(array)
        if cfg.crop_to_disc and fit.problem:
            raise DataError(f"{source}: no fundus disc found ({fit.problem})")
        box = P.disc_box(fit.disc, array.shape[1], array.shape[0], cfg.crop_to_disc)
        return P.reference([torch.from_numpy(array)], [fit.disc], self.size, cfg)[0], array, box

    def preprocess_config(self):
        from tltrain.preprocess import PreprocessConfig

        fields = PreprocessConfig.__dataclass_fields__
        if self.config.get("filter_version", 1) != FILTER_VERSION:  # packages before it was recorded: version 1
            warnings.warn(f"package preprocessing is filter version {self.config.get('filter_version', 1)}; this "
                          f"tltrain applies version {FILTER_VERSION} (differs near photo edges)", RuntimeWarning)
        return PreprocessConfig(**{k: v for k, v in self.config.items() if k in fields})


def load_pretrained(path: str | Path, device: str = "cpu", num_classes: int | None = None,
                    digest: str | None = None):
    """(model in eval mode, Preprocessing). num_classes differing from the package's gives a fresh head.

    digest: the package digest its publisher announced; a package whose SHA256SUMS hashes to another value is
    refused. The model carries the digest it was loaded from as `model.tltrain_package_digest`."""
    import timm

    path = Path(path)
    meta, weights, found = open_package(path)
    if digest is not None and found != digest.strip().lower():
        raise DataError(f"{path}: package digest {found or '(no ' + CHECKSUMS + ')'} is not the expected {digest}")
    arch = meta["architecture"]
    outputs = num_classes or meta["num_outputs"]
    model = timm.create_model(arch, pretrained=False, num_classes=outputs,
                              **input_size_args(arch, meta["preprocessing"]["size"]))
    if outputs == meta["num_outputs"]:
        state = read_state_dict(weights)  # safetensors; any other file only weights-only (a package is data)
        problem = describe_mismatch(state, model.state_dict())
        if problem:  # one line with the first mismatched keys and shapes, not torch's multi-line message
            raise DataError(f"{weights}: weights do not fit {arch} with {outputs} outputs: {problem}")
        model.load_state_dict(state)
        model.tltrain_load_report = None
    else:
        model.tltrain_load_report = load_weights(model, weights)
    model.tltrain_package_digest = found
    return model.to(device).eval(), Preprocessing(meta["preprocessing"]["size"], meta["preprocessing"])


def class_probabilities(outputs: torch.Tensor, meta: dict) -> torch.Tensor:
    """The model's outputs as class probabilities on the CPU: softmax, or the ordinal thresholds of the package."""
    from tltrain.engine.losses import outputs_to_probs

    if meta.get("loss") == "ordinal":
        thresholds = np.asarray(meta.get("thresholds") or np.arange(meta["num_classes"] - 1) + 0.5)
        return outputs_to_probs(outputs.float().cpu(), "ordinal", meta["num_classes"], thresholds)
    return outputs.float().softmax(-1).cpu()
