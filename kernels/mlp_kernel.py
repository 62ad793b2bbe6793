"""A text block's MLP, c_proj(act(c_fc(y))), with the activation inside two Triton matrix products: the forward
c_fc product writes the pre-activation (for the backward) and the activation together, and the backward product
that gives the activation's output gradient multiplies in the activation's derivative before writing. Unfused,
each of those is a separate pass over the T × 4D hidden rows each way, bound by memory bandwidth, and 24 launches
per step; the other two products stay with cuBLAS. For frozen weights only: the
backward gives the input's gradient and nothing else.

Rounding as unfused under autocast: the pre-activation (product + bias in fp32) is rounded to the input's dtype
once, the activation computed in fp32 from that and rounded; in the backward the product is rounded before the
derivative, computed in fp32, multiplies it. Exact GELU (erf) and QuickGELU, x·σ(1.702·x). The reference is
open_clip's own MLP module.
"""

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastcoop.kernels.triton_common import (INTERPRET, activation, activation_derivative, dot_precision,
                                            launch_kernel, mma, multiprocessors)


@triton.jit
def _product(A, B, rows, cols, M, N, K, stride_bk, stride_bn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """A[rows] @ B[:, cols] as an fp32 tile; A is M × K, contiguous; B is K × N with the given strides."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_ok, col_ok = rows < M, cols < N
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(A + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(B + ks[:, None] * stride_bk + cols[None, :] * stride_bn, mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc = mma(a, b, acc, PRECISION, UPCAST)
    return acc


@triton.jit(do_not_specialize=["M"])
def _linear_activation_forward(Y, W, BIAS, H, G, M, HIDDEN, WIDTH, HAS_BIAS: tl.constexpr, QUICK: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """H = Y @ Wᵀ + bias (Y is M × WIDTH; W is HIDDEN × WIDTH, as nn.Linear stores it) and G = act(H), both in
    Y's dtype."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _product(Y, W, rows, cols, M, HIDDEN, WIDTH, 1, WIDTH, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=cols < HIDDEN, other=0.0).to(tl.float32)[None, :]
    h = acc.to(H.dtype.element_ty)
    g = activation(h.to(tl.float32), QUICK)
    out = rows[:, None] * HIDDEN + cols[None, :]
    ok = (rows < M)[:, None] & (cols < HIDDEN)[None, :]
    tl.store(H + out, h, mask=ok)
    tl.store(G + out, g.to(G.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["M"])
def _activation_input_grad(DOUT, W, H, DH, M, HIDDEN, WIDTH, QUICK: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                           UPCAST: tl.constexpr):
    """DH = (DOUT @ W) ⊙ act'(H): DOUT is M × WIDTH (the gradient of c_proj's output), W is c_proj's
    WIDTH × HIDDEN weight, H the saved M × HIDDEN pre-activation."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _product(DOUT, W, rows, cols, M, HIDDEN, WIDTH, HIDDEN, 1, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
    dg = acc.to(DH.dtype.element_ty).to(tl.float32)  # rounded, as the unfused product's output is
    out = rows[:, None] * HIDDEN + cols[None, :]
    ok = (rows < M)[:, None] & (cols < HIDDEN)[None, :]
    h = tl.load(H + out, mask=ok, other=0.0).to(tl.float32)
    tl.store(DH + out, (dg * activation_derivative(h, QUICK)).to(DH.dtype.element_ty), mask=ok)


def _tiles(M: int, N: int, device: torch.device) -> dict:
    """128 × 128 tiles (8 warps) when they fill the GPU, else 64-row tiles, then 64 × 64, so small T (K = 100:
    ~380 rows) still gives every multiprocessor a program. 64 rows is the least Hopper's wgmma takes."""
    for block_m, block_n, warps in ((128, 128, 8), (64, 128, 4), (64, 64, 4)):
        if triton.cdiv(M, block_m) * triton.cdiv(N, block_n) >= multiprocessors(device):
            break
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64, num_warps=warps, num_stages=3)


class FusedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, w1, b1, w2, b2, quick: bool):
        y = y.contiguous()
        (M, K), N = y.shape, w1.shape[0]
        h = torch.empty(M, N, device=y.device, dtype=y.dtype)
        g = torch.empty_like(h)
        tiles = _tiles(M, N, y.device)
        grid = (triton.cdiv(M, tiles["BLOCK_M"]), triton.cdiv(N, tiles["BLOCK_N"]))
        launch_kernel(_linear_activation_forward, grid, y, w1, b1 if b1 is not None else y, h, g, M, N, K,
                      HAS_BIAS=b1 is not None, QUICK=quick, PRECISION=dot_precision(y.dtype), UPCAST=INTERPRET, **tiles)
        ctx.save_for_backward(h, w1, w2)
        ctx.quick = quick
        return F.linear(g, w2, b2)

    @staticmethod
    def backward(ctx, grad_out):
        h, w1, w2 = ctx.saved_tensors
        (M, N), K = h.shape, w2.shape[0]
        dh = torch.empty_like(h)
        tiles = _tiles(M, N, h.device)
        grid = (triton.cdiv(M, tiles["BLOCK_M"]), triton.cdiv(N, tiles["BLOCK_N"]))
        launch_kernel(_activation_input_grad, grid, grad_out.to(h.dtype).contiguous(), w2, h, dh, M, N, K,
                      QUICK=ctx.quick, PRECISION=dot_precision(h.dtype), UPCAST=INTERPRET, **tiles)
        return dh @ w1, None, None, None, None, None


@functools.cache  # per module: asked at every call of mlp_triton
def _is_quick_gelu(act: torch.nn.Module) -> bool:
    """QuickGELU (OpenAI's activation, x·σ(1.702·x)), recognised by what it computes: a module without parameters
    whose output on a probe equals it (so this package needs no model library)."""
    if any(True for _ in act.parameters()) or isinstance(act, torch.nn.GELU):
        return False
    probe = torch.linspace(-4, 4, 17)
    with torch.no_grad():
        return torch.equal(act(probe.clone()), probe * torch.sigmoid(1.702 * probe))


def supports(mlp: torch.nn.Module) -> bool:
    """open_clip's plain MLP (c_fc, exact GELU or QuickGELU, c_proj) with frozen weights of one dtype."""
    if list(dict(mlp.named_children())) != ["c_fc", "gelu", "c_proj"]:
        return False
    act = mlp.gelu
    exact_gelu = type(act) is torch.nn.GELU and act.approximate == "none"
    frozen = not any(p.requires_grad for p in mlp.parameters())
    return (exact_gelu or _is_quick_gelu(act)) and frozen and mlp.c_fc.weight.dtype == mlp.c_proj.weight.dtype


def mlp_triton(mlp: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
    """mlp(y) for a module that supports() accepts; y (T × D) in the weights' dtype, as FastTextEncoder holds
    them under autocast."""
    if y.dtype != mlp.c_fc.weight.dtype:
        raise ValueError(f"mlp_triton takes its input in the weights' dtype ({mlp.c_fc.weight.dtype}), not {y.dtype}")
    return FusedMLP.apply(y, mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias,
                          _is_quick_gelu(mlp.gelu))
