"""Triton kernels, each with a plain-PyTorch reference beside it and an autograd wrapper.

cosine_ce: fused cosine-logit cross-entropy (cosine_ce_kernel.py; reference cosine_ce_reference.py), and
cosine_ce_runs, the same over stacked runs with each run's mean loss and hits. They run the
Triton kernel on CUDA tensors (and on CPU tensors under TRITON_INTERPRET=1, for tests), elsewhere the reference.
prefix attention: the fast text path's packed rows — the shared prefix, then each class's tokens — attending
within themselves and to the prefix (prefix_attention_kernel.py; reference prefix_attention_reference.py;
FlexAttention variant prefix_attention_flex.py), chosen by FastTextEncoder.
add layer norm: a block's residual add and the layer norm after it (add_layer_norm_kernel.py; reference
add_layer_norm_reference.py), and QuickGELU (quick_gelu_kernel.py; reference: open_clip's module), used by
FastTextEncoder on GPU. mlp_kernel.py: a text block's MLP with its activation inside the matrix products
(reference: open_clip's module), FastTextEncoder's opt-in `mlp` implementation.
Only the dispatcher, and for a process's first launches hash_triton_in_background and compiling_in_parallel, are
exported here; import the rest from its module.
"""

import contextlib
import threading

import torch

from fastcoop.kernels import cosine_ce_reference as reference

try:
    from fastcoop.kernels import cosine_ce_kernel as kernel
    from fastcoop.kernels.triton_common import INTERPRET, compiling_in_parallel
except ImportError:  # no Triton on this platform: nothing to compile
    kernel, INTERPRET, compiling_in_parallel = None, False, lambda device: contextlib.nullcontext()
TRITON = kernel is not None  # the kernels import (fastcoop.backends decides where they run)


def triton_runs_on(device) -> bool:
    """Whether Triton kernels run on `device`: a CUDA GPU, or the CPU under TRITON_INTERPRET=1."""
    return TRITON and (torch.device(device).type == "cuda" or INTERPRET)


def cosine_ce(image_features, text_features, logit_scale, labels, reduction="mean", return_argmax=False,
              backend: str | None = None):
    """Cross-entropy of logit_scale · cos(image, text) (B × K logits never materialised by the kernel).

    image_features B × D, text_features K × D (bf16, fp16 or fp32), logit_scale a scalar (already exp'd),
    labels B int64 in [0, K). Returns the loss (and each row's argmax with return_argmax). backend: "triton" or
    "reference"; None: the kernel wherever Triton runs (fastcoop.backends' choice too)."""
    if backend is None:
        backend = "triton" if triton_runs_on(image_features.device) else "reference"
    if backend == "triton":
        return kernel.cosine_ce_triton(image_features, text_features, logit_scale, labels, reduction, return_argmax)
    return reference.cosine_ce_reference(image_features, text_features, logit_scale, labels, reduction,
                                         return_argmax)


def cosine_ce_runs(image_features, text_features, logit_scale, labels, sizes, backend: str | None = None):
    """cosine_ce of stacked runs in one call: image_features R × B × D and labels R × B (run r's first sizes[r]
    rows; the rest padding, never read), text_features R × K × D. Returns each run's mean loss (R, fp32) and hits
    (R, int64: rows whose argmax is the label). The kernel computes each run exactly as it would alone."""
    if backend is None:
        backend = "triton" if triton_runs_on(image_features.device) else "reference"
    if backend == "triton":
        return kernel.cosine_ce_runs_triton(image_features, text_features, logit_scale, labels, sizes)
    return reference.cosine_ce_runs_reference(image_features, text_features, logit_scale, labels, sizes)


def hash_triton_in_background(device: str) -> threading.Thread | None:
    """Triton keys its kernel cache with a hash of its own compiler, its ~0.5 GB shared library included, made at
    a process's first kernel launch even when every kernel is cached (~0.35 s on a 2-core CPU). A thread that
    makes it now, while the model loads, hides that (reading and hashing release the GIL), and the launch finds
    it made. Only for CUDA devices; None where Triton is missing or keeps that hash elsewhere."""
    if not device.startswith("cuda"):
        return None
    try:
        from triton.runtime.cache import triton_key
    except ImportError:
        return None
    thread = threading.Thread(target=triton_key, name="triton-cache-key", daemon=True)
    thread.start()
    return thread


__all__ = ["INTERPRET", "TRITON", "compiling_in_parallel", "cosine_ce", "hash_triton_in_background",
           "triton_runs_on"]
