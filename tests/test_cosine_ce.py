"""The fused Triton cosine cross-entropy against its plain-PyTorch reference (on CPU under TRITON_INTERPRET=1)."""

import functools

import pytest
import torch

from conftest import DEVICE, needs_kernel, relative
from fastcoop import kernels
from fastcoop.kernels import cosine_ce
from fastcoop.kernels import cosine_ce_kernel
from fastcoop.kernels.cosine_ce_kernel import cosine_ce_triton
from fastcoop.kernels.cosine_ce_reference import cosine_ce_reference, cosine_ce_runs_reference

TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def compare(B, K, D, dtype, scale=14.3, reduction="mean", near_duplicates=False, labels=None, seed=0,
            tiles=None, w_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen).to(dtype)
    w = torch.randn(K, D, generator=gen)
    if near_duplicates:  # classes that differ by a hair: the softmax is nearly flat, then sharp at scale 100
        w = w[:1] + 1e-3 * w
    w = w.to(w_dtype or dtype)
    y = (labels if labels is not None else torch.randint(K, (B,), generator=gen)).to(DEVICE)
    x, w = x.to(DEVICE), w.to(DEVICE)
    results = []
    kernel = functools.partial(cosine_ce_triton, tiles=tiles)
    for fn in (kernel, cosine_ce_reference):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        si = torch.tensor(scale, requires_grad=True, device=DEVICE)
        loss, argmax = fn(xi, wi, si, y, reduction=reduction, return_argmax=True)
        upstream = torch.linspace(0.5, 1.5, loss.numel(), device=DEVICE).view_as(loss)
        grads = torch.autograd.grad((loss * upstream).sum(), [xi, wi, si])
        results.append((loss.detach(), argmax, grads))
    (loss, argmax, grads), (ref_loss, ref_argmax, ref_grads) = results
    tol = TOLERANCE[dtype]
    assert relative(loss, ref_loss) <= tol
    assert (argmax == ref_argmax).float().mean() >= (1.0 if dtype == torch.float32 else 0.97)
    for name, g, r in zip(("x", "w", "scale"), grads, ref_grads):
        assert g.dtype == r.dtype and g.shape == r.shape
        assert relative(g, r) <= (TOLERANCE[w_dtype] if name == "w" and w_dtype else tol), name


@needs_kernel
@pytest.mark.parametrize("B, K, D", [(32, 100, 512), (33, 130, 65)])
def test_fp32_images_and_bf16_text(B, K, D):
    """Training's mix: cached fp32 features, text features from the bf16 encoder, computed in fp32 as the
    reference does; the text's gradient comes back in bf16."""
    compare(B, K, D, torch.float32, w_dtype=torch.bfloat16)


@needs_kernel
@pytest.mark.parametrize("B, K, D", [(5, 7, 33), (1, 1, 64), (32, 100, 512), (70, 45, 100), (33, 130, 65),
                                     (130, 17, 1280)])  # the first (quick) case: loss and gradients far from 0
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(B, K, D, dtype):
    compare(B, K, D, dtype)


@needs_kernel
@pytest.mark.parametrize("tiles", [cosine_ce_kernel.SMALL, cosine_ce_kernel.LARGE], ids=["small", "large"])
@pytest.mark.parametrize("B, K, D", [(70, 45, 600), (200, 130, 96)])  # D past one chunk; rows past one tile
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_tile_configuration(tiles, B, K, D, dtype):
    compare(B, K, D, dtype, tiles=tiles)


def test_tiles_follow_the_batch_and_dtype():
    """Training's B = 32 gets the small tiles, a batch that gives every multiprocessor a row tile the large (in
    16 bits; fp32 keeps the small: the large spill)."""
    cpu, tiles_for = torch.device("cpu"), cosine_ce_kernel.tiles_for  # the interpreter stands in 4 multiprocessors
    assert tiles_for(32, torch.bfloat16, cpu) == cosine_ce_kernel.SMALL
    for dtype in (torch.bfloat16, torch.float16):
        assert tiles_for(4 * 32, dtype, cpu) == cosine_ce_kernel.LARGE
    assert tiles_for(4 * 32, torch.float32, cpu) == cosine_ce_kernel.SMALL


@needs_kernel
@pytest.mark.parametrize("programs", [1, 7, 10_000])  # no splits; uneven splits; one block per split
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_reductions(monkeypatch, programs, dtype):
    """Each reduction is cut into splits when the other side cannot fill the GPU; how many depends on the GPU's
    size, so every cut is checked here by pretending the device wants `programs` programs."""
    monkeypatch.setattr(cosine_ce_kernel, "target_programs", lambda device: programs)
    if programs == 7:  # 2 row blocks and 5 class blocks: the forward cuts K into 3 splits, dw cuts B into 2
        assert cosine_ce_kernel._per_split(150, 32, 2, DEVICE) == 64
        assert cosine_ce_kernel._per_split(40, 32, 5, DEVICE) == 32
    compare(40, 150, 96, dtype)


@needs_kernel
def test_argmax_tie_across_splits_keeps_the_first_class(monkeypatch):
    """torch.argmax returns the first of equal maxima; the split forward must too, across split boundaries."""
    monkeypatch.setattr(cosine_ce_kernel, "target_programs", lambda device: 10_000)  # a split per class block
    w = torch.randn(100, 64, generator=torch.Generator().manual_seed(0))
    w[70] = w[5]  # classes 5 and 70 (splits 0 and 2) are the same vector
    x = 3.0 * w[5].repeat(4, 1)
    labels = torch.tensor([5, 70, 0, 99])
    x, w, labels = x.to(DEVICE), w.to(DEVICE), labels.to(DEVICE)
    loss, argmax = cosine_ce_triton(x, w, 50.0, labels, reduction="none", return_argmax=True)
    ref_loss, ref_argmax = cosine_ce_reference(x, w, 50.0, labels, reduction="none", return_argmax=True)
    assert argmax.tolist() == ref_argmax.tolist() == [5] * 4
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(reduction):
    compare(40, 50, 64, torch.float32, reduction=reduction)


@needs_kernel
def test_large_scale_near_duplicates():
    """Scale 100 with classes that differ by 1e-3: the gradients are differences of nearly equal terms, so both
    fp32 implementations are judged against float64 truth, the kernel within a few times the reference's error.
    The loss here is ~3e-5, a difference of logits near 100 whose own fp32 rounding is ~1e-5: the reference can
    land far closer than that by luck of summation order, so errors below 1e-7 absolute count as exact."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(48, 128, generator=gen), torch.randn(40, 128, generator=gen)
    w = w[:1] + 1e-3 * w
    y = torch.randint(40, (48,), generator=gen)
    x, w, y = x.to(DEVICE), w.to(DEVICE), y.to(DEVICE)
    out = {}
    for name, fn, dtype in (("kernel", cosine_ce_triton, torch.float32), ("ref32", cosine_ce_reference, torch.float32),
                            ("truth", cosine_ce_reference, torch.float64)):
        xi, wi = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        si = torch.tensor(100.0, dtype=dtype, requires_grad=True, device=DEVICE)
        if dtype == torch.float64:
            logits = si * torch.nn.functional.normalize(xi, dim=-1) @ torch.nn.functional.normalize(wi, dim=-1).T
            loss = torch.nn.functional.cross_entropy(logits, y)
        else:
            loss = fn(xi, wi, si, y)
        out[name] = [loss.detach(), *torch.autograd.grad(loss, [xi, wi, si])]
    for kernel, ref, truth in zip(out["kernel"], out["ref32"], out["truth"]):
        error, ref_error = (kernel.double() - truth).norm(), (ref.double() - truth).norm()
        assert error <= 5 * ref_error + 1e-6 * truth.norm() + 1e-7


@needs_kernel
def test_first_and_last_labels():
    labels = torch.tensor([0, 36, 0, 36] * 8)
    compare(32, 37, 96, torch.float32, labels=labels)


@needs_kernel
def test_dispatch_uses_the_kernel_where_it_runs(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels.kernel, "cosine_ce_triton",
                        lambda *a, **k: calls.append(a) or cosine_ce_triton(*a, **k))
    x, w = torch.randn(8, 32, device=DEVICE), torch.randn(5, 32, device=DEVICE)
    cosine_ce(x, w, torch.tensor(10.0, device=DEVICE), torch.zeros(8, dtype=torch.long, device=DEVICE))
    assert len(calls) == 1


def test_reference_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    y = torch.randint(5, (6,), generator=gen)

    def f(x, w, s):
        logits = s * torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(w, dim=-1).T
        return torch.nn.functional.cross_entropy(logits, y)

    assert torch.autograd.gradcheck(f, (x, w, s))
    # the reference computes exactly that function (in fp32)
    torch.testing.assert_close(cosine_ce_reference(x, w, s, y).double(), f(x, w, s), rtol=1e-6, atol=1e-6)


def stacked_runs(sizes, K, D, dtype, seed=0):
    """Runs padded to the largest batch: padding rows hold NaN features and out-of-range labels, which the kernel
    must never read."""
    gen = torch.Generator().manual_seed(seed)
    B = max(sizes)
    x = torch.full((len(sizes), B, D), float("nan"))
    y = torch.full((len(sizes), B), 10 ** 6, dtype=torch.long)
    for run, size in enumerate(sizes):
        x[run, :size] = torch.randn(size, D, generator=gen)
        y[run, :size] = torch.randint(K, (size,), generator=gen)
    w = torch.randn(len(sizes), K, D, generator=gen)
    return x.to(dtype).to(DEVICE), w.to(dtype).to(DEVICE), y.to(DEVICE)


def runs_loss_and_grads(fn, x, w, scale, y, sizes, weighted=True):
    """Each run's mean loss and hits, and the gradients of a sum of the runs' losses (weighted: by 0.5 … 1.5)."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    s = torch.tensor(scale, requires_grad=True, device=DEVICE)
    losses, hits = fn(x, w, s, y, sizes)
    upstream = torch.linspace(0.5, 1.5, len(sizes), device=DEVICE) if weighted else torch.ones(len(sizes))
    dx, dw, ds = torch.autograd.grad((losses * upstream.to(DEVICE)).sum(), [x, w, s])
    return losses.detach(), hits, dx, dw, ds


@needs_kernel
@pytest.mark.parametrize("programs", [1, 7, 10_000])  # no splits; uneven splits; one block per split
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_runs_match_the_reference(monkeypatch, programs, dtype):
    """Runs of different batch sizes in one launch set: each run's mean loss, hits and gradients as the reference
    computes them run by run; the padding gets no gradient."""
    monkeypatch.setattr(cosine_ce_kernel, "target_programs", lambda device: programs)
    sizes = [32, 5, 40, 1]
    x, w, y = stacked_runs(sizes, 150, 96, dtype)
    kernel = runs_loss_and_grads(kernels.kernel.cosine_ce_runs_triton, x, w, 14.3, y, sizes)
    reference = runs_loss_and_grads(cosine_ce_runs_reference, torch.nan_to_num(x), w, 14.3, y, sizes)
    tol = TOLERANCE[dtype]
    (loss, hits, dx, dw, ds), (ref_loss, ref_hits, ref_dx, ref_dw, ref_ds) = kernel, reference
    assert relative(loss, ref_loss) <= tol
    assert hits.dtype == torch.long and hits.shape == (len(sizes),)
    if dtype == torch.float32:
        assert hits.tolist() == ref_hits.tolist()
    for run, size in enumerate(sizes):
        assert relative(dx[run, :size], ref_dx[run, :size]) <= tol
        assert (dx[run, size:] == 0).all()
        assert relative(dw[run], ref_dw[run]) <= tol
    assert relative(ds, ref_ds) <= tol


@needs_kernel
@pytest.mark.parametrize("programs, sizes", [(1, [7, 40, 33]), (7, [7, 40, 33]), (7, [7, 200, 130])])
def test_a_run_stacked_equals_the_run_alone(monkeypatch, programs, sizes):
    """A run's loss, hits and gradients do not depend on the runs stacked beside it or on their batch sizes: bit
    for bit the numbers of its own call (what makes a stack of training runs end where each run alone ends), also
    where the stack's rows take more than one combine block and the run's own fit in one."""
    monkeypatch.setattr(cosine_ce_kernel, "target_programs", lambda device: programs)
    x, w, y = stacked_runs(sizes, 75, 64, torch.float32, seed=1)
    loss, hits, dx, dw, _ = runs_loss_and_grads(kernels.kernel.cosine_ce_runs_triton, x, w, 30.0, y, sizes,
                                                weighted=False)
    for run, size in enumerate(sizes):
        alone = runs_loss_and_grads(kernels.kernel.cosine_ce_runs_triton, x[run:run + 1, :size], w[run:run + 1],
                                    30.0, y[run:run + 1, :size], [size], weighted=False)
        assert torch.equal(loss[run:run + 1], alone[0]) and torch.equal(hits[run:run + 1], alone[1])
        assert torch.equal(dx[run:run + 1, :size], alone[2]) and torch.equal(dw[run:run + 1], alone[3])


def test_reference_runs_are_each_run_alone():
    """The runs' reference is cosine_ce_reference on each run's own rows (padding not read), with its hits."""
    sizes = [3, 6]
    x, w, y = stacked_runs(sizes, 9, 16, torch.float32)
    losses, hits = cosine_ce_runs_reference(x, w, 5.0, y, sizes)
    for run, size in enumerate(sizes):
        loss, predicted = cosine_ce_reference(x[run, :size], w[run], 5.0, y[run, :size], return_argmax=True)
        assert torch.equal(losses[run], loss)
        assert hits[run].item() == (predicted == y[run, :size]).sum().item()
