"""`fastcoop sweep` (the paper's protocol for one dataset: shot counts × seeds; each shot count's seeds stacked)
against the same sweep one run at a time (`--no-stack`), the same runs as separate `fastcoop train` processes, and
the published estimate, on synthetic caches shaped like the datasets."""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.full_run import write_synthetic_cache
from fastcoop.schedule import published_epochs
from fastcoop.train import batches_per_epoch


def run_sweep_section(dataset: str, device: str, shots: list[int], seeds: list[int], published_step_ms: float,
                      epochs: int | None = None) -> dict:
    """Whole-process wall times: one sweep, and the sum of one `fastcoop train` per run. `epochs`: a shorter
    schedule than the published one (a CPU-sized check of the overhead each process pays)."""
    common = ["--n-ctx", "16", "--device", device] + (["--epochs", str(epochs)] if epochs else [])
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / f"{dataset}.h5"
        k = write_synthetic_cache(cache, dataset, shots=shots, seeds=seeds)
        sweep_args = ["--shots", ",".join(map(str, shots)), "--seeds", ",".join(map(str, seeds)), *common]
        start = time.perf_counter()
        _run([sys.executable, "-m", "fastcoop", "sweep", str(cache), "--out", str(Path(tmp) / "sweep"), *sweep_args])
        sweep = time.perf_counter() - start
        start = time.perf_counter()
        _run([sys.executable, "-m", "fastcoop", "sweep", str(cache), "--out", str(Path(tmp) / "one-by-one"),
              *sweep_args, "--no-stack"])
        unstacked = time.perf_counter() - start
        start = time.perf_counter()
        for s in shots:
            for seed in seeds:
                _run([sys.executable, "-m", "fastcoop", "train", str(cache), "--out", str(Path(tmp) / f"{s}-{seed}"),
                      "--shots", str(s), "--seed", str(seed), *common])
        separate = time.perf_counter() - start
    steps = sum((epochs or published_epochs(s, k)) * batches_per_epoch(k * s, 32) for s in shots) * len(seeds)
    row = {"dataset": dataset, "classes": k, "runs": len(shots) * len(seeds), "steps": steps, "epochs": epochs,
           "sweep_seconds": sweep, "unstacked_sweep_seconds": unstacked, "separate_seconds": separate,
           "separate_vs_sweep": separate / sweep,
           "published_estimate_seconds": published_step_ms * steps / 1000}
    print(f"  sweep {dataset}, {row['runs']} runs ({steps} steps): one sweep {sweep:.1f} s (runs one by one "
          f"{unstacked:.1f} s), separate processes "
          f"{separate:.1f} s ({row['separate_vs_sweep']:.1f}×), published ≈ {row['published_estimate_seconds']:.0f} s",
          flush=True)
    return row


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[2:4])} failed: {done.stderr.strip()[-500:]}")
