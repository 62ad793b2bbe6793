"""A CPU run on a shared machine: one whole `fastcoop train` process alone, then beside 1 and 3 busy processes
(torch matrix products on every core, or a pure-Python loop), each in one benchmark run. What a researcher on a
shared server waits for: a fair share of the cores, not a crawl behind spinning threads.

Beside each, in the same run, a plain PyTorch process of small ops (a text-encoder-like forward and backward,
with the same thread count and wait policy fastcoop's rule gives): how much any PyTorch loop slows there. Where
fastcoop slows much more than the plain loop, the difference is fastcoop's own (synchronisation, timers,
threads), not the machine's."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.full_run import write_synthetic_cache

BUSY = {"torch": "import torch\na = torch.randn(256, 256)\nwhile True:\n    a @ a",
        "python": "while True:\n    pass"}
PLAIN = """import os, sys
from fastcoop import machine
others = machine.others_running()
os.environ.setdefault("OMP_WAIT_POLICY", machine.wait_policy(others))
import torch
torch.set_num_threads(machine.cpu_threads(others, machine.usable_cores()))
weights = [torch.randn(512, 512) / 23 for _ in range(12)]
x = torch.randn(48, 512, requires_grad=True)
for _ in range(int(sys.argv[1])):
    h = x
    for w in weights:
        h = h + torch.nn.functional.gelu(torch.nn.functional.layer_norm(h, (512,)) @ w)
    h.sum().backward()
"""


def run_load_section(dataset: str = "eurosat", epochs: int = 6, busy_counts=(1, 3), settle: float = 3.0,
                     kinds=tuple(BUSY), plain_steps: int = 300) -> dict:
    """Wall time of a 16-shot `fastcoop train` (`epochs` epochs) and of the plain loop (`plain_steps` steps) alone
    and beside each number of busy processes of each kind; the busy ones run `settle` seconds first, as other
    people's jobs would already be running."""
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / f"{dataset}.h5"
        write_synthetic_cache(cache, dataset)
        command = [sys.executable, "-m", "fastcoop", "train", str(cache), "--shots", "16", "--epochs", str(epochs),
                   "--device", "cpu"]
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # as a user's shell has it

        def timed(name: str) -> tuple[float, float]:
            """(fastcoop's seconds, the plain loop's seconds), one after the other under the same load."""
            start = time.perf_counter()
            subprocess.run(command + ["--out", str(Path(tmp) / name)], check=True, capture_output=True, env=env)
            middle = time.perf_counter()
            subprocess.run([sys.executable, "-c", PLAIN, str(plain_steps)], check=True, capture_output=True, env=env)
            return middle - start, time.perf_counter() - middle

        row = {"dataset": dataset, "epochs": epochs, "plain_steps": plain_steps, "cores": len(os.sched_getaffinity(0))}
        row["alone_seconds"], row["plain_alone_seconds"] = timed("alone")
        for kind in kinds:
            for count in busy_counts:
                others = [subprocess.Popen([sys.executable, "-c", BUSY[kind]]) for _ in range(count)]
                try:
                    time.sleep(settle)
                    ours, plain = timed(f"{kind}-{count}")
                finally:
                    for other in others:
                        other.kill()
                        other.wait()
                what = f"beside_{count}_{kind}"
                row[f"{what}_seconds"], row[f"plain_{what}_seconds"] = ours, plain
                row[f"{what}_excess"] = (ours / row["alone_seconds"]) / (plain / row["plain_alone_seconds"])
                time.sleep(settle)  # the machine quiet again before the next
    alone, plain_alone = row["alone_seconds"], row["plain_alone_seconds"]
    print(f"  load {dataset}: alone fastcoop {alone:.1f} s, plain loop {plain_alone:.1f} s", flush=True)
    for key in [k for k in row if k.endswith("_excess")]:
        what = key.removeprefix("beside_").removesuffix("_excess")
        ours, plain = row[f"beside_{what}_seconds"], row[f"plain_beside_{what}_seconds"]
        print(f"    beside {what.replace('_', ' ')}: fastcoop {ours:.1f} s ({ours / alone:.2f}×), plain loop "
              f"{plain:.1f} s ({plain / plain_alone:.2f}×): fastcoop's slowdown {row[key]:.2f}× the plain loop's",
              flush=True)
    return row
