"""Timing and workload helpers shared by the benchmarks."""

import json
import statistics
import time
from importlib import resources

import torch


DATASET_OF_SIZE = {10: "eurosat", 37: "oxford_pets", 47: "dtd", 100: "caltech101", 397: "sun397", 1000: "imagenet"}


def classnames_of(dataset: str) -> list[str]:
    table = json.loads(resources.files("fastcoop").joinpath("presets/classnames.json").read_text())
    names = table[dataset]
    if dataset == "caltech101":  # CoOp's split drops 'background' and the second face class
        names = [n for n in names if n not in ("background", "off-center face")]
    return names


def real_classnames(k: int) -> list[str]:
    """K real class names (real prompt lengths): the paper's dataset of that size, else ImageNet's first K."""
    return classnames_of(DATASET_OF_SIZE[k]) if k in DATASET_OF_SIZE else classnames_of("imagenet")[:k]


def median_ms(fn, device: str, repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() in ms: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def peak_memory_gb(fn, device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9
