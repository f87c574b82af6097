"""Where the Ben Graham filter runs on a batch of uint8 disc crops: the Triton kernel on CUDA, the torch reference
otherwise. Both backends call this when the filter is not done inside the data pipeline itself.
"""
from __future__ import annotations

import torch

from tltrain import preprocess as P


def kernel_fits(pre: P.PreprocessConfig) -> bool:
    """The fused kernel hard-codes Ben Graham's constants (gain 4, offset 128, mask 0.9 R)."""
    return pre.filter_on and pre.gain == 4.0 and pre.offset == 128.0 and pre.mask_ratio == 0.9


def use_triton(filter_kernel: str, pre: P.PreprocessConfig, device: torch.device) -> bool:
    return device.type == "cuda" and filter_kernel in ("auto", "triton") and kernel_fits(pre)


def finish_batch(crops: torch.Tensor, pre: P.PreprocessConfig, *, size: int, dtype: str, channels_last: bool,
                 filter_kernel: str = "auto") -> torch.Tensor:
    """(N, 3, 2R, 2R) uint8 on any device -> model input (N, 3, size, size) in dtype/layout, on the same device."""
    if not use_triton(filter_kernel, pre, crops.device):
        return P.finish(crops, pre, dtype, channels_last, size)
    from tltrain.kernels.ben_graham import ben_graham

    n, _, side, _ = crops.shape
    centers = torch.full((n, 2), side / 2, device=crops.device, dtype=torch.float32)
    radii = torch.full((n,), side / 2, device=crops.device, dtype=torch.float32)
    nhwc = crops.permute(0, 2, 3, 1).contiguous()
    out = ben_graham(nhwc, centers, radii, side / 2 * pre.sigma_ratio, pre.mean, pre.std, P.DTYPES[dtype],
                     channels_last, None)
    if out.shape[-1] != size:  # resizing is linear, so resizing after normalisation equals resizing before it
        out = P.resize_batch(out.float(), size).to(P.DTYPES[dtype])
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out.contiguous()
