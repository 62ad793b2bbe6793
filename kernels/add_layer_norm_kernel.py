"""Residual add and layer norm fused in Triton: one read of the residual stream and the block's output, one write
of each result, instead of an add, a norm and a cast kernel (and, backward, a norm backward, a cast and the sum
of the two gradients reaching the residual stream). A transformer block has two of these per pass; at K = 100
classes the training step is bound by kernel count, not bytes (benchmarks/CHANGELOG.md).

Forward, per row: h = x + delta; y = (h − mean)·rstd·w + b, statistics in fp32. Without delta (the first
block's norm, which follows the embedding) h is x itself: the norm alone, its output cast, its backward adding
the stream's other gradient — one launch each way instead of three.
Backward, per row, with x̂ = (h − mean)·rstd and g = w·dy:
    dh = dh_later + rstd·(g − mean(g) − x̂·mean(g·x̂));  dx = ddelta = dh
where dh_later is the gradient h itself receives from where the stream goes on. The norm's weight and bias are
frozen here (CoOp learns only the context): the wrapper refuses weights that require grad.
"""

import torch
import triton
import triton.language as tl

from fastcoop.kernels.triton_common import launch_kernel


@triton.jit(do_not_specialize=["N"])
def _add_layer_norm_forward(X, DELTA, W, B, H, Y, MEAN, RSTD, N, D, eps, HAS_DELTA: tl.constexpr,
                            BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < N, cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    offsets = rows[:, None] * D + cols[None, :]
    h = tl.load(X + offsets, mask=mask, other=0.0)
    if HAS_DELTA:
        h = h.to(tl.float32) + tl.load(DELTA + offsets, mask=mask, other=0.0).to(tl.float32)
        h = h.to(H.dtype.element_ty)  # the stream is stored, and normalised, in its own dtype (as x + delta is)
        tl.store(H + offsets, h, mask=mask)
    h = h.to(tl.float32)
    mean = tl.sum(h, 1) / D
    centered = tl.where(mask, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, 1) / D + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = centered * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit(do_not_specialize=["N"])
def _add_layer_norm_backward(H, W, MEAN, RSTD, DY, DH_LATER, DX, DDELTA, N, D, HAS_DELTA: tl.constexpr,
                             HAS_DH_LATER: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < N, cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    offsets = rows[:, None] * D + cols[None, :]
    mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    x_hat = (tl.load(H + offsets, mask=mask, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None]
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    g = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32) * w[None, :]
    g_mean = tl.sum(g, 1) / D
    g_x_hat_mean = tl.sum(g * x_hat, 1) / D
    dh = rstd[:, None] * (g - g_mean[:, None] - x_hat * g_x_hat_mean[:, None])
    if HAS_DH_LATER:
        dh += tl.load(DH_LATER + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + offsets, dh.to(DX.dtype.element_ty), mask=mask)
    if HAS_DELTA:
        tl.store(DDELTA + offsets, dh.to(DDELTA.dtype.element_ty), mask=mask)


def _launch(D: int, N: int) -> tuple[dict, tuple]:
    """A program per few rows (a whole row in one tile: D ≤ a few thousand), about 2K elements per program: at
    K = 100 the packed text is only ~400 rows, and more, smaller programs finish sooner."""
    block_d = triton.next_power_of_2(D)
    block_rows = max(1, min(16, 2048 // block_d))
    return dict(BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=4 if block_d <= 1024 else 8), \
        (triton.cdiv(N, block_rows),)


class AddLayerNorm(torch.autograd.Function):
    """Autograd wrapper: (h, y) from (x, delta); gradients for x and delta (the norm's parameters are frozen).
    delta None: h is x (a view of it), y its norm."""

    @staticmethod
    def forward(ctx, x, delta, weight, bias, eps, out_dtype):
        D = x.shape[-1]
        x2 = x.reshape(-1, D).contiguous()
        N = len(x2)
        h = x2 if delta is None else torch.empty_like(x2)
        y = torch.empty(N, D, device=x.device, dtype=out_dtype)
        mean, rstd = torch.empty(2, N, device=x.device, dtype=torch.float32)
        tiles, grid = _launch(D, N)
        launch_kernel(_add_layer_norm_forward, grid, x2, x2 if delta is None else delta.reshape(-1, D).contiguous(),
                      weight, bias, h, y, mean, rstd, N, D, eps, HAS_DELTA=delta is not None, **tiles)
        ctx.save_for_backward(h, weight, mean, rstd)
        ctx.shape, ctx.delta_dtype = x.shape, None if delta is None else delta.dtype
        ctx.set_materialize_grads(False)  # an unused h (after the final norm) then costs no zero-filled gradient
        return h.view(x.shape), y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_h, grad_y):
        h, weight, mean, rstd = ctx.saved_tensors
        N, D = h.shape
        dy = grad_y.reshape(-1, D).contiguous() if grad_y is not None else torch.zeros_like(h)
        dh_later = grad_h.reshape(-1, D).contiguous() if grad_h is not None else dy  # unread without grad_h
        dx = torch.empty_like(h)
        has_delta = ctx.delta_dtype is not None
        ddelta = torch.empty(N, D, device=h.device, dtype=ctx.delta_dtype) if has_delta else None
        tiles, grid = _launch(D, N)
        launch_kernel(_add_layer_norm_backward, grid, h, weight, mean, rstd, dy, dh_later, dx,
                      ddelta if has_delta else dx, N, D, HAS_DELTA=has_delta, HAS_DH_LATER=grad_h is not None, **tiles)
        return dx.view(ctx.shape), ddelta.view(ctx.shape) if has_delta else None, None, None, None, None


def supports(norm: torch.nn.Module) -> bool:
    """A plain layer norm over the last dimension, with a bias, its parameters frozen."""
    return (isinstance(norm, torch.nn.LayerNorm) and len(norm.normalized_shape) == 1 and norm.bias is not None
            and not norm.weight.requires_grad and not norm.bias.requires_grad)


def add_layer_norm_triton(x: torch.Tensor, delta: torch.Tensor | None, norm: torch.nn.LayerNorm,
                          out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as add_layer_norm_reference, for a norm whose weight and bias are frozen."""
    if not supports(norm) or (delta is not None and delta.shape != x.shape):
        raise ValueError("add_layer_norm_triton needs x and delta of one shape and a frozen 1-D layer norm with a "
                         "bias (it computes no gradient for the norm's weight and bias)")
    return AddLayerNorm.apply(x, delta, norm.weight, norm.bias, norm.eps, out_dtype)
