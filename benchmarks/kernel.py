"""cosine_ce (fused Triton kernel) against PyTorch eager and torch.compile, forward + backward; and a training
step's stacked runs in one call against the same runs one call each."""

import functools

import torch

from benchmarks.common import graphed, median_ms, peak_memory_gb
from fastcoop.kernels.cosine_ce_reference import cosine_ce_reference

try:
    from fastcoop.kernels.cosine_ce_kernel import SMALL, cosine_ce_runs_triton, cosine_ce_triton, tiles_for
except ImportError:
    cosine_ce_triton = None


def fmt_ms(ms) -> str:
    return "–" if ms is None else f"{ms:.3f}"


STACKED_RUNS = 15  # the protocol's runs (5 shot counts × 3 seeds) in one training step


def _row(step, device: str, repeats: int, runs: int, batch: int, classes: int, dim: int, dtype,
         implementation: str) -> dict:
    """One table row for `step`: its median launched ms, peak GB and (on a GPU) graphed ms, Nones where it fails;
    printed as it is measured."""
    ms = peak = graph_ms = None
    shape = f"R={runs} B={batch} K={classes}" if runs > 1 else f"B={batch} K={classes}"
    try:
        ms = median_ms(step, device, repeats, warmup=2)
        peak = peak_memory_gb(step, device)
        if device.startswith("cuda"):  # GPU time alone, as inside the training step's graph
            graph_ms = median_ms(graphed(step), device, repeats)
    except Exception as exc:  # e.g. compile unavailable, capture refused, or out of memory
        print(f"  kernel {implementation} {shape}: failed ({str(exc).splitlines()[0][:120]})")
    print(f"  kernel {shape} {implementation}: {fmt_ms(ms)} ms launched, {fmt_ms(graph_ms)} ms graphed", flush=True)
    return {"runs": runs, "batch": batch, "classes": classes, "dim": dim, "dtype": str(dtype).removeprefix("torch."),
            "implementation": implementation, "median_ms": ms, "graph_ms": graph_ms, "peak_gb": peak}


def run_kernel_section(shapes, device: str, repeats: int, dim: int = 512, dtype=None) -> list[dict]:
    """One row per (B, K, implementation): median forward+backward time and peak memory; on a GPU also a
    training step's STACKED_RUNS runs of B = 32 (each with its own text features) in one call and one by one."""
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    compiled = torch.compile(cosine_ce_reference)
    implementations = {"pytorch_eager": cosine_ce_reference, "torch_compile": compiled}
    triton_runs = device.startswith("cuda") and cosine_ce_triton is not None
    if triton_runs:
        implementations["fastcoop_triton"] = cosine_ce_triton  # its tiles chosen by the batch (tiles_for)
    rows = []
    for b, k in shapes:
        runs = dict(implementations)
        if triton_runs and tiles_for(b, dtype, torch.device(device)) != SMALL:  # large tiles: the small beside
            runs["fastcoop_triton_small_tiles"] = functools.partial(cosine_ce_triton, tiles=SMALL)
        x = torch.randn(b, dim, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(k, dim, device=device, dtype=dtype, requires_grad=True)
        scale = torch.tensor(100.0, device=device)
        labels = torch.randint(k, (b,), device=device)
        for name, fn in runs.items():
            def step(fn=fn):
                torch.autograd.grad(fn(x, w, scale, labels), [x, w])
            rows.append(_row(step, device, repeats, 1, b, k, dim, dtype, name))
    if triton_runs:
        rows += _stacked_rows(sorted({k for _, k in shapes}), device, repeats, dim, dtype)
    return rows


def _stacked_rows(classes: list[int], device: str, repeats: int, dim: int, dtype) -> list[dict]:
    """The training step's loss over STACKED_RUNS runs: one cosine_ce_runs call, and a call per run."""
    rows, runs, b = [], STACKED_RUNS, 32
    for k in classes:
        x = torch.randn(runs, b, dim, device=device, dtype=dtype)
        w = torch.randn(runs, k, dim, device=device, dtype=dtype, requires_grad=True)
        scale = torch.tensor(100.0, device=device)
        labels = torch.randint(k, (runs, b), device=device)

        def stacked():
            torch.autograd.grad(cosine_ce_runs_triton(x, w, scale, labels, [b] * runs)[0].sum(), w)

        def run_by_run():
            torch.autograd.grad([cosine_ce_triton(x[r], w[r], scale, labels[r]) for r in range(runs)], w)
        for name, step in (("fastcoop_triton_stacked", stacked), ("fastcoop_triton_run_by_run", run_by_run)):
            rows.append(_row(step, device, repeats, runs, b, k, dim, dtype, name))
    return rows
