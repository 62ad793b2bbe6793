"""Fused cosine-logit cross-entropy in Triton: normalise, scale · cos, softmax CE, and its backward, in one pass
over blocks of the B × K logits that are never written to memory.

With x̂ = x·rx, ŵ = w·rw (rx, rw the inverse norms), cos = x̂·ŵ, logits = s·cos, p = softmax(logits):
    forward:  loss_i = logsumexp_j(s·cos_ij) − s·cos_{i,y_i}   (online logsumexp over K blocks) and argmax_j
    backward: with c_ij = dL/dcos_ij = s·g_i·(p_ij − [j = y_i]),
              dx_i = rx_i (Σ_j c_ij ŵ_j − (Σ_j c_ij cos_ij) x̂_i)
              dw_j = rw_j (Σ_i c_ij x̂_i − (Σ_i c_ij cos_ij) ŵ_j)
              ds   = Σ_ij g_i (p_ij − [j = y_i]) cos_ij
The dot products run on the raw inputs (tensor cores for bf16/fp16) with fp32 accumulation; the inverse norms are
summed from the same loaded tiles and applied to the fp32 results, so no pass of its own reads x or w. Backward
programs own a (rows, feature-chunk) tile and recompute the logits tiles.

Every kernel reduces over one side (the forward and dx over classes, dw over rows). When the other side is too
small to fill the GPU (B = 32 in training: one block of rows), that reduction is cut into splits run by separate
programs, and their partials are combined afterwards: log-sum-exps by a log-sum-exp, gradients by a sum (each is
linear in its terms). Tile sizes follow the batch (tiles_for): small tiles and splits for training's B = 32,
Hopper-sized 64 × 64 tiles once the rows fill the GPU by themselves.

Stacked runs (a training step's runs, each with its own rows, labels and text features) go in one launch of each
kernel: every program works within one run, and the combine kernel also gives each run its mean loss and hits, so
a stack's loss and metrics cost the same few launches as one run's. Each run's splits are planned from its own
rows as if it ran alone (run_plans; programs past them write nothing or zeros), and its rows past its own count
(padding up to the stack's largest batch) are never read, so a run's numbers do not depend on the runs beside it.
"""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastcoop.kernels.triton_common import (INTERPRET, dot_precision, launch_kernel, mma, multiprocessors,
                                            target_programs)


# run_plans' table, per run: rows, the forward's classes per split, dx's classes per split, dw's rows per split
PLAN_FIELDS = tl.constexpr(4)


@triton.jit
def _cos_tile(X, W, rows, cols, row_ok, col_ok, D, stride_x, stride_w,
              BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """cos(x_rows, w_cols) as a BLOCK_B × BLOCK_K fp32 tile, and the inverse norms 1 / max(‖·‖, 1e-12) of its rows
    and columns (as F.normalize divides), summed from the tiles the dot product loads."""
    acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    x_squares = tl.zeros([BLOCK_B], dtype=tl.float32)
    w_squares = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        x = tl.load(X + rows[:, None] * stride_x + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(W + cols[:, None] * stride_w + ds[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = mma(x, tl.trans(w), acc, PRECISION, UPCAST)
        x_squares += tl.sum(x.to(tl.float32) * x.to(tl.float32), 1)
        w_squares += tl.sum(w.to(tl.float32) * w.to(tl.float32), 1)
    rx = 1.0 / tl.maximum(tl.sqrt(x_squares), 1e-12)
    rw = 1.0 / tl.maximum(tl.sqrt(w_squares), 1e-12)
    return acc * rx[:, None] * rw[None, :], rx, rw


@triton.jit(do_not_specialize=["B", "K"])
def _cosine_ce_forward(X, W, Y, PLAN, SCALE, LSE_PART, TARGET_PART, BEST_PART, INDEX_PART, B, K, D,
                       stride_xr, stride_x, stride_wr, stride_w, BLOCK_B: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """For BLOCK_B rows of one run and one split of its classes (the run's PLAN: rows, classes per split): log-sum-exp
    of the logits, the label's logit (0 when the label lies in another split), and the best logit with its class.
    Programs past the run's own rows or splits store nothing."""
    run, split = tl.program_id(2).to(tl.int64), tl.program_id(1)
    # the runs' strides (B·D, K·D) stay specialised: multiples of 16 whatever the data when D is, so the offset
    # pointers keep their alignment and the loads stay vectorised
    X, W, Y = X + run * stride_xr, W + run * stride_wr, Y + run * B
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < tl.load(PLAN + run * PLAN_FIELDS)
    cols_per_split = tl.load(PLAN + run * PLAN_FIELDS + 1)
    y = tl.load(Y + rows, mask=row_ok, other=0)
    scale = tl.load(SCALE).to(tl.float32)
    running_max = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_B], dtype=tl.float32)
    target = tl.zeros([BLOCK_B], dtype=tl.float32)
    best = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    best_index = tl.zeros([BLOCK_B], dtype=tl.int64)
    first = split * cols_per_split
    if first >= K:  # past the run's own splits
        return
    for k0 in range(first, tl.minimum(first + cols_per_split, K), BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        cos, _, _ = _cos_tile(X, W, rows, cols, row_ok, col_ok, D, stride_x, stride_w,
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
    part = (run * tl.num_programs(1) + split) * B + rows
    tl.store(LSE_PART + part, running_max + tl.log(running_sum), mask=row_ok)
    tl.store(TARGET_PART + part, target, mask=row_ok)
    tl.store(BEST_PART + part, best, mask=row_ok)
    tl.store(INDEX_PART + part, best_index, mask=row_ok)


@triton.jit(do_not_specialize=["B", "K", "SPLITS"])
def _cosine_ce_forward_combine(LSE_PART, TARGET_PART, BEST_PART, INDEX_PART, Y, PLAN, LOSS, LSE, ARGMAX,
                               RUN_LOSS, HITS, B, K, SPLITS, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """BLOCK rows of one run: each row's loss, log-sum-exp and argmax from its splits' partials (splits in class
    order), and the block's sum of losses and its rows whose argmax is the label. ONE_BLOCK (a run's rows fit one
    block, as a training batch does): the run's mean loss and hits themselves; else the block's sums, which the
    caller adds up."""
    block, run = tl.program_id(0), tl.program_id(1).to(tl.int64)
    count = tl.load(PLAN + run * PLAN_FIELDS)
    run_splits = tl.cdiv(K, tl.load(PLAN + run * PLAN_FIELDS + 1))
    rows = block * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < count
    running_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK], dtype=tl.float32)
    target = tl.zeros([BLOCK], dtype=tl.float32)
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_index = tl.zeros([BLOCK], dtype=tl.int64)
    for split in range(run_splits):
        part = (run * SPLITS + split) * B + rows
        lse = tl.load(LSE_PART + part, mask=row_ok, other=0.0)
        new_max = tl.maximum(running_max, lse)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.exp(lse - new_max)
        running_max = new_max
        target += tl.load(TARGET_PART + part, mask=row_ok, other=0.0)
        split_best = tl.load(BEST_PART + part, mask=row_ok, other=0.0)
        better = split_best > best  # strict, as in the forward: the first maximal class wins
        best_index = tl.where(better, tl.load(INDEX_PART + part, mask=row_ok, other=0), best_index)
        best = tl.where(better, split_best, best)
    lse = running_max + tl.log(running_sum)
    loss = lse - target
    at = run * B + rows
    tl.store(LOSS + at, loss, mask=row_ok)
    tl.store(LSE + at, lse, mask=row_ok)
    tl.store(ARGMAX + at, best_index, mask=row_ok)
    y = tl.load(Y + at, mask=row_ok, other=-1)
    loss_sum = tl.sum(tl.where(row_ok, loss, 0.0), 0)
    hits = tl.sum(tl.where(row_ok & (best_index == y), 1, 0).to(tl.int64), 0)
    if ONE_BLOCK:
        tl.store(RUN_LOSS + run, tl.math.div_rn(loss_sum, count.to(tl.float32)))  # as torch divides
        tl.store(HITS + run, hits)
    else:
        tl.store(RUN_LOSS + run * tl.num_programs(0) + block, loss_sum)
        tl.store(HITS + run * tl.num_programs(0) + block, hits)


@triton.jit
def _dcos_tile(X, W, rows, cols, row_ok, col_ok, y, g, lse, scale, D, stride_x, stride_w,
               BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The cos tile, dL/dlogits for it (zero outside the valid rows and columns), and the inverse norms."""
    cos, rx, rw = _cos_tile(X, W, rows, cols, row_ok, col_ok, D, stride_x, stride_w,
                            BLOCK_B, BLOCK_K, BLOCK_D, PRECISION, UPCAST)
    p = tl.exp(scale * cos - lse[:, None])
    dlogits = g[:, None] * (p - tl.where(cols[None, :] == y[:, None], 1.0, 0.0))
    dlogits = tl.where(row_ok[:, None] & col_ok[None, :], dlogits, 0.0)
    return cos, dlogits, rx, rw


@triton.jit
def _row_stats(Y, G_ROW, G_RUN, LSE, count, rows, row_ok, ROW_GRAD: tl.constexpr, RUN_GRAD: tl.constexpr):
    """Per-row inputs of the backward (Y, G_ROW, LSE already at the run's rows): label, log-sum-exp, and the
    upstream gradient: the row's own plus the run's mean's share, 1/count of it."""
    y = tl.load(Y + rows, mask=row_ok, other=0)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    g = tl.zeros_like(lse)
    if ROW_GRAD:
        g += tl.load(G_ROW + rows, mask=row_ok, other=0.0)
    if RUN_GRAD:
        g += tl.load(G_RUN) / count
    return y, g, lse


@triton.jit(do_not_specialize=["B", "K", "SPLITS"])
def _cosine_ce_grad_x(X, W, Y, PLAN, SCALE, LSE, G_ROW, G_RUN, DX_PART, DSCALE_PART, B, K, D, SPLITS,
                      stride_xr, stride_x, stride_wr, stride_w, BLOCK_B: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROW_GRAD: tl.constexpr,
                      RUN_GRAD: tl.constexpr):
    """dx for BLOCK_B rows × BLOCK_DC features of one run from one split of the classes, into
    DX_PART[run, split], and (from the first feature chunk) each row's ds term into DSCALE_PART[run, split]; rows
    past the run's count, and splits past the run's own, get zeros."""
    run, split = tl.program_id(2).to(tl.int64) // SPLITS, tl.program_id(2) % SPLITS
    X, W, at = X + run * stride_xr, W + run * stride_wr, run * B
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    dc = tl.program_id(1) * BLOCK_DC + tl.arange(0, BLOCK_DC)
    count, cols_per_split = tl.load(PLAN + run * PLAN_FIELDS), tl.load(PLAN + run * PLAN_FIELDS + 2)
    row_ok, dc_ok = rows < count, dc < D
    y, g, lse = _row_stats(Y + at, G_ROW + at, G_RUN + run, LSE + at, count, rows, row_ok, ROW_GRAD, RUN_GRAD)
    scale = tl.load(SCALE).to(tl.float32)
    acc = tl.zeros([BLOCK_B, BLOCK_DC], dtype=tl.float32)
    dcos_cos = tl.zeros([BLOCK_B], dtype=tl.float32)
    dscale = tl.zeros([BLOCK_B], dtype=tl.float32)
    rx = tl.zeros([BLOCK_B], dtype=tl.float32)  # the rows' inverse norms, from the first tile on
    first = split * cols_per_split
    for k0 in range(first, tl.minimum(first + cols_per_split, K), BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        cos, dlogits, rx, rw = _dcos_tile(X, W, rows, cols, row_ok, col_ok, y, g, lse, scale, D, stride_x,
                                          stride_w, BLOCK_B, BLOCK_K, BLOCK_D, PRECISION, UPCAST)
        dcos = dlogits * scale
        dcos_cos += tl.sum(dcos * cos, 1)
        dscale += tl.sum(dlogits * cos, 1)
        w = tl.load(W + cols[:, None] * stride_w + dc[None, :], mask=col_ok[:, None] & dc_ok[None, :], other=0.0)
        acc = mma((dcos * rw[None, :]).to(w.dtype), w, acc, PRECISION, UPCAST)
    x = tl.load(X + rows[:, None] * stride_x + dc[None, :], mask=row_ok[:, None] & dc_ok[None, :], other=0.0)
    dx = rx[:, None] * (acc - dcos_cos[:, None] * rx[:, None] * x.to(tl.float32))
    part = (run * SPLITS + split) * B + rows
    in_bounds = rows < B
    tl.store(DX_PART + part[:, None] * D + dc[None, :], dx.to(DX_PART.dtype.element_ty),
             mask=in_bounds[:, None] & dc_ok[None, :])
    if tl.program_id(1) == 0:
        tl.store(DSCALE_PART + part, dscale, mask=in_bounds)


@triton.jit(do_not_specialize=["B", "K", "SPLITS"])
def _cosine_ce_grad_w(X, W, Y, PLAN, SCALE, LSE, G_ROW, G_RUN, DW_PART, B, K, D, SPLITS, stride_xr, stride_x,
                      stride_wr, stride_w, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_DC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                      ROW_GRAD: tl.constexpr, RUN_GRAD: tl.constexpr):
    """dw for BLOCK_K classes × BLOCK_DC features of one run from one split of its rows, into DW_PART[run, split]
    (zeros for splits past the run's own)."""
    run, split = tl.program_id(2).to(tl.int64) // SPLITS, tl.program_id(2) % SPLITS
    X, W, at = X + run * stride_xr, W + run * stride_wr, run * B
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    dc = tl.program_id(1) * BLOCK_DC + tl.arange(0, BLOCK_DC)
    count, rows_per_split = tl.load(PLAN + run * PLAN_FIELDS), tl.load(PLAN + run * PLAN_FIELDS + 3)
    col_ok, dc_ok = cols < K, dc < D
    scale = tl.load(SCALE).to(tl.float32)
    acc = tl.zeros([BLOCK_K, BLOCK_DC], dtype=tl.float32)
    dcos_cos = tl.zeros([BLOCK_K], dtype=tl.float32)
    rw = tl.zeros([BLOCK_K], dtype=tl.float32)  # the classes' inverse norms, from the first tile on
    first = split * rows_per_split
    for b0 in range(first, tl.minimum(first + rows_per_split, count), BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < count
        y, g, lse = _row_stats(Y + at, G_ROW + at, G_RUN + run, LSE + at, count, rows, row_ok, ROW_GRAD,
                               RUN_GRAD)
        cos, dlogits, rx, rw = _dcos_tile(X, W, rows, cols, row_ok, col_ok, y, g, lse, scale, D, stride_x,
                                          stride_w, BLOCK_B, BLOCK_K, BLOCK_D, PRECISION, UPCAST)
        dcos = dlogits * scale
        dcos_cos += tl.sum(dcos * cos, 0)
        x = tl.load(X + rows[:, None] * stride_x + dc[None, :], mask=row_ok[:, None] & dc_ok[None, :], other=0.0)
        acc = mma(tl.trans(dcos * rx[:, None]).to(x.dtype), x, acc, PRECISION, UPCAST)
    w = tl.load(W + cols[:, None] * stride_w + dc[None, :], mask=col_ok[:, None] & dc_ok[None, :], other=0.0)
    dw = rw[:, None] * (acc - dcos_cos[:, None] * rw[:, None] * w.to(tl.float32))
    part = (run * SPLITS + split) * K + cols
    tl.store(DW_PART + part[:, None] * D + dc[None, :], dw.to(DW_PART.dtype.element_ty),
             mask=col_ok[:, None] & dc_ok[None, :])


@dataclass(frozen=True)
class Tiles:
    """One launch configuration: rows and classes per logits tile, features per dot-product step, output features
    per backward program (each recomputes its logits tiles, so a chunk as wide as D computes them once, at the
    price of a wider accumulator), and warps per forward and per backward program."""

    rows: int
    classes: int
    chunk: int
    forward_warps: int
    backward_warps: int
    features: int = 64


# B = 32 (training): small tiles, so that splitting each reduction over classes fills the GPU. 32-row tiles
# compile to Ampere's mma.sync, not Hopper's wgmma.
SMALL = Tiles(rows=32, classes=32, chunk=128, forward_warps=4, backward_warps=4)
# Many rows: 64-row tiles, which compile to wgmma without spills; the fastest of the shapes timed (the
# benchmark's kernel section; benchmarks/CHANGELOG.md).
LARGE = Tiles(rows=64, classes=64, chunk=256, forward_warps=4, backward_warps=8)
BLOCK_COMBINE = 128


def tiles_for(rows: int, dtype: torch.dtype, device: torch.device) -> Tiles:
    """Small tiles while the rows alone cannot give every multiprocessor a tile (their class splits fill the
    GPU instead), large ones once they can, for 16-bit inputs: fp32 dots use no tensor cores and spill at the
    large tiles' sizes, so fp32 keeps the small ones."""
    many_rows = triton.cdiv(rows, SMALL.rows) >= multiprocessors(device)
    return LARGE if many_rows and dtype != torch.float32 else SMALL


def _per_split(length: int, block: int, tiles: int, device: torch.device) -> int:
    """How much of a reduction (rows or classes, in whole blocks) each program takes: all of it when the `tiles`
    independent programs already fill the GPU, else a share, so that about four programs run per multiprocessor."""
    blocks = triton.cdiv(length, block)
    splits = max(1, min(blocks, triton.cdiv(target_programs(device), tiles)))
    return triton.cdiv(blocks, splits) * block


def _partials(runs: int, splits: int, rows: int, D: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Where the splits write: fp32 partials to be summed, or, with one split, the gradient itself in its dtype."""
    return torch.empty(runs, splits, rows, D, device=device, dtype=torch.float32 if splits > 1 else dtype)


def _total(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return parts[:, 0] if parts.shape[1] == 1 else parts.sum(1).to(dtype)


def run_plans(sizes: tuple[int, ...], K: int, D: int, tiles: Tiles, device: torch.device) -> tuple:
    """How each run's reductions are split, chosen from its own rows as if it ran alone (so a run's numbers do not
    depend on the runs stacked beside it): a device table R × PLAN_FIELDS (rows; classes per split of the forward
    and of dx; rows per split of dw) and the most splits of any run for each (the launches' grids)."""
    return _run_plans(tuple(sizes), K, D, tiles, device, target_programs(device))


@functools.cache
def _run_plans(sizes, K, D, tiles, device, programs) -> tuple:
    """run_plans, made once per shape (`programs`: the GPU's target, part of the key), so that a step captured in
    a CUDA graph after a first eager call finds its table made."""
    class_blocks, chunks = triton.cdiv(K, tiles.classes), triton.cdiv(D, tiles.chunk)
    plans = []
    for rows in sizes:
        row_blocks = triton.cdiv(max(rows, 1), tiles.rows)
        plans.append((rows, _per_split(K, tiles.classes, row_blocks, device),
                      _per_split(K, tiles.classes, row_blocks * chunks, device),
                      _per_split(max(rows, 1), tiles.rows, class_blocks * chunks, device)))
    splits = (max(triton.cdiv(K, plan[1]) for plan in plans), max(triton.cdiv(K, plan[2]) for plan in plans),
              max(triton.cdiv(max(plan[0], 1), plan[3]) for plan in plans))
    return torch.tensor(plans, dtype=torch.int32, device=device), splits


class CosineCE(torch.autograd.Function):
    """Autograd wrapper over stacked runs: x R × B × D, w R × K × D, labels R × B, sizes (each run's rows; the
    rest of its B are padding, never read). Forward returns the per-row loss and argmax (R × B, defined on the
    counted rows), each run's mean loss (R) and its hits (R); backward gives dx (zero on padding), dw and
    d(scale) from the gradients of the per-row losses, of the runs' means, or both."""

    @staticmethod
    def forward(ctx, x, w, scale, labels, sizes, tiles):
        x, w, labels = x.contiguous(), w.contiguous(), labels.contiguous()
        if w.dtype != x.dtype:  # a kernel reading bf16 classes for fp32 rows spills (tests/compile_kernels.py)
            w = w.to(x.dtype)
        (R, B, D), K = x.shape, w.shape[1]
        tiles = tiles or tiles_for(B, x.dtype, x.device)
        plan, splits = run_plans(sizes, K, D, tiles, x.device)
        scale = scale.detach().float().reshape(1)
        row_blocks = triton.cdiv(B, tiles.rows)
        lse_part, target_part, best_part = torch.empty(3, R, splits[0], B, device=x.device, dtype=torch.float32)
        index_part = torch.empty(R, splits[0], B, device=x.device, dtype=torch.int64)
        launch_kernel(
            _cosine_ce_forward, (row_blocks, splits[0], R),
            x, w, labels, plan, scale, lse_part, target_part, best_part, index_part, B, K, D,
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), BLOCK_B=tiles.rows, BLOCK_K=tiles.classes,
            BLOCK_D=tiles.features, PRECISION=dot_precision(x.dtype), UPCAST=INTERPRET, num_warps=tiles.forward_warps)
        loss, lse = torch.empty(2, R, B, device=x.device, dtype=torch.float32)
        argmax = torch.empty(R, B, device=x.device, dtype=torch.int64)
        blocks = triton.cdiv(B, BLOCK_COMBINE)
        run_loss = torch.empty(R, blocks, device=x.device, dtype=torch.float32)
        hits = torch.empty(R, blocks, device=x.device, dtype=torch.int64)
        launch_kernel(
            _cosine_ce_forward_combine, (blocks, R),
            lse_part, target_part, best_part, index_part, labels, plan, loss, lse, argmax, run_loss, hits, B, K,
            splits[0], BLOCK=BLOCK_COMBINE, ONE_BLOCK=blocks == 1)
        if blocks == 1:
            run_loss, hits = run_loss[:, 0], hits[:, 0]
        else:  # the blocks' sums, in a fixed order
            run_loss, hits = run_loss.sum(1) / plan[:, 0], hits.sum(1)
        ctx.save_for_backward(x, w, labels, plan, scale, lse)
        ctx.tiles, ctx.splits = tiles, splits
        ctx.mark_non_differentiable(argmax, hits)
        ctx.set_materialize_grads(False)  # outputs without a gradient get none: no zero-filled one to pass back
        return loss, argmax, run_loss, hits

    @staticmethod
    def backward(ctx, grad_rows, _grad_argmax, grad_runs, _grad_hits):
        if grad_rows is None and grad_runs is None:
            return None, None, None, None, None, None
        x, w, labels, plan, scale, lse = ctx.saved_tensors
        (R, B, D), K = x.shape, w.shape[1]
        tiles, (_, dx_splits, dw_splits) = ctx.tiles, ctx.splits
        g_rows = lse if grad_rows is None else grad_rows.float().contiguous()  # lse: a pointer never read
        g_runs = lse if grad_runs is None else grad_runs.float().contiguous()
        args = (x, w, labels, plan, scale, lse, g_rows, g_runs)
        chunks = triton.cdiv(D, tiles.chunk)
        blocks = dict(BLOCK_B=tiles.rows, BLOCK_K=tiles.classes, BLOCK_D=tiles.features, BLOCK_DC=tiles.chunk,
                      PRECISION=dot_precision(x.dtype), UPCAST=INTERPRET, ROW_GRAD=grad_rows is not None,
                      RUN_GRAD=grad_runs is not None, num_warps=tiles.backward_warps)
        strides = (x.stride(0), x.stride(1), w.stride(0), w.stride(1))
        dx = dw = dscale = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            parts = _partials(R, dx_splits, B, D, x.dtype, x.device)
            dscale_parts = torch.empty(R, dx_splits, B, device=x.device, dtype=torch.float32)
            launch_kernel(
                _cosine_ce_grad_x, (triton.cdiv(B, tiles.rows), chunks, R * dx_splits),
                *args, parts, dscale_parts, B, K, D, dx_splits, *strides, **blocks)
            dx = _total(parts, x.dtype)
            dscale = dscale_parts.sum().reshape(()) if ctx.needs_input_grad[2] else None
        if ctx.needs_input_grad[1]:
            parts = _partials(R, dw_splits, K, D, w.dtype, x.device)
            launch_kernel(
                _cosine_ce_grad_w, (triton.cdiv(K, tiles.classes), chunks, R * dw_splits),
                *args, parts, B, K, D, dw_splits, *strides, **blocks)
            dw = _total(parts, w.dtype)
        return (dx if ctx.needs_input_grad[0] else None), dw, dscale, None, None, None


def _scale_on(logit_scale, device) -> torch.Tensor:
    return (logit_scale if torch.is_tensor(logit_scale) else torch.tensor(float(logit_scale))).to(device)


def cosine_ce_triton(image_features, text_features, logit_scale, labels, reduction="mean", return_argmax=False,
                     tiles: Tiles | None = None):
    """The fused kernel; same contract as cosine_ce_reference. tiles: the launch configuration (default:
    tiles_for the batch)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, not '{reduction}'")
    per_row, argmax, mean, _ = CosineCE.apply(image_features[None], text_features[None],
                                              _scale_on(logit_scale, image_features.device), labels[None],
                                              (len(image_features),), tiles)
    loss = {"mean": mean[0], "sum": per_row[0].sum(), "none": per_row[0]}[reduction]
    return (loss, argmax[0]) if return_argmax else loss


def cosine_ce_runs_triton(image_features, text_features, logit_scale, labels, sizes, tiles: Tiles | None = None):
    """The fused kernel over stacked runs; same contract as cosine_ce_runs_reference."""
    _, _, losses, hits = CosineCE.apply(image_features, text_features, _scale_on(logit_scale, image_features.device),
                                        labels, tuple(sizes), tiles)
    return losses, hits
