"""QuickGELU, x·σ(1.702·x) — the activation OpenAI's CLIP weights (CoOp's) were trained with — as one Triton
kernel each way. PyTorch runs it as three kernels forward (scale, sigmoid, product) and about five backward; in
the text blocks' MLP that is ~70 launches per training step, and the step is bound by launches at K = 100.

Forward in fp32 from the input's dtype, rounded once to it; backward dx = g·(s + 1.702·x·s·(1 − s)),
s = σ(1.702·x).
The reference is open_clip's own QuickGELU module.
"""

import torch
import triton
import triton.language as tl

from fastcoop.kernels.triton_common import activation, activation_derivative, launch_kernel

BLOCK = 1024


@triton.jit(do_not_specialize=["N"])
def _quick_gelu_forward(X, Y, N, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < N
    x = tl.load(X + offsets, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + offsets, activation(x, QUICK=True).to(Y.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["N"])
def _quick_gelu_backward(X, DY, DX, N, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < N
    x = tl.load(X + offsets, mask=ok, other=0.0).to(tl.float32)
    dx = tl.load(DY + offsets, mask=ok, other=0.0).to(tl.float32) * activation_derivative(x, QUICK=True)
    tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=ok)


class QuickGELUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        y = torch.empty_like(x)
        launch_kernel(_quick_gelu_forward, (triton.cdiv(x.numel(), BLOCK),), x, y, x.numel(), BLOCK=BLOCK)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, = ctx.saved_tensors
        dx = torch.empty_like(x)
        launch_kernel(_quick_gelu_backward, (triton.cdiv(x.numel(), BLOCK),), x, grad_y.contiguous(), dx, x.numel(),
                      BLOCK=BLOCK)
        return dx


def quick_gelu_triton(x: torch.Tensor) -> torch.Tensor:
    """x·σ(1.702·x), elementwise, in x's dtype."""
    return QuickGELUFunction.apply(x)
