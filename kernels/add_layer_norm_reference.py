"""Residual add then layer norm, in plain PyTorch: what a transformer block computes between its GEMMs.

h = x + delta (x itself without delta); y = layer_norm(h) in fp32, handed on in out_dtype (the autocast dtype the
next GEMM casts to).
The oracle for add_layer_norm_kernel.py, and the path wherever that kernel does not run.
"""

import torch


def add_layer_norm_reference(x: torch.Tensor, delta: torch.Tensor | None, norm: torch.nn.Module,
                             out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y): the new residual stream (x's dtype) and norm(h) in out_dtype (norm: the block's own module)."""
    h = x if delta is None else x + delta
    return h, norm(h.float()).to(out_dtype)
