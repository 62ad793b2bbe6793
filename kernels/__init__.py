"""Triton kernels, each with a plain-PyTorch reference beside it and an autograd wrapper.

cosine_ce: fused cosine-logit cross-entropy (cosine_ce.py; reference cosine_ce_reference.py). It runs the Triton
kernel on CUDA tensors (and on CPU tensors under TRITON_INTERPRET=1, for tests), elsewhere the reference.
prefix attention: packed class tokens over a shared prefix (prefix_attention.py; reference
prefix_attention_reference.py; FlexAttention variant prefix_attention_flex.py), chosen by FastTextEncoder.
"""

from fastcoop.kernels.cosine_ce_reference import cosine_ce_reference, cosine_logits

try:
    from fastcoop.kernels.cosine_ce import cosine_ce_triton
    from fastcoop.kernels.triton_common import INTERPRET
except ImportError:  # no Triton on this platform
    cosine_ce_triton, INTERPRET = None, False


def cosine_ce(image_features, text_features, logit_scale, labels, reduction="mean", return_argmax=False):
    """Cross-entropy of logit_scale · cos(image, text) (B × K logits never materialised by the kernel).

    image_features B × D, text_features K × D (bf16, fp16 or fp32), logit_scale a scalar (already exp'd),
    labels B int64 in [0, K). Returns the loss (and each row's argmax with return_argmax)."""
    if cosine_ce_triton is not None and (image_features.is_cuda or INTERPRET):
        return cosine_ce_triton(image_features, text_features, logit_scale, labels, reduction, return_argmax)
    return cosine_ce_reference(image_features, text_features, logit_scale, labels, reduction, return_argmax)


__all__ = ["cosine_ce", "cosine_ce_reference", "cosine_ce_triton", "cosine_logits"]
