"""Triton preprocessing kernels (installed as tltrain.kernels), each with a torch reference beside it.

- ben_graham: the fused Ben Graham filter (ben_graham_triton, ben_graham_batch); reference tltrain.preprocess.finish
  - blur_dot: one pass, the Gaussian as banded matrix products on the tensor cores (hi/lo fp16 splits)
  - blur_direct: two passes of exact float32 taps (any window; the fallback)
  - epilogue: what both share after the blur (gain, rounding, mask, normalisation, flip, store)

Nothing is imported here on purpose: importing triton decides once whether kernels run compiled or under
TRITON_INTERPRET, so callers (and the CPU tests) choose that moment by importing the submodule.
"""
