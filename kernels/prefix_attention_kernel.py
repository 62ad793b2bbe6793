"""Fused attention for packed class prompts over a shared prefix, in Triton: one program per (class, head).

Each class has few tokens (S ≤ ~20) and the shared prefix is short (P ≤ 1 + M), so a program holds its class's
queries, keys and values and the prefix's keys and values in one tile each: scores, softmax, and both products
happen on chip, with no K × S grid and no per-class copy of the prefix. The backward recomputes the scores from
the saved log-sum-exp; the prefix's key/value gradients are summed over classes from per-class partials
(deterministic, no atomics). Same contract as prefix_attention_reference.
"""

import math

import torch
import triton
import triton.language as tl

from fastcoop.kernels.triton_common import INTERPRET, mma
from fastcoop.kernels.prefix_attention_reference import PackedLayout


@triton.jit
def _load_rows(ptr, rows, row_ok, h, d, d_ok, stride_t, stride_h):
    return tl.load(ptr + rows[:, None] * stride_t + h * stride_h + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                   other=0.0)


@triton.jit
def _load_class(Q, K, V, KP, VP, rows, row_ok, j, P, h, d, d_ok, stride_t, stride_h, HAS_PREFIX: tl.constexpr):
    """One (class, head) tile: its queries, keys and values, and the prefix's keys and values (if any)."""
    q = _load_rows(Q, rows, row_ok, h, d, d_ok, stride_t, stride_h)
    ks = _load_rows(K, rows, row_ok, h, d, d_ok, stride_t, stride_h)
    vs = _load_rows(V, rows, row_ok, h, d, d_ok, stride_t, stride_h)
    kp = q  # unused without a prefix
    vp = q
    if HAS_PREFIX:
        kp = _load_rows(KP, j, j < P, h, d, d_ok, stride_t, stride_h)
        vp = _load_rows(VP, j, j < P, h, d, d_ok, stride_t, stride_h)
    return q, ks, vs, kp, vp


@triton.jit
def _scores(q, ks, kp, i, n, j, P, sm_scale, HAS_PREFIX: tl.constexpr, PRECISION: tl.constexpr,
            UPCAST: tl.constexpr):
    """Scaled scores against the class's own keys (causal) and, if any, the prefix keys; −inf where masked."""
    s_self = mma(q, tl.trans(ks), None, PRECISION, UPCAST) * sm_scale
    s_self = tl.where((i[None, :] <= i[:, None]) & (i[None, :] < n), s_self, float("-inf"))
    s_pre = s_self  # placeholder when there is no prefix
    if HAS_PREFIX:
        s_pre = mma(q, tl.trans(kp), None, PRECISION, UPCAST) * sm_scale
        s_pre = tl.where(j[None, :] < P, s_pre, float("-inf"))
    return s_self, s_pre


@triton.jit
def _forward_kernel(Q, K, V, KP, VP, O, LSE, STARTS, LENGTHS, P, H, sm_scale, stride_t, stride_h, DH,
                    HAS_PREFIX: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_DH: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    c, h = tl.program_id(0), tl.program_id(1)
    start, n = tl.load(STARTS + c), tl.load(LENGTHS + c)
    i, j, d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_DH)
    row_ok, d_ok = i < n, d < DH
    q, ks, vs, kp, vp = _load_class(Q, K, V, KP, VP, start + i, row_ok, j, P, h, d, d_ok, stride_t, stride_h,
                                    HAS_PREFIX)
    s_self, s_pre = _scores(q, ks, kp, i, n, j, P, sm_scale, HAS_PREFIX, PRECISION, UPCAST)
    m = tl.max(s_self, 1)
    if HAS_PREFIX:
        m = tl.maximum(m, tl.max(s_pre, 1))
    p_self = tl.exp(s_self - m[:, None])
    total = tl.sum(p_self, 1)
    acc = mma(p_self.to(vs.dtype), vs, None, PRECISION, UPCAST)
    if HAS_PREFIX:
        p_pre = tl.exp(s_pre - m[:, None])
        total += tl.sum(p_pre, 1)
        acc = mma(p_pre.to(vp.dtype), vp, acc, PRECISION, UPCAST)
    out = acc / total[:, None]
    rows = start + i
    tl.store(O + rows[:, None] * stride_t + h * stride_h + d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + rows * H + h, m + tl.log(total), mask=row_ok)


@triton.jit
def _backward_kernel(Q, K, V, KP, VP, DO, LSE, DELTA, DQ, DK, DV, DKP_PART, DVP_PART, STARTS, LENGTHS, P, H,
                     sm_scale, stride_t, stride_h, DH,
                     HAS_PREFIX: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_DH: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    c, h = tl.program_id(0), tl.program_id(1)
    start, n = tl.load(STARTS + c), tl.load(LENGTHS + c)
    i, j, d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_DH)
    row_ok, d_ok = i < n, d < DH
    rows = start + i
    q, ks, vs, kp, vp = _load_class(Q, K, V, KP, VP, rows, row_ok, j, P, h, d, d_ok, stride_t, stride_h, HAS_PREFIX)
    do = _load_rows(DO, rows, row_ok, h, d, d_ok, stride_t, stride_h)
    lse = tl.load(LSE + rows * H + h, mask=row_ok, other=float("inf"))  # padded rows: p = 0
    delta = tl.load(DELTA + rows * H + h, mask=row_ok, other=0.0)
    s_self, s_pre = _scores(q, ks, kp, i, n, j, P, sm_scale, HAS_PREFIX, PRECISION, UPCAST)
    p_self = tl.exp(s_self - lse[:, None])
    dv = mma(tl.trans(p_self).to(do.dtype), do, None, PRECISION, UPCAST)
    ds_self = p_self * (mma(do, tl.trans(vs), None, PRECISION, UPCAST) - delta[:, None])
    dq = mma(ds_self.to(ks.dtype), ks, None, PRECISION, UPCAST)
    dk = mma(tl.trans(ds_self).to(q.dtype), q, None, PRECISION, UPCAST)
    if HAS_PREFIX:
        p_pre = tl.exp(s_pre - lse[:, None])
        ds_pre = p_pre * (mma(do, tl.trans(vp), None, PRECISION, UPCAST) - delta[:, None])
        dq = mma(ds_pre.to(kp.dtype), kp, dq, PRECISION, UPCAST)
        dkp = mma(tl.trans(ds_pre).to(q.dtype), q, None, PRECISION, UPCAST) * sm_scale
        dvp = mma(tl.trans(p_pre).to(do.dtype), do, None, PRECISION, UPCAST)
        part = c * P * H * DH + j[:, None] * H * DH + h * DH + d[None, :]
        tl.store(DKP_PART + part, dkp, mask=(j < P)[:, None] & d_ok[None, :])
        tl.store(DVP_PART + part, dvp, mask=(j < P)[:, None] & d_ok[None, :])
    out_mask = row_ok[:, None] & d_ok[None, :]
    offsets = rows[:, None] * stride_t + h * stride_h + d[None, :]
    tl.store(DQ + offsets, (dq * sm_scale).to(DQ.dtype.element_ty), mask=out_mask)
    tl.store(DK + offsets, (dk * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + offsets, dv.to(DV.dtype.element_ty), mask=out_mask)


def _blocks(layout: PackedLayout, P: int, dh: int) -> dict:
    return dict(BLOCK_S=max(16, triton.next_power_of_2(layout.max_len)), BLOCK_P=max(16, triton.next_power_of_2(P)),
                BLOCK_DH=max(16, triton.next_power_of_2(dh)), UPCAST=INTERPRET)


class PrefixAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k_prefix, v_prefix, layout: PackedLayout):
        q, k, v, k_prefix, v_prefix = (t.contiguous() for t in (q, k, v, k_prefix, v_prefix))
        N, H, dh = q.shape
        P = k_prefix.shape[0]
        out = torch.empty_like(q)
        lse = torch.empty(N, H, device=q.device, dtype=torch.float32)
        precision = "ieee" if q.dtype == torch.float32 else "tf32"
        _forward_kernel[(layout.num_classes, H)](
            q, k, v, k_prefix, v_prefix, out, lse, layout.starts, layout.lengths, P, H, 1.0 / math.sqrt(dh),
            q.stride(0), q.stride(1), dh, HAS_PREFIX=P > 0, PRECISION=precision, **_blocks(layout, P, dh))
        ctx.save_for_backward(q, k, v, k_prefix, v_prefix, out, lse)
        ctx.layout, ctx.precision = layout, precision
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, k_prefix, v_prefix, out, lse = ctx.saved_tensors
        layout = ctx.layout
        N, H, dh = q.shape
        P = k_prefix.shape[0]
        grad_out = grad_out.contiguous()
        delta = (grad_out.float() * out.float()).sum(-1)  # N × H
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        parts = torch.zeros(2, max(layout.num_classes * P, 1), H, dh, device=q.device, dtype=torch.float32)
        _backward_kernel[(layout.num_classes, H)](
            q, k, v, k_prefix, v_prefix, grad_out, lse, delta, dq, dk, dv, parts[0], parts[1], layout.starts,
            layout.lengths, P, H, 1.0 / math.sqrt(dh), q.stride(0), q.stride(1), dh, HAS_PREFIX=P > 0,
            PRECISION=ctx.precision, **_blocks(layout, P, dh))
        dkp, dvp = (p[:layout.num_classes * P].view(layout.num_classes, P, H, dh).sum(0) for p in parts)
        return dq, dk, dv, dkp.to(k_prefix.dtype), dvp.to(v_prefix.dtype), None


def prefix_attention_triton(q, k, v, k_prefix, v_prefix, layout: PackedLayout) -> torch.Tensor:
    """Same contract as prefix_attention_reference; k_prefix/v_prefix None when there is no shared prefix."""
    if k_prefix is None:
        k_prefix = v_prefix = q.new_zeros(0, *q.shape[1:])
    return PrefixAttention.apply(q, k, v, k_prefix, v_prefix, layout)
