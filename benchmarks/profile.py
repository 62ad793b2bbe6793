"""Where a fastcoop step's GPU time goes: its kernels, grouped by name, from torch.profiler over eager steps.

The graphed step runs the same kernels back to back, so the kernels' summed time is what a replay cannot go under;
the graph's measured time minus that sum is what launches and gaps between kernels still cost.
"""

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def kernel_profile(fn, steps: int = 5, top: int | None = None) -> dict:
    """Per step: number of kernels, their summed time (ms), and the kernels by time (the `top` first, or all: the
    whole list is what plans a fusion)."""
    fn()  # compiled and warm before profiling
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return {"kernels_per_step": sum(e.count for e in kernels) / steps,
            "kernel_ms_per_step": sum(e.self_device_time_total for e in kernels) / steps / 1000,
            "top": [{"kernel": e.key[:120], "calls_per_step": e.count / steps,
                     "ms_per_step": e.self_device_time_total / steps / 1000} for e in kernels[:top]]}
