"""Timing and workload helpers shared by the benchmarks."""

import json
import os
import statistics
import time
from importlib import resources

import torch

from fastcoop.step import capture_graph


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


def graphed(fn):
    """fn captured once in a CUDA graph; returns the replay, whose time is the GPU work alone, without the host's
    launch overhead."""
    return capture_graph(fn, warmup=2).replay


def peak_memory_gb(fn, device: str) -> float | None:
    """GB one call of fn allocates on top of what is already allocated (activations, workspaces, outputs):
    comparable between variants that share a process. A CUDA graph's replay allocates nothing new (its memory
    was taken at capture), so graphed steps are measured as a whole run instead (step.training_memory_gb)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - resident) / 1e9


def environment(device: str) -> dict:
    """Device, driver, versions, date and commit: every result file carries them."""
    import datetime
    import platform
    import subprocess

    import open_clip

    info = {"device": device, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "open_clip": open_clip.__version__, "python": platform.python_version(), "cpu": platform.processor(),
            "cpu_count": torch.get_num_threads()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            info["driver"] = None
    # a copied work tree (a lent GPU machine) may carry a stale .git: the caller then names the commit it sent
    info["commit"] = os.environ.get("FASTCOOP_COMMIT")
    if not info["commit"]:
        try:
            info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            info["commit"] = None
    return info


def device_slug(env: dict) -> str:
    """A file name for a device's results: the GPU's name, or cpu."""
    name = env.get("gpu") or "cpu"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
