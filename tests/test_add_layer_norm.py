"""The fused residual-add + layer norm against its plain-PyTorch reference (on CPU under TRITON_INTERPRET=1)."""

import pytest
import torch

from conftest import DEVICE, needs_kernel
from fastcoop.kernels.add_layer_norm_kernel import add_layer_norm_triton
from fastcoop.kernels.add_layer_norm_reference import add_layer_norm_reference

pytestmark = needs_kernel


def frozen_norm(D: int, seed: int = 0) -> torch.nn.LayerNorm:
    gen = torch.Generator().manual_seed(seed)
    norm = torch.nn.LayerNorm(D).requires_grad_(False)
    norm.weight.copy_(torch.randn(D, generator=gen))
    norm.bias.copy_(torch.randn(D, generator=gen))
    return norm.to(DEVICE)


def outputs_and_grads(fn, x, delta, norm, out_dtype, use_h=True):
    """h, y and the gradients of a loss that reads every element of y (and of h, unless use_h is False)."""
    x, delta = x.clone().requires_grad_(), delta.clone().requires_grad_()
    h, y = fn(x, delta, norm, out_dtype)
    loss = (y.float() * torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y)).sum()
    if use_h:
        loss = loss + (h.float() * torch.linspace(2, 0, h.numel(), device=DEVICE).view_as(h)).sum()
    return [h.detach(), y.detach(), *torch.autograd.grad(loss, [x, delta])]


def assert_matches(shape, x_dtype, delta_dtype, out_dtype, use_h=True, tolerance=1e-5):
    gen = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(shape, generator=gen) + 1).to(x_dtype).to(DEVICE)
    delta = torch.randn(shape, generator=gen).to(delta_dtype).to(DEVICE)
    norm = frozen_norm(shape[-1])
    fused = outputs_and_grads(add_layer_norm_triton, x, delta, norm, out_dtype, use_h)
    reference = outputs_and_grads(add_layer_norm_reference, x, delta, norm, out_dtype, use_h)
    for name, a, b in zip(("h", "y", "dx", "ddelta"), fused, reference):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        # y in bf16/fp16: both round the same fp32 value up to summation order, so at most a rounding step apart
        bound = tolerance if a.dtype == torch.float32 else 2 * torch.finfo(a.dtype).eps
        assert (a.float() - b.float()).abs().max() <= bound * b.float().abs().max(), name


@pytest.mark.parametrize("shape", [(37, 96), (1, 64), (300, 512), (5, 3, 1280)])  # quick: several rows
def test_fp32_matches_reference(shape):
    assert_matches(shape, torch.float32, torch.float32, torch.float32)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_fp32_stream_low_precision_branch_and_output(low):
    """As under autocast: the residual stream in fp32, the block's output and the next GEMM's input in bf16/fp16."""
    assert_matches((70, 512), torch.float32, low, low)


def test_low_precision_stream():
    assert_matches((33, 96), torch.bfloat16, torch.bfloat16, torch.bfloat16)


def test_unused_stream_gradient():
    """After the final norm only y is read: h gets no gradient and the backward must not read one."""
    assert_matches((20, 96), torch.float32, torch.bfloat16, torch.float32, use_h=False)


def test_refuses_a_trainable_norm():
    norm = torch.nn.LayerNorm(8).to(DEVICE)
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="computes no gradient for the norm"):
        add_layer_norm_triton(x, x, norm, torch.float32)


@pytest.mark.parametrize("use_h", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_norm_alone(out_dtype, use_h):
    """Without delta (the first block's norm): h is x, y its norm; x's gradient sums what reaches it through y and
    through h."""
    gen = torch.Generator().manual_seed(2)
    x0 = (3 * torch.randn(45, 96, generator=gen) + 1).to(DEVICE)
    norm = frozen_norm(96)
    results = []
    for fn in (add_layer_norm_triton, add_layer_norm_reference):
        x = x0.clone().requires_grad_()
        h, y = fn(x, None, norm, out_dtype)
        loss = (y.float() * torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y)).sum()
        if use_h:
            loss = loss + (h * torch.linspace(2, 0, h.numel(), device=DEVICE).view_as(h)).sum()
        assert torch.equal(h.detach(), x0)
        results.append([y.detach(), *torch.autograd.grad(loss, [x])])
    (y, dx), (y_ref, dx_ref) = results
    assert y.dtype == y_ref.dtype == out_dtype
    bound = 1e-5 if out_dtype == torch.float32 else 2 * torch.finfo(out_dtype).eps
    assert (y.float() - y_ref.float()).abs().max() <= bound * y_ref.float().abs().max()
    assert (dx - dx_ref).abs().max() <= 1e-5 * dx_ref.abs().max()
