"""Triton preprocessing kernels (installed as tltrain.kernels), each with a torch reference beside it."""
