"""The machine a run shares: the cores this process may use, how much else runs, and so how torch's CPU threads
should behave. Read before torch loads (OpenMP reads its wait policy then), without importing it."""

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
