"""Where the Ben Graham filter runs on a batch of uint8 disc crops: the Triton kernel on CUDA, the torch reference
otherwise. Both backends call this when the filter is not done inside the data pipeline itself.
"""
from __future__ import annotations

import functools
import warnings

import torch

from tltrain import preprocess as P


TRITON_METHODS = {"auto": "auto", "triton": "auto", "triton_dot": "dot", "triton_direct": "direct"}


def use_triton(filter_kernel: str, pre: P.PreprocessConfig, device: torch.device) -> bool:
    if filter_kernel.startswith("triton") and device.type != "cuda":
        _warn_no_cuda(filter_kernel, device.type)
    return device.type == "cuda" and filter_kernel in TRITON_METHODS and pre.filter_on


@functools.lru_cache(maxsize=None)
def _warn_no_cuda(filter_kernel: str, device_type: str) -> None:
    """Once per process: an explicit Triton choice on a CPU batch runs the torch reference (same numbers)."""
    warnings.warn(f"loader.filter_kernel={filter_kernel} needs CUDA; batches on {device_type} use the torch "
                  f"reference filter instead (same numbers)", RuntimeWarning, stacklevel=3)


def finish_batch(crops: torch.Tensor, pre: P.PreprocessConfig, *, size: int, dtype: str, channels_last: bool,
                 filter_kernel: str = "auto", valid: torch.Tensor | None = None, angles=None) -> torch.Tensor:
    """(N, 3, 2R, 2R) uint8 on any device -> model input (N, 3, size, size) in dtype/layout, on the same device.

    valid: (N, 2, 2R) profiles [vy, vx] of the photo in each crop (None: all photo); angles: (N,) degrees of a
    training rotation, applied after the filter (tltrain.preprocess.rotate_batch)."""
    if valid is not None:
        valid = valid.to(crops.device)
    if not use_triton(filter_kernel, pre, crops.device):
        out = P.finish(crops, pre, dtype, channels_last, size, valid)
    else:
        from tltrain.kernels.ben_graham import ben_graham_batch

        out = ben_graham_batch(crops, pre, dtype, channels_last, method=TRITON_METHODS[filter_kernel], valid=valid)
        if out.shape[-1] != size:  # resizing is linear, so resizing after normalisation equals resizing before it
            out = P.resize_batch(out.float(), size).to(P.DTYPES[dtype])
    if angles is not None:
        out = P.rotate_batch(out, angles, pre)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out.contiguous()
