"""Fused attention over the packed rows of the fast text path, in Triton.

The rows are the shared prefix (P rows, possibly none), then each class's few tokens, unpadded
(prefix_attention_reference says who sees whom). The prefix and each class — or each run of whole classes, when
the layout packs them (PackedLayout.of's pack_rows: taller tiles, fewer of them; a row sees only its own class's
rows, by its first_row) — are "segments"; by default the prefix (causal within itself) has a launch of its own
and the classes a second one. A program takes a group of consecutive
segments for one head; it loads the prefix's keys and values once and holds each segment's queries,
keys and values in one tile each (S ≤ ~20, P ≤ 1 + M), so scores, softmax and both products stay on chip: no
K × S grid and no per-class copy of the prefix. The backward recomputes the scores from the saved log-sum-exp;
the gradients the classes send to the prefix's keys and values are summed over a group in registers, then over
groups (deterministic, no atomics). Stacked runs (R contexts of one layout, R × T rows) are more heads of the
grid, each addressed in its own run's rows: nothing is copied into a heads-first layout and back.
"""

import math

import torch
import triton
import triton.language as tl

from fastcoop.kernels.triton_common import INTERPRET, dot_precision, launch_kernel, mma, target_programs
from fastcoop.kernels.prefix_attention_reference import PackedLayout


@triton.jit
def _load_rows(ptr, rows, row_ok, head, d, d_ok, stride_t):
    """Rows of one head; `head`: the head's offset (its run's and its own)."""
    return tl.load(ptr + rows[:, None] * stride_t + head + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                   other=0.0)


@triton.jit
def _head(h, HEADS, stride_run, stride_h):
    """Where head h of the grid (head h % HEADS of run h // HEADS) starts."""
    return (h // HEADS) * stride_run + (h % HEADS) * stride_h


@triton.jit
def _load_prefix(K, V, j, P, head, d, d_ok, stride_t, HAS_PREFIX: tl.constexpr, BLOCK_P: tl.constexpr,
                 BLOCK_DH: tl.constexpr):
    """The prefix's keys and values for one head (zeros when there is no prefix), loaded once per program."""
    kp = tl.zeros([BLOCK_P, BLOCK_DH], dtype=K.dtype.element_ty)
    vp = kp
    if HAS_PREFIX:
        kp = _load_rows(K, j, j < P, head, d, d_ok, stride_t)
        vp = _load_rows(V, j, j < P, head, d, d_ok, stride_t)
    return kp, vp


@triton.jit
def _load_segment(QKV, K, V, STARTS, LENGTHS, FIRST_ROW, s, i, head, d, d_ok, stride_t, PACKED: tl.constexpr):
    """Segment s's rows for one head: where they are, how many, where each row's class starts in the segment
    (0 unless PACKED: a segment is then a run of classes), and their queries, keys and values."""
    start, n = tl.load(STARTS + s), tl.load(LENGTHS + s)
    rows, row_ok = start + i, i < n
    class_first = i * 0
    if PACKED:
        class_first = (tl.load(FIRST_ROW + rows, mask=row_ok, other=0) - start).to(tl.int32)
    q = _load_rows(QKV, rows, row_ok, head, d, d_ok, stride_t)
    ks = _load_rows(K, rows, row_ok, head, d, d_ok, stride_t)
    vs = _load_rows(V, rows, row_ok, head, d, d_ok, stride_t)
    return rows, row_ok, n, class_first, q, ks, vs


@triton.jit
def _scores(q, ks, kp, i, n, class_first, j, visible, sm_scale, HAS_PREFIX: tl.constexpr, PACKED: tl.constexpr,
            PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Scaled scores against the segment's own keys (causal, within each row's class) and the first `visible`
    prefix keys; −inf where masked."""
    s_self = mma(q, tl.trans(ks), None, PRECISION, UPCAST) * sm_scale
    own = (i[None, :] <= i[:, None]) & (i[None, :] < n)
    if PACKED:
        own = own & (i[None, :] >= class_first[:, None])
    s_self = tl.where(own, s_self, float("-inf"))
    s_pre = s_self  # placeholder when there is no prefix
    if HAS_PREFIX:
        s_pre = mma(q, tl.trans(kp), None, PRECISION, UPCAST) * sm_scale
        s_pre = tl.where(j[None, :] < visible, s_pre, float("-inf"))
    return s_self, s_pre


@triton.jit(do_not_specialize=["FIRST", "END", "GROUP", "H", "stride_run", "stride_o_run"])
def _attention_forward(QKV, O, LSE, STARTS, LENGTHS, FIRST_ROW, FIRST, END, GROUP, P, H, HEADS, sm_scale, stride_run,
                       stride_t, stride_part, stride_h, stride_o_run, DH, HAS_PREFIX: tl.constexpr,
                       PACKED: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_DH: tl.constexpr,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Segments FIRST.. END − 1, GROUP per program, of head h of the grid (H = runs × HEADS): output rows (laid
    out runs × T × HEADS × DH) and their log-sum-exp."""
    g, h = tl.program_id(0), tl.program_id(1)
    i, j, d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_DH)
    d_ok = d < DH
    K, V = QKV + stride_part, QKV + 2 * stride_part
    head = _head(h, HEADS, stride_run, stride_h)
    kp, vp = _load_prefix(K, V, j, P, head, d, d_ok, stride_t, HAS_PREFIX, BLOCK_P, BLOCK_DH)
    first = FIRST + g * GROUP
    for s in range(first, tl.minimum(first + GROUP, END)):
        rows, row_ok, n, class_first, q, ks, vs = _load_segment(QKV, K, V, STARTS, LENGTHS, FIRST_ROW, s, i, head, d,
                                                                d_ok, stride_t, PACKED)
        visible = tl.where(s > 0, P, 0)  # segment 0 is the prefix itself
        s_self, s_pre = _scores(q, ks, kp, i, n, class_first, j, visible, sm_scale, HAS_PREFIX, PACKED, PRECISION,
                                UPCAST)
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
        tl.store(O + _head(h, HEADS, stride_o_run, DH) + rows[:, None] * HEADS * DH + d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + rows * H + h, m + tl.log(total), mask=row_ok)


@triton.jit(do_not_specialize=["FIRST", "END", "GROUP", "H", "stride_run", "stride_o_run"])
def _attention_backward(QKV, O, DO, LSE, DQKV, DKP_PART, DVP_PART, STARTS, LENGTHS, FIRST_ROW, FIRST, END, GROUP,
                        P, H, HEADS, sm_scale, stride_run, stride_t, stride_part, stride_h, stride_o_run, DH,
                        HAS_PREFIX: tl.constexpr, PACKED: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK_DH: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dq, dk, dv of each segment's rows (DQKV, laid out as QKV); the prefix key/value gradients its classes send,
    summed over the group, into row `g` of the partials."""
    g, h = tl.program_id(0), tl.program_id(1)
    i, j, d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_DH)
    d_ok = d < DH
    K, V = QKV + stride_part, QKV + 2 * stride_part
    head, head_o = _head(h, HEADS, stride_run, stride_h), _head(h, HEADS, stride_o_run, DH)
    kp, vp = _load_prefix(K, V, j, P, head, d, d_ok, stride_t, HAS_PREFIX, BLOCK_P, BLOCK_DH)
    dkp = tl.zeros([BLOCK_P, BLOCK_DH], dtype=tl.float32)
    dvp = tl.zeros([BLOCK_P, BLOCK_DH], dtype=tl.float32)
    first = FIRST + g * GROUP
    for s in range(first, tl.minimum(first + GROUP, END)):
        rows, row_ok, n, class_first, q, ks, vs = _load_segment(QKV, K, V, STARTS, LENGTHS, FIRST_ROW, s, i, head, d,
                                                                d_ok, stride_t, PACKED)
        o = _load_rows(O, rows, row_ok, head_o, d, d_ok, HEADS * DH)
        do = _load_rows(DO, rows, row_ok, head_o, d, d_ok, HEADS * DH)
        lse = tl.load(LSE + rows * H + h, mask=row_ok, other=float("inf"))  # padded rows: p = 0
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        visible = tl.where(s > 0, P, 0)
        s_self, s_pre = _scores(q, ks, kp, i, n, class_first, j, visible, sm_scale, HAS_PREFIX, PACKED, PRECISION,
                                UPCAST)
        p_self = tl.exp(s_self - lse[:, None])
        dv = mma(tl.trans(p_self).to(do.dtype), do, None, PRECISION, UPCAST)
        ds_self = p_self * (mma(do, tl.trans(vs), None, PRECISION, UPCAST) - delta[:, None])
        dq = mma(ds_self.to(ks.dtype), ks, None, PRECISION, UPCAST)
        dk = mma(tl.trans(ds_self).to(q.dtype), q, None, PRECISION, UPCAST)
        if HAS_PREFIX:
            p_pre = tl.exp(s_pre - lse[:, None])
            ds_pre = p_pre * (mma(do, tl.trans(vp), None, PRECISION, UPCAST) - delta[:, None])
            dq = mma(ds_pre.to(kp.dtype), kp, dq, PRECISION, UPCAST)
            dkp = mma(tl.trans(ds_pre).to(q.dtype), q, dkp, PRECISION, UPCAST)
            dvp = mma(tl.trans(p_pre).to(do.dtype), do, dvp, PRECISION, UPCAST)
        out_mask = row_ok[:, None] & d_ok[None, :]
        offsets = rows[:, None] * stride_t + head + d[None, :]
        tl.store(DQKV + offsets, (dq * sm_scale).to(DQKV.dtype.element_ty), mask=out_mask)
        tl.store(DQKV + stride_part + offsets, (dk * sm_scale).to(DQKV.dtype.element_ty), mask=out_mask)
        tl.store(DQKV + 2 * stride_part + offsets, dv.to(DQKV.dtype.element_ty), mask=out_mask)
    if HAS_PREFIX:
        part = g * P * H * DH + j[:, None] * H * DH + h * DH + d[None, :]
        tl.store(DKP_PART + part, dkp * sm_scale, mask=(j < P)[:, None] & d_ok[None, :])
        tl.store(DVP_PART + part, dvp, mask=(j < P)[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["GROUPS", "H", "stride_run"])
def _add_prefix_partials(PARTS, DQKV, GROUPS, PHD, H, HEADS, DH, stride_run, stride_t, stride_part, stride_h,
                         BLOCK_G: tl.constexpr, BLOCK: tl.constexpr):
    """The prefix rows' key (program_id(1) = 0) or value (1) gradients += the sum over the class groups'
    partials (PARTS: 2 × GROUPS × P × H × DH, fp32), summed BLOCK_G groups at a time, in fp32, rounded once."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat (prefix row, head, feature) index
    kv = tl.program_id(1)
    ok = e < PHD
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for g0 in range(0, GROUPS, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        tile = tl.load(PARTS + (kv * GROUPS + g[:, None]) * PHD + e[None, :], mask=(g < GROUPS)[:, None] & ok[None, :],
                       other=0.0)
        total += tl.sum(tile, 0)
    row, h, d = e // (H * DH), (e // DH) % H, e % DH
    target = DQKV + row * stride_t + (1 + kv) * stride_part + _head(h, HEADS, stride_run, stride_h) + d
    tl.store(target, (tl.load(target, mask=ok, other=0.0).to(tl.float32) + total).to(DQKV.dtype.element_ty),
             mask=ok)


BLOCK_PARTIALS = 256


def add_prefix_partials_(dqkv: torch.Tensor, parts: torch.Tensor) -> None:
    """dqkv[:, :P, 1:] += parts.sum(1) (dqkv: R × T × 3 × heads × dh; parts: 2 × groups × P × R·heads × dh, fp32,
    run-major heads) in one launch instead of PyTorch's several."""
    _, groups, P, H, dh = parts.shape
    launch_kernel(
        _add_prefix_partials, (triton.cdiv(P * H * dh, BLOCK_PARTIALS), 2),
        parts, dqkv, groups, P * H * dh, H, dqkv.shape[3], dh, dqkv.stride(0), dqkv.stride(1), dqkv.stride(2),
        dqkv.stride(3), BLOCK_G=16, BLOCK=BLOCK_PARTIALS)


def _launches(layout: PackedLayout, group: int, separate_prefix: bool) -> list[dict]:
    """Which segments each launch covers, and its tiles. Together, the prefix segment sets the tile height for
    every class (17 rows with M = 16, so 32); separate_prefix gives the prefix its own small launch so the
    classes get tiles of their own height."""
    P, segments = layout.prefix_len, len(layout.segment_starts)
    if not (separate_prefix and P):
        return [dict(FIRST=0, END=segments, GROUP=group, HAS_PREFIX=P > 0,
                     BLOCK_S=_tile(max(layout.max_segment_len, P)))]
    return [dict(FIRST=0, END=1, GROUP=1, HAS_PREFIX=False, BLOCK_S=_tile(P)),
            dict(FIRST=1, END=segments, GROUP=group, HAS_PREFIX=True, BLOCK_S=_tile(layout.max_segment_len))]


def _tile(rows: int) -> int:
    """A tile side: the next power of two, at least 16 (the least a matrix instruction takes)."""
    return max(16, triton.next_power_of_2(rows))


def _grid(launch: dict, heads: int) -> tuple[int, int]:
    return triton.cdiv(launch["END"] - launch["FIRST"], launch["GROUP"]), heads


def group_size(segments: int, heads: int, device: torch.device) -> int:
    """Segments per program: enough programs to fill the GPU about four times, and no more, so the prefix is
    loaded, and its gradient partials written, once per group rather than once per class."""
    if device.type != "cuda":
        return 1
    return max(1, segments * heads // target_programs(device))


def _strides(qkv: torch.Tensor, out: torch.Tensor) -> dict:
    """Where a run, a row, q/k/v and a head start in qkv (R × T × 3 × heads × dh), and a run in the output."""
    return dict(stride_run=qkv.stride(0), stride_t=qkv.stride(1), stride_part=qkv.stride(2), stride_h=qkv.stride(3),
                stride_o_run=out.stride(0))


class PackedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, layout: PackedLayout, group: int, separate_prefix: bool, num_warps: int):
        """qkv: R × T × 3 × heads × dh (R stacked runs) → R × T × heads × dh."""
        qkv = qkv.contiguous()
        R, T, _, heads, dh = qkv.shape
        H = R * heads  # the grid's heads
        out = torch.empty(R, T, heads, dh, device=qkv.device, dtype=qkv.dtype)
        lse = torch.empty(T, H, device=qkv.device, dtype=torch.float32)
        tiles = dict(BLOCK_P=_tile(layout.prefix_len), BLOCK_DH=_tile(dh), PACKED=layout.pack_rows is not None,
                     PRECISION=dot_precision(qkv.dtype), UPCAST=INTERPRET, num_warps=num_warps)
        for launch in _launches(layout, group, separate_prefix):
            launch_kernel(
                _attention_forward, _grid(launch, H),
                qkv, out, lse, layout.segment_starts, layout.segment_lengths, layout.first_row,
                P=layout.prefix_len, H=H, HEADS=heads, sm_scale=1.0 / math.sqrt(dh), **_strides(qkv, out), DH=dh,
                **launch, **tiles)
        ctx.save_for_backward(qkv, out, lse)
        ctx.layout, ctx.group, ctx.separate_prefix, ctx.tiles = layout, group, separate_prefix, tiles
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, out, lse = ctx.saved_tensors
        layout, P = ctx.layout, ctx.layout.prefix_len
        R, T, _, heads, dh = qkv.shape
        H = R * heads
        launches = _launches(layout, ctx.group, ctx.separate_prefix)
        dqkv = torch.empty_like(qkv)
        groups = _grid(launches[-1], H)[0]  # the launch that holds the classes sends the prefix its gradients
        parts = torch.empty(2, groups, max(P, 1), H, dh, device=qkv.device, dtype=torch.float32)
        for launch in launches:
            launch_kernel(
                _attention_backward, _grid(launch, H),
                qkv, out, grad_out.contiguous(), lse, dqkv, parts[0], parts[1], layout.segment_starts,
                layout.segment_lengths, layout.first_row, P=P, H=H, HEADS=heads, sm_scale=1.0 / math.sqrt(dh),
                **_strides(qkv, out), DH=dh, **launch, **ctx.tiles)
        if P:  # the prefix rows' keys and values: their own segment's gradient plus what every class sent
            add_prefix_partials_(dqkv, parts)
        return dqkv, None, None, None, None


def prefix_attention_triton(qkv: torch.Tensor, layout: PackedLayout, group: int | None = None,
                            separate_prefix: bool | None = None, num_warps: int = 4) -> torch.Tensor:
    """Same contract as prefix_attention_reference; also for R stacked runs of the layout at once, qkv
    R × T × 3 × heads × dh → R × T × heads × dh (each run's rows attend only to its own). group: segments per
    program (default: by the GPU's size).
    separate_prefix: the prefix in its own launch, so the classes' tiles are as tall as the longest class rather
    than the prefix (16 rows instead of 32 for M = 16: a quarter of the self-score work, and fewer registers per
    thread, which tests/compile_kernels.py reports). Default: apart only when the prefix would make the classes'
    tiles taller (one class per tile); together when their tiles are as tall anyway (several classes packed per
    tile), saving a launch each way. num_warps: per program. benchmarks/attention.py times the choices."""
    stacked = qkv.dim() == 5
    qkv = qkv if stacked else qkv[None]
    group = group or group_size(len(layout.segment_starts), qkv.shape[0] * qkv.shape[3], qkv.device)
    if separate_prefix is None:
        separate_prefix = _tile(layout.prefix_len) > _tile(layout.max_segment_len)
    out = PackedAttention.apply(qkv, layout, group, separate_prefix, num_warps)
    return out if stacked else out[0]
