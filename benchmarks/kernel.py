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


def _timed(step, device: str, repeats: int, label: str) -> tuple:
    """step's median launched ms, peak GB and (on a GPU) graphed ms; Nones where it fails."""
    ms = peak = graph_ms = None
    try:
        ms = median_ms(step, device, repeats, warmup=2)
        peak = peak_memory_gb(step, device)
        if device.startswith("cuda"):  # GPU time alone, as inside the training step's graph
            graph_ms = median_ms(graphed(step), device, repeats)
    except Exception as exc:  # e.g. compile unavailable, capture refused, or out of memory
        print(f"  kernel {label}: failed ({str(exc).splitlines()[0][:120]})")
    return ms, peak, graph_ms


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
            ms, peak, graph_ms = _timed(step, device, repeats, f"{name} B={b} K={k}")
            rows.append({"batch": b, "classes": k, "dim": dim, "dtype": str(dtype).removeprefix("torch."),
                         "implementation": name, "median_ms": ms, "graph_ms": graph_ms, "peak_gb": peak})
            print(f"  kernel B={b} K={k} {name}: {fmt_ms(ms)} ms launched, {fmt_ms(graph_ms)} ms graphed", flush=True)
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
            ms, peak, graph_ms = _timed(step, device, repeats, f"{name} R={runs} K={k}")
            rows.append({"batch": b, "classes": k, "dim": dim, "dtype": str(dtype).removeprefix("torch."),
                         "runs": runs, "implementation": name, "median_ms": ms, "graph_ms": graph_ms,
                         "peak_gb": peak})
            print(f"  kernel R={runs} B={b} K={k} {name}: {fmt_ms(ms)} ms launched, {fmt_ms(graph_ms)} ms graphed",
                  flush=True)
    return rows
