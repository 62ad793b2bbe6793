"""cosine_ce (fused Triton kernel) against PyTorch eager and torch.compile, forward + backward."""

import functools

import torch

from benchmarks.common import graphed, median_ms, peak_memory_gb
from fastcoop.kernels.cosine_ce_reference import cosine_ce_reference

try:
    from fastcoop.kernels.cosine_ce_kernel import SMALL, cosine_ce_triton, tiles_for
except ImportError:
    cosine_ce_triton = None


def fmt_ms(ms) -> str:
    return "–" if ms is None else f"{ms:.3f}"


def run_kernel_section(shapes, device: str, repeats: int, dim: int = 512, dtype=None) -> list[dict]:
    """One row per (B, K, implementation): median forward+backward time and peak memory."""
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
            ms = peak = graph_ms = None
            try:
                ms = median_ms(step, device, repeats, warmup=2)
                peak = peak_memory_gb(step, device)
                if device.startswith("cuda"):  # GPU time alone, as inside the training step's graph
                    graph_ms = median_ms(graphed(step), device, repeats)
            except Exception as exc:  # e.g. compile unavailable, capture refused, or out of memory
                print(f"  kernel {name} B={b} K={k}: failed ({str(exc).splitlines()[0][:120]})")
            rows.append({"batch": b, "classes": k, "dim": dim, "dtype": str(dtype).removeprefix("torch."),
                         "implementation": name, "median_ms": ms, "graph_ms": graph_ms, "peak_gb": peak})
            print(f"  kernel B={b} K={k} {name}: {fmt_ms(ms)} ms launched, {fmt_ms(graph_ms)} ms graphed", flush=True)
    return rows
