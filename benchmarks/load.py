"""A CPU run on a shared machine: one whole `fastcoop train` process alone, then beside 1 and 3 busy processes
(torch matrix products on every core, or a pure-Python loop), each in one benchmark run. What a researcher on a
shared server waits for: a fair share of the cores, not a crawl behind spinning threads."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.full_run import write_synthetic_cache

BUSY = {"torch": "import torch\na = torch.randn(256, 256)\nwhile True:\n    a @ a",
        "python": "while True:\n    pass"}


def run_load_section(dataset: str = "eurosat", epochs: int = 6, busy_counts=(1, 3), settle: float = 3.0) -> dict:
    """Wall time of a 16-shot `fastcoop train` (`epochs` epochs) alone and beside each number of busy processes of
    each kind; the busy ones run `settle` seconds first, as other people's jobs would already be running."""
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / f"{dataset}.h5"
        write_synthetic_cache(cache, dataset)
        command = [sys.executable, "-m", "fastcoop", "train", str(cache), "--shots", "16", "--epochs", str(epochs),
                   "--device", "cpu"]
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # as a user's shell has it

        def timed(name: str) -> float:
            start = time.perf_counter()
            subprocess.run(command + ["--out", str(Path(tmp) / name)], check=True, capture_output=True, env=env)
            return time.perf_counter() - start

        row = {"dataset": dataset, "epochs": epochs, "cores": len(os.sched_getaffinity(0)),
               "alone_seconds": timed("alone")}
        for kind, code in BUSY.items():
            for count in busy_counts:
                others = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]
                try:
                    time.sleep(settle)
                    row[f"beside_{count}_{kind}_seconds"] = timed(f"{kind}-{count}")
                finally:
                    for other in others:
                        other.kill()
                        other.wait()
                time.sleep(settle)  # the machine quiet again before the next
    parts = ", ".join(f"{key.removeprefix('beside_').removesuffix('_seconds').replace('_', ' ')} "
                      f"{value:.1f} s ({value / row['alone_seconds']:.1f}×)" for key, value in row.items()
                      if key.startswith("beside_"))
    print(f"  load {dataset}: alone {row['alone_seconds']:.1f} s; beside {parts}", flush=True)
    return row
