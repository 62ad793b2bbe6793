"""The paper's protocol for one dataset as a user runs it: `fastcoop cache` of real-size JPEGs (the default views
for shots 1, 2, 4, 8, 16 and seeds 1, 2, 3, and the test split) and `fastcoop sweep` (the 15 runs), timed as whole
processes, beside the published code's estimate for the same 15 runs: its measured step (image encoder on the
batch's augmented images and the text encoder on K 77-token prompts, data loading left out) times its steps, plus
one start-up per run (importing torch and open_clip, measured here)."""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.cache import write_jpegs
from fastcoop.schedule import published_epochs
from fastcoop.training import batches_per_epoch

# classes, train and test JPEGs per class, their size: each dataset's shape (train: enough distinct images for the
# subsets of every shot count and seed; test: the dataset's own test images per class)
SHAPES = {"eurosat": (10, 60, 810, (64, 64)), "caltech101": (100, 60, 25, (300, 200)),
          "imagenet": (1000, 60, 50, (500, 375))}


def run_protocol_section(dataset: str, device: str, published_step_ms: float, startup_seconds: float,
                         quick: bool = False, model: str = "ViT-B-16") -> dict:
    """Whole-process wall times of the protocol's cache and sweep on generated JPEGs; `quick`: a CPU-sized
    version (2 shot counts × 2 seeds, 2 views, 2 epochs, a few small images) that checks the section runs."""
    classes, train, test, size = SHAPES[dataset]
    shots, seeds = ([1, 2], [1, 2]) if quick else ([1, 2, 4, 8, 16], [1, 2, 3])
    if quick:
        train, test, size = 6, 2, (64, 48)
    cache_options = ["--views", "2"] if quick else []
    sweep_options = ["--epochs", "2"] if quick else []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / dataset
        start = time.perf_counter()
        write_jpegs(root / "train", classes * train, classes, size)
        write_jpegs(root / "test", classes * test, classes, size)
        writing = time.perf_counter() - start
        cache, sweep = Path(tmp) / f"{dataset}.h5", Path(tmp) / "sweep"
        listed = ["--shots", ",".join(map(str, shots)), "--seeds", ",".join(map(str, seeds)), "--device", device]
        start = time.perf_counter()
        cached = _run(["cache", str(root), "--out", str(cache), "--model", model, "--pretrained", "none",
                       *listed, *cache_options])
        cache_seconds = time.perf_counter() - start
        start = time.perf_counter()
        _run(["sweep", str(cache), "--out", str(sweep), *listed, *sweep_options])
        sweep_seconds = time.perf_counter() - start
    steps = sum((2 if quick else published_epochs(s, classes)) * batches_per_epoch(classes * s, 32)
                for s in shots) * len(seeds)
    runs = len(shots) * len(seeds)
    published = published_step_ms * steps / 1000 + runs * startup_seconds
    row = {"dataset": dataset, "model": Path(model).stem, "classes": classes, "quick": quick, "image_size": list(size),
           "train_images_per_class": train, "test_images_per_class": test, "runs": runs, "steps": steps,
           "jpeg_writing_seconds": writing, "cache_seconds": cache_seconds, "sweep_seconds": sweep_seconds,
           "protocol_seconds": cache_seconds + sweep_seconds, "cache_output": cached.strip().splitlines()[-1],
           "published_step_ms": published_step_ms, "published_startup_seconds": startup_seconds,
           "published_estimate_seconds": published,
           "published_vs_protocol": published / (cache_seconds + sweep_seconds)}
    print(f"  protocol {dataset}{' (quick)' if quick else ''}, {runs} runs: cache {cache_seconds:.1f} s + sweep "
          f"{sweep_seconds:.1f} s = {row['protocol_seconds']:.1f} s; published ≈ {published:.0f} s "
          f"({steps} steps × {published_step_ms:.1f} ms + {runs} × {startup_seconds:.1f} s start-up): "
          f"{row['published_vs_protocol']:.1f}×", flush=True)
    return row


def startup_seconds() -> float:
    """A process's start-up as the published code pays it at least: Python, then importing torch and open_clip."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, open_clip"], check=True, capture_output=True)
    return time.perf_counter() - start


def _run(arguments: list[str]) -> str:
    done = subprocess.run([sys.executable, "-m", "fastcoop", *arguments], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"fastcoop {arguments[0]} failed: {done.stderr.strip()[-500:]}")
    return done.stdout
