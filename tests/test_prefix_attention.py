"""The packed attention: its reference against dense masked attention, the fused Triton kernel against the
reference (forward and backward), and the FlexAttention variant's forward."""

import pytest
import torch

from conftest import DEVICE, needs_kernel, relative
from fastcoop.kernels.prefix_attention_flex import prefix_attention_flex, prefix_class_block_mask
from fastcoop.kernels.prefix_attention_kernel import add_prefix_partials_, prefix_attention_triton
from fastcoop.kernels.prefix_attention_reference import PackedLayout, prefix_attention_reference

TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
CASES = [
    ([3, 1, 6, 2, 5], 7, 2, 32),     # prefix (unified context, class at the end)
    ([4, 9, 1], 0, 3, 32),           # no prefix (class-specific context, or class in front)
    ([1] * 6, 17, 8, 64),            # ViT-B text heads, one-token classes, M = 16 prefix
    ([20, 2, 13, 17], 5, 2, 48),     # long class names, a head size that is not a power of two
]



def random_qkv(lengths, P, H, dh, seed=0):
    gen = torch.Generator().manual_seed(seed + len(lengths) + P)
    return torch.randn(P + sum(lengths), 3, H, dh, generator=gen)


def dense_masked_attention(qkv, lengths, P):
    """The definition, on a T × T mask: prefix rows see earlier prefix rows; class rows see the whole prefix and
    their own class's rows up to themselves."""
    owner = torch.cat([torch.full((P,), -1), torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))])
    T = len(owner)
    rows = torch.arange(T)
    sees = ((owner[None, :] < 0) & (owner[:, None] >= 0)) | ((owner[None, :] == owner[:, None]) & (rows[None, :] <= rows[:, None]))
    q, k, v = qkv.double().unbind(1)
    scores = torch.einsum("shd,thd->hst", q, k) / q.shape[-1] ** 0.5
    probs = torch.softmax(scores.masked_fill(~sees, float("-inf")), dim=-1)
    return torch.einsum("hst,thd->shd", probs, v)


@pytest.mark.parametrize("lengths, P, H, dh", CASES)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_reference_is_dense_masked_attention(lengths, P, H, dh, dtype, tolerance):
    qkv = random_qkv(lengths, P, H, dh).to(dtype)
    layout = PackedLayout.of(torch.tensor(lengths), "cpu", prefix_len=P)
    out = prefix_attention_reference(qkv, layout)
    assert out.dtype == dtype and relative(out, dense_masked_attention(qkv, lengths, P)) <= tolerance


@needs_kernel
@pytest.mark.parametrize("lengths, P, H, dh", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group, separate_prefix, num_warps, pack_rows", [
    (1, False, 4, None), (2, False, 4, None), (4, False, 4, None), (1, True, 4, None), (3, True, 4, None),
    (3, True, 2, None), (1, True, 4, 32), (2, False, 4, 32), (1, True, 4, 64), (1, None, 4, 64)])
def test_triton_matches_reference(lengths, P, H, dh, dtype, group, separate_prefix, num_warps, pack_rows):
    """group: segments per program (the prefix gradients are summed per group); separate_prefix: the prefix in its
    own launch (None: as called by default); num_warps: per program (the interpreter ignores it; on a GPU it changes the compiled layouts);
    pack_rows: runs of whole classes share a tile, each row seeing only its own class."""
    layout = PackedLayout.of(torch.tensor(lengths), DEVICE, prefix_len=P, pack_rows=pack_rows)
    qkv = random_qkv(lengths, P, H, dh)
    upstream = torch.randn(qkv.shape[0], H, dh, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    results = []
    for fn, run_dtype in ((lambda t: prefix_attention_triton(t, layout, group, separate_prefix, num_warps), dtype),
                          (lambda t: prefix_attention_reference(t, layout), torch.float32)):
        leaf = qkv.to(DEVICE, run_dtype).requires_grad_()
        out = fn(leaf)
        grad, = torch.autograd.grad((out.float() * upstream).sum(), leaf)
        results.append((out, grad))
    (out, grad), (ref, ref_grad) = results
    assert out.dtype == grad.dtype == dtype and out.shape == ref.shape and grad.shape == ref_grad.shape
    assert relative(out, ref) <= TOLERANCE[dtype]
    for part in range(3):  # q, k, v gradients, each judged on its own
        assert relative(grad[:, part], ref_grad[:, part]) <= TOLERANCE[dtype]


@needs_kernel
@pytest.mark.parametrize("lengths, P, H, dh", CASES[:2])
@pytest.mark.parametrize("group, pack_rows", [(1, None), (2, 32)])
def test_stacked_runs_equal_each_run_alone(lengths, P, H, dh, group, pack_rows):
    """R runs of one layout in one call (qkv R × T × 3 × heads × dh, run-major heads of the grid, addressed in
    place): each run's output and q, k, v gradients are, bit for bit, those of the run alone."""
    layout = PackedLayout.of(torch.tensor(lengths), DEVICE, prefix_len=P, pack_rows=pack_rows)
    gen = torch.Generator().manual_seed(2)
    qkv = torch.stack([random_qkv(lengths, P, H, dh, seed=run) for run in range(3)]).to(DEVICE).requires_grad_()
    upstream = torch.randn(3, qkv.shape[1], H, dh, generator=gen).to(DEVICE)
    out = prefix_attention_triton(qkv, layout, group)
    grad, = torch.autograd.grad((out * upstream).sum(), qkv)
    assert out.shape == (3, qkv.shape[1], H, dh)
    for run in range(3):
        alone = qkv[run].detach().clone().requires_grad_()
        out_alone = prefix_attention_triton(alone, layout, group)
        grad_alone, = torch.autograd.grad((out_alone * upstream[run]).sum(), alone)
        assert torch.equal(out[run], out_alone) and torch.equal(grad[run], grad_alone), run
        assert relative(out_alone, prefix_attention_reference(alone, layout)) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("lengths, P, H, dh", CASES[:2])
def test_flex_forward_matches_reference(lengths, P, H, dh):
    """FlexAttention's backward exists only on GPU (tests/test_text_encoder.py runs it there)."""
    layout = PackedLayout.of(torch.tensor(lengths), DEVICE, prefix_len=P)
    qkv = random_qkv(lengths, P, H, dh).to(DEVICE)
    with torch.no_grad():
        out = prefix_attention_flex(qkv, prefix_class_block_mask(layout))
        ref = prefix_attention_reference(qkv, layout)
    assert relative(out, ref) <= 1e-5


def test_packing_keeps_classes_whole_and_in_order():
    layout = PackedLayout.of(torch.tensor([3, 1, 6, 2, 5, 9]), "cpu", prefix_len=7, pack_rows=8)
    assert layout.segment_lengths.tolist() == [7, 4, 8, 5, 9]  # prefix; 3+1; 6+2; 5; 9 (longer than 8: alone)
    assert layout.segment_starts.tolist() == [0, 7, 11, 19, 24]
    assert layout.max_segment_len == 9 and layout.max_len == 9
    assert layout.first_row.tolist() == [0] * 7 + [7] * 3 + [10] + [11] * 6 + [17] * 2 + [19] * 5 + [24] * 9


@needs_kernel
@pytest.mark.parametrize("groups", [1, 16, 37])  # one partial; one full block of groups; several blocks, one partial
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefix_partials_are_summed_into_the_prefix_keys_and_values(groups, dtype):
    """The classes' launch leaves each group's gradient for the prefix's keys and values in fp32 partials; one
    kernel sums them into dqkv (only its prefix rows' k and v), as parts.sum(1) added in fp32 would."""
    gen = torch.Generator().manual_seed(groups)
    P, H, dh = 17, 8, 64
    dqkv = torch.randn(P + 30, 3, H, dh, generator=gen).to(DEVICE, dtype)
    parts = torch.randn(2, groups, P, H, dh, generator=gen).to(DEVICE)
    expected = dqkv.clone()
    expected[:P, 1:] = (expected[:P, 1:].float() + parts.sum(1).transpose(0, 1)).to(dtype)
    add_prefix_partials_(dqkv[None], parts)  # one run
    # fp32: summation order; bf16: one rounding step (the interpreter casts to bf16 by truncating, GPUs round)
    rtol, atol = (1e-6, 1e-5) if dtype == torch.float32 else (torch.finfo(dtype).eps, 0.0)
    torch.testing.assert_close(dqkv, expected, rtol=rtol, atol=atol)
    assert torch.equal(dqkv[P:], expected[P:]) and torch.equal(dqkv[:P, 0], expected[:P, 0])
