"""The fused QuickGELU against open_clip's module (on CPU under TRITON_INTERPRET=1)."""

import pytest
import torch
from open_clip.transformer import QuickGELU

from conftest import DEVICE, needs_kernel
from fastcoop.kernels.quick_gelu_kernel import quick_gelu_triton

pytestmark = needs_kernel


@pytest.mark.parametrize("shape", [(7, 33), (1,), (390, 2048)])  # 390 × 2048: the MLP of K = 100 prompts
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_open_clip_quick_gelu(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    x = (4 * torch.randn(shape, generator=gen)).to(dtype).to(DEVICE)
    g = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    outputs = []
    for fn in (quick_gelu_triton, QuickGELU()):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        outputs.append((y.detach(), *torch.autograd.grad(y, xi, g)))
    for name, a, b in zip(("y", "dx"), *outputs):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape, name
        # fp32: the same formula; bf16/fp16: the kernel rounds once, PyTorch after each of its three ops
        bound = 1e-6 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
        assert (a.float() - b.float()).abs().max() <= bound * b.float().abs().max(), name
