"""The fused prefix attention (Triton) against its plain-PyTorch reference, forward and backward."""

import pytest
import torch

from fastcoop import kernels
from fastcoop.kernels.prefix_attention_kernel import prefix_attention_triton
from fastcoop.kernels.prefix_attention_reference import PackedLayout, prefix_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not kernels.INTERPRET,
                                reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("lengths, P, H, dh", [
    ([3, 1, 6, 2, 5], 7, 2, 32),     # prefix (unified context, class at the end)
    ([4, 9, 1], 0, 3, 32),           # no prefix (class-specific context, or class in front)
    ([1] * 6, 17, 8, 64),            # ViT-B text heads, one-token classes, M = 16 prefix
    ([20, 2, 13, 17], 5, 2, 48),     # long class names, a head size that is not a power of two
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(lengths, P, H, dh, dtype):
    gen = torch.Generator().manual_seed(len(lengths) + P)
    layout = PackedLayout.of(torch.tensor(lengths), DEVICE)
    N = sum(lengths)
    inputs = [torch.randn(N, H, dh, generator=gen) for _ in range(3)]
    inputs += [torch.randn(P, H, dh, generator=gen) for _ in range(2)] if P else []
    upstream = torch.randn(N, H, dh, generator=gen).to(DEVICE)
    results = []
    for fn, run_dtype in ((prefix_attention_triton, dtype), (prefix_attention_reference, torch.float32)):
        leaves = [t.to(DEVICE, run_dtype).requires_grad_() for t in inputs]
        q, k, v, kp, vp = leaves + [None, None] if not P else leaves
        out = fn(q, k, v, kp, vp, layout)
        grads = torch.autograd.grad((out.float() * upstream).sum(), leaves)
        results.append((out, grads))
    (out, grads), (ref, ref_grads) = results
    assert out.dtype == dtype and out.shape == ref.shape
    assert relative(out, ref) <= TOLERANCE[dtype]
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype and relative(g, r) <= TOLERANCE[dtype]
