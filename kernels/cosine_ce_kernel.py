"""Fused cosine-logit cross-entropy in Triton: normalise, scale · cos, softmax CE, and its backward, in one pass
over blocks of the B × K logits that are never written to memory.

With x̂ = x·rx, ŵ = w·rw (rx, rw the inverse norms), cos = x̂·ŵ, logits = s·cos, p = softmax(logits):
    forward:  loss_i = logsumexp_j(s·cos_ij) − s·cos_{i,y_i}   (online logsumexp over K blocks) and argmax_j
    backward: with c_ij = dL/dcos_ij = s·g_i·(p_ij − [j = y_i]),
              dx_i = rx_i (Σ_j c_ij ŵ_j − (Σ_j c_ij cos_ij) x̂_i)
              dw_j = rw_j (Σ_i c_ij x̂_i − (Σ_i c_ij cos_ij) ŵ_j)
              ds   = Σ_ij g_i (p_ij − [j = y_i]) cos_ij
The dot products run on the raw inputs (tensor cores for bf16/fp16) with fp32 accumulation; the inverse norms are
applied to the fp32 results. Backward programs own a (rows, feature-chunk) tile and recompute the logits tiles.
"""

import torch
import triton
import triton.language as tl

from fastcoop.kernels.triton_common import INTERPRET, mma, target_programs


@triton.jit
def _cos_tile(X, W, rows, cols, row_ok, col_ok, rx, rw, D, stride_x, stride_w,
              BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """cos(x_rows, w_cols) as a BLOCK_B × BLOCK_K fp32 tile: raw dot products over D, then the inverse norms."""
    acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        x = tl.load(X + rows[:, None] * stride_x + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(W + cols[:, None] * stride_w + ds[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = mma(x, tl.trans(w), acc, PRECISION, UPCAST)
    return acc * rx[:, None] * rw[None, :]


@triton.jit
def _cosine_ce_forward(X, W, RX, RW, Y, SCALE, LOSS, LSE, ARGMAX, B, K, D, stride_x, stride_w,
                       BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rx = tl.load(RX + rows, mask=row_ok, other=0.0)
    y = tl.load(Y + rows, mask=row_ok, other=0)
    scale = tl.load(SCALE).to(tl.float32)
    running_max = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_B], dtype=tl.float32)
    target = tl.zeros([BLOCK_B], dtype=tl.float32)
    best = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    best_index = tl.zeros([BLOCK_B], dtype=tl.int64)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        rw = tl.load(RW + cols, mask=col_ok, other=0.0)
        cos = _cos_tile(X, W, rows, cols, row_ok, col_ok, rx, rw, D, stride_x, stride_w,
                        BLOCK_B, BLOCK_K, BLOCK_D, PRECISION, UPCAST)
        logits = tl.where(col_ok[None, :], scale * cos, float("-inf"))
        block_max, block_arg = tl.max(logits, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = block_max > best  # strict: ties keep the earlier block, as torch.argmax keeps the first index
        best_index = tl.where(better, block_arg.to(tl.int64) + k0, best_index)
        best = tl.where(better, block_max, best)
        new_max = tl.maximum(running_max, block_max)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), 1)
        running_max = new_max
        target += tl.sum(tl.where(cols[None, :] == y[:, None], logits, 0.0), 1)
    lse = running_max + tl.log(running_sum)
    tl.store(LOSS + rows, lse - target, mask=row_ok)
    tl.store(LSE + rows, lse, mask=row_ok)
    tl.store(ARGMAX + rows, best_index, mask=row_ok)


@triton.jit
def _dcos_tile(X, W, rows, cols, row_ok, col_ok, rx, rw, y, g, lse, scale, D, stride_x, stride_w,
               BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The cos tile and dL/dlogits for it (zero outside the valid rows and columns)."""
    cos = _cos_tile(X, W, rows, cols, row_ok, col_ok, rx, rw, D, stride_x, stride_w,
                    BLOCK_B, BLOCK_K, BLOCK_D, PRECISION, UPCAST)
    p = tl.exp(scale * cos - lse[:, None])
    dlogits = g[:, None] * (p - tl.where(cols[None, :] == y[:, None], 1.0, 0.0))
    dlogits = tl.where(row_ok[:, None] & col_ok[None, :], dlogits, 0.0)
    return cos, dlogits


@triton.jit
def _row_stats(RX, Y, G, LSE, rows, row_ok):
    """Per-row inputs of the backward: inverse norm, label, upstream gradient, log-sum-exp."""
    rx = tl.load(RX + rows, mask=row_ok, other=0.0)
    y = tl.load(Y + rows, mask=row_ok, other=0)
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    return rx, y, g, lse


@triton.jit
def _cosine_ce_grad_x(X, W, RX, RW, Y, SCALE, LSE, G, DX, DSCALE, B, K, D, stride_x, stride_w,
                      BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dx for BLOCK_B rows × BLOCK_DC features, and (from the first feature chunk) each row's ds term."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    dc = tl.program_id(1) * BLOCK_DC + tl.arange(0, BLOCK_DC)
    row_ok, dc_ok = rows < B, dc < D
    rx, y, g, lse = _row_stats(RX, Y, G, LSE, rows, row_ok)
    scale = tl.load(SCALE).to(tl.float32)
    acc = tl.zeros([BLOCK_B, BLOCK_DC], dtype=tl.float32)
    dcos_cos = tl.zeros([BLOCK_B], dtype=tl.float32)
    dscale = tl.zeros([BLOCK_B], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        rw = tl.load(RW + cols, mask=col_ok, other=0.0)
        cos, dlogits = _dcos_tile(X, W, rows, cols, row_ok, col_ok, rx, rw, y, g, lse, scale, D, stride_x,
                                  stride_w, BLOCK_B, BLOCK_K, BLOCK_D, PRECISION, UPCAST)
        dcos = dlogits * scale
        dcos_cos += tl.sum(dcos * cos, 1)
        dscale += tl.sum(dlogits * cos, 1)
        w = tl.load(W + cols[:, None] * stride_w + dc[None, :], mask=col_ok[:, None] & dc_ok[None, :], other=0.0)
        acc = mma((dcos * rw[None, :]).to(w.dtype), w, acc, PRECISION, UPCAST)
    x = tl.load(X + rows[:, None] * stride_x + dc[None, :], mask=row_ok[:, None] & dc_ok[None, :], other=0.0)
    dx = rx[:, None] * (acc - dcos_cos[:, None] * rx[:, None] * x.to(tl.float32))
    tl.store(DX + rows[:, None] * D + dc[None, :], dx.to(DX.dtype.element_ty), mask=row_ok[:, None] & dc_ok[None, :])
    if tl.program_id(1) == 0:
        tl.store(DSCALE + rows, dscale, mask=row_ok)


@triton.jit
def _cosine_ce_grad_w(X, W, RX, RW, Y, SCALE, LSE, G, DW_PART, B, K, D, ROWS_PER_SPLIT, stride_x, stride_w,
                      BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dw for BLOCK_K classes × BLOCK_DC features from one split of the rows, in fp32, into DW_PART[split]
    (dw is linear in the per-row terms, so the splits' partials sum to it)."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    dc = tl.program_id(1) * BLOCK_DC + tl.arange(0, BLOCK_DC)
    split = tl.program_id(2)
    col_ok, dc_ok = cols < K, dc < D
    rw = tl.load(RW + cols, mask=col_ok, other=0.0)
    scale = tl.load(SCALE).to(tl.float32)
    acc = tl.zeros([BLOCK_K, BLOCK_DC], dtype=tl.float32)
    dcos_cos = tl.zeros([BLOCK_K], dtype=tl.float32)
    first = split * ROWS_PER_SPLIT
    for b0 in range(first, tl.minimum(first + ROWS_PER_SPLIT, B), BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        rx, y, g, lse = _row_stats(RX, Y, G, LSE, rows, row_ok)
        cos, dlogits = _dcos_tile(X, W, rows, cols, row_ok, col_ok, rx, rw, y, g, lse, scale, D, stride_x,
                                  stride_w, BLOCK_B, BLOCK_K, BLOCK_D, PRECISION, UPCAST)
        dcos = dlogits * scale
        dcos_cos += tl.sum(dcos * cos, 0)
        x = tl.load(X + rows[:, None] * stride_x + dc[None, :], mask=row_ok[:, None] & dc_ok[None, :], other=0.0)
        acc = mma(tl.trans(dcos * rx[:, None]).to(x.dtype), x, acc, PRECISION, UPCAST)
    w = tl.load(W + cols[:, None] * stride_w + dc[None, :], mask=col_ok[:, None] & dc_ok[None, :], other=0.0)
    dw = rw[:, None] * (acc - dcos_cos[:, None] * rw[:, None] * w.to(tl.float32))
    tl.store(DW_PART + split * K * D + cols[:, None] * D + dc[None, :], dw, mask=col_ok[:, None] & dc_ok[None, :])


BLOCK_B, BLOCK_K, BLOCK_D, BLOCK_DC = 32, 32, 64, 128


def _rows_per_split(B: int, programs: int, device: torch.device) -> int:
    """Rows each dw program reduces: all of them when the (class, feature) tiles alone fill the GPU, else split
    so that about four programs run per multiprocessor (K = 100 gives only 16 tiles)."""
    splits = max(1, min(triton.cdiv(B, BLOCK_B), triton.cdiv(target_programs(device), programs)))
    return triton.cdiv(triton.cdiv(B, BLOCK_B), splits) * BLOCK_B


def _inverse_norms(t: torch.Tensor) -> torch.Tensor:
    """1 / max(‖t‖, 1e-12), as F.normalize divides."""
    return 1.0 / t.float().norm(dim=-1).clamp_min(1e-12)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 stays fp32; bf16/fp16 products are exact anyway


class CosineCE(torch.autograd.Function):
    """Autograd wrapper: forward returns (per-row loss, argmax); backward gives dx, dw and d(scale)."""

    @staticmethod
    def forward(ctx, x, w, scale, labels, backward_chunk):
        x, w = x.contiguous(), w.contiguous()
        if w.dtype != x.dtype:
            w = w.to(x.dtype)
        (B, D), K = x.shape, w.shape[0]
        scale = scale.detach().float().reshape(1)
        rx, rw = _inverse_norms(x), _inverse_norms(w)
        loss = torch.empty(B, device=x.device, dtype=torch.float32)
        lse = torch.empty_like(loss)
        argmax = torch.empty(B, device=x.device, dtype=torch.int64)
        _cosine_ce_forward[(triton.cdiv(B, BLOCK_B),)](
            x, w, rx, rw, labels, scale, loss, lse, argmax, B, K, D, x.stride(0), w.stride(0),
            BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, PRECISION=_precision(x.dtype), UPCAST=INTERPRET)
        ctx.save_for_backward(x, w, rx, rw, labels, scale, lse)
        ctx.backward_chunk = backward_chunk
        ctx.mark_non_differentiable(argmax)
        return loss, argmax

    @staticmethod
    def backward(ctx, grad_loss, _grad_argmax):
        x, w, rx, rw, labels, scale, lse = ctx.saved_tensors
        (B, D), K = x.shape, w.shape[0]
        g = grad_loss.float().contiguous()
        args = (x, w, rx, rw, labels, scale, lse, g)
        chunk = ctx.backward_chunk
        blocks = dict(BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, BLOCK_DC=chunk,
                      PRECISION=_precision(x.dtype), UPCAST=INTERPRET, num_warps=8 if chunk >= 256 else 4)
        dx = dw = dscale = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            dx = torch.empty_like(x)
            dscale_rows = torch.empty(B, device=x.device, dtype=torch.float32)
            _cosine_ce_grad_x[(triton.cdiv(B, BLOCK_B), triton.cdiv(D, chunk))](
                *args, dx, dscale_rows, B, K, D, x.stride(0), w.stride(0), **blocks)
            dscale = dscale_rows.sum().reshape(()) if ctx.needs_input_grad[2] else None
        if ctx.needs_input_grad[1]:
            grid = (triton.cdiv(K, BLOCK_K), triton.cdiv(D, chunk))
            rows_per_split = _rows_per_split(B, grid[0] * grid[1], x.device)
            splits = triton.cdiv(B, rows_per_split)
            parts = torch.empty(splits, K, D, device=x.device, dtype=torch.float32)
            _cosine_ce_grad_w[(*grid, splits)](*args, parts, B, K, D, rows_per_split, x.stride(0), w.stride(0),
                                               **blocks)
            dw = (parts[0] if splits == 1 else parts.sum(0)).to(w.dtype)
        return (dx if ctx.needs_input_grad[0] else None), dw, dscale, None, None


def cosine_ce_triton(image_features, text_features, logit_scale, labels, reduction="mean", return_argmax=False,
                     backward_chunk: int = BLOCK_DC):
    """The fused kernel; same contract as cosine_ce_reference. backward_chunk: output features per backward
    program; each program recomputes its logits tiles, so a chunk as wide as D computes them once, at the price
    of a wider accumulator (benchmarks/kernel.py compares)."""
    scale = logit_scale if torch.is_tensor(logit_scale) else torch.tensor(float(logit_scale))
    scale = scale.to(image_features.device)
    per_row, argmax = CosineCE.apply(image_features, text_features, scale, labels, backward_chunk)
    if reduction == "mean":
        loss = per_row.mean()
    elif reduction == "sum":
        loss = per_row.sum()
    elif reduction == "none":
        loss = per_row
    else:
        raise ValueError(f"reduction must be mean, sum or none, not '{reduction}'")
    return (loss, argmax) if return_argmax else loss
