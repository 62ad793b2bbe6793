"""The machine a run shares: the cores this process may use, how much else runs, and so how many CPU threads a
command computes with — torch's and the BLAS libraries' (NumPy's and SciPy's OpenBLAS, under scikit-learn) alike.
Read before torch loads (OpenMP reads its wait policy then), without importing it."""

import math
import os
import time
from pathlib import Path


def others_running() -> float:
    """How much else runs now: the kernel's count of runnable threads less this one, the least of three looks 5 ms
    apart (a passing process is not load); where there is no /proc, the 1-minute load average."""
    try:
        counts = []
        for _ in range(3):
            counts.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1)
            time.sleep(0.005)
        return min(counts)
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0]


def wait_policy(others: float) -> str:
    """How torch's OpenMP threads wait: on an idle machine they spin (the fastest hand-over between small ops);
    beside other work they sleep, so that a run gets its share of the cores instead of waiting on its own
    descheduled, spinning threads."""
    return "ACTIVE" if others < 0.5 else "PASSIVE"


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (a container's)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def cpu_threads(others: float, cores: int) -> int:
    """torch's CPU threads for a run: a thread per usable core, less one per other runnable thread (at least one).
    Beside other work, a thread per core makes every op wait for whichever of its threads is descheduled; with
    the cores' share it gets, the run is slowed only by that share."""
    return max(1, min(cores, cores - math.floor(others + 0.5)))


# what each threaded library reads, when it loads, for its number of threads
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def default_threads_before_loading(threads: int) -> None:
    """The thread count for every library this process loads later, where the user set none: OpenBLAS spins
    a thread per core by default, and beside other work one descheduled spinning thread stalls every product."""
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, str(threads))


def use_threads(threads: int) -> None:
    """Compute with `threads` CPU threads from now on: torch's, the BLAS and OpenMP libraries already loaded
    (threadpoolctl), and those loaded later (the variables they read when they load)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
