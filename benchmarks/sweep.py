"""`fastcoop sweep` (the paper's protocol for one dataset: shot counts × seeds, all in one stack) against its
largest run alone, the same sweep of two variants (`--csc no,yes`: twice the runs, one stack), the same sweep one
run at a time (`--no-stack`), the same runs as separate `fastcoop train` processes, and the published estimate, on
synthetic caches shaped like the datasets."""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.full_run import write_synthetic_cache
from fastcoop.schedule import published_epochs
from fastcoop.training import batches_per_epoch


def run_sweep_section(dataset: str, device: str, shots: list[int], seeds: list[int], published_step_ms: float,
                      epochs: int | None = None, alone: bool = True) -> dict:
    """Whole-process wall times: one sweep (a stack of all its runs); its largest run alone (the most shots, the
    first seed), what the stacked protocol is measured against; and, with `alone`, the same sweep one run at a
    time and one `fastcoop train` process per run. `epochs`: a shorter schedule than the published one (a
    CPU-sized check of the overhead each process pays)."""
    common = ["--n-ctx", "16", "--device", device] + (["--epochs", str(epochs)] if epochs else [])
    unstacked = separate = None
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / f"{dataset}.h5"
        k = write_synthetic_cache(cache, dataset, shots=shots, seeds=seeds)
        sweep_args = ["--shots", ",".join(map(str, shots)), "--seeds", ",".join(map(str, seeds)), *common]
        sweep = _timed(["sweep", str(cache), "--out", str(Path(tmp) / "sweep"), *sweep_args])
        largest = _timed(["train", str(cache), "--out", str(Path(tmp) / "largest"), "--shots", str(max(shots)),
                          "--seed", str(seeds[0]), *common])
        variants = _timed(["sweep", str(cache), "--out", str(Path(tmp) / "variants"), *sweep_args, "--csc", "no,yes"])
        if alone:
            unstacked = _timed(["sweep", str(cache), "--out", str(Path(tmp) / "one-by-one"), *sweep_args,
                                "--no-stack"])
            separate = sum(_timed(["train", str(cache), "--out", str(Path(tmp) / f"{s}-{seed}"), "--shots", str(s),
                                   "--seed", str(seed), *common]) for s in shots for seed in seeds)
    steps = sum((epochs or published_epochs(s, k)) * batches_per_epoch(k * s, 32) for s in shots) * len(seeds)
    row = {"dataset": dataset, "classes": k, "runs": len(shots) * len(seeds), "steps": steps, "epochs": epochs,
           "sweep_seconds": sweep, "largest_run_seconds": largest, "sweep_vs_largest_run": sweep / largest,
           "two_variants_seconds": variants, "two_variants_vs_sweep": variants / sweep,
           "unstacked_sweep_seconds": unstacked, "separate_seconds": separate,
           "separate_vs_sweep": separate and separate / sweep,
           "published_estimate_seconds": published_step_ms * steps / 1000}
    print(f"  sweep {dataset}, {row['runs']} runs ({steps} steps): one sweep {sweep:.1f} s = "
          f"{row['sweep_vs_largest_run']:.2f}× its {max(shots)}-shot run alone ({largest:.1f} s); two variants "
          f"{variants:.1f} s ({row['two_variants_vs_sweep']:.2f}×)"
          + (f"; runs one by one {unstacked:.1f} s, separate processes {separate:.1f} s "
             f"({row['separate_vs_sweep']:.1f}×)" if alone else "")
          + f"; published ≈ {row['published_estimate_seconds']:.0f} s", flush=True)
    return row


PROMPT_METHODS = ("coop", "kgcoop", "prograd")  # the methods that run the text encoder every step
FEATURE_METHODS = ("clip-adapter", "taskres", "zs-lp", "clap", "lp++")
BASELINES = ("linear-probe", "tip-adapter", "tip-adapter-f")


def run_table_section(dataset: str, shots: list[int], seeds: list[int], device: str) -> dict:
    """A paper's whole table in one `fastcoop sweep` (every method but CoCoOp, whose protocol is base-to-new, and
    every baseline, each at its published recipe) on a synthetic cache shaped like `dataset` with val and test
    splits: the whole process; and the share of what is not a prompt learner, from a second sweep of those methods
    alone and the first sweep's baseline seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / f"{dataset}.h5"
        k = write_synthetic_cache(cache, dataset, shots=shots, seeds=seeds, eval_per_class={"val": 4, "test": 20})
        runs = ["--shots", ",".join(map(str, shots)), "--seeds", ",".join(map(str, seeds)), "--device", device]
        whole = _timed(["sweep", str(cache), "--out", str(Path(tmp) / "table"), *runs, "--method",
                        ",".join(PROMPT_METHODS + FEATURE_METHODS), "--baselines", ",".join(BASELINES)])
        seconds = json.loads((Path(tmp) / "table" / "summary.json").read_text())["seconds"]
        features = _timed(["sweep", str(cache), "--out", str(Path(tmp) / "features"), *runs, "--method",
                           ",".join(FEATURE_METHODS), "--baselines", "none"])
    baselines = sum(v for key, v in seconds.items() if key not in ("runs", "zero_shot"))
    row = {"dataset": dataset, "classes": k, "runs": len(shots) * len(seeds) * (len(PROMPT_METHODS) +
                                                                                len(FEATURE_METHODS)),
           "methods": list(PROMPT_METHODS + FEATURE_METHODS), "baselines": list(BASELINES),
           "sweep_seconds": whole, "summary_seconds": seconds, "feature_methods_sweep_seconds": features,
           "not_prompt_share": (features + baselines) / whole}
    print(f"  table {dataset}: {row['runs']} runs and {len(BASELINES)} baselines × {len(shots) * len(seeds)} "
          f"subsets in one sweep {whole:.1f} s; the feature methods alone {features:.1f} s, the baselines "
          f"{baselines:.1f} s: {row['not_prompt_share']:.0%} of the sweep", flush=True)
    return row


def _timed(arguments: list[str]) -> float:
    start = time.perf_counter()
    _run([sys.executable, "-m", "fastcoop", *arguments])
    return time.perf_counter() - start


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[2:4])} failed: {done.stderr.strip()[-500:]}")
