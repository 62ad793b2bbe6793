"""Whole `fastcoop train` runs with the paper's 16-shot schedule on synthetic caches shaped like its 11 datasets."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from safetensors.torch import save_file

from benchmarks.common import classnames_of
from fastcoop.cache.plan import auto_views
from fastcoop.cache.writer import feature_chunks
from fastcoop.cache.store import SCHEMA_VERSION
from fastcoop.run_files import RESULTS_FILE
from fastcoop.schedule import published_epochs
from fastcoop.training import batches_per_epoch

DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
            "sun397", "dtd", "eurosat", "ucf101")
FEATURE_DIM = {"ViT-B-16": 512, "RN50": 1024}


def write_synthetic_cache(path: Path, dataset: str, model: str = "ViT-B-16", shots: int | list[int] = 16,
                          seeds: list[int] = (1, 2, 3), weights: str = "none", views: int | None = None,
                          eval_per_class: dict[str, int] | None = None) -> int:
    """A valid feature cache with random features and real class names, shaped as `fastcoop cache` makes it (by
    default for 16 shots and seeds 1, 2, 3), so that a run reads what a default run reads: a subset for every
    (shots, seed), each its own images (as in a dataset with many images per class), and as many augmented views
    per image as the longest published schedule has epochs (or `views`); `weights`: the model's weights (a
    checkpoint path, or 'none'); `eval_per_class`: val and test splits too, this many images per class (their
    eval view alone). Returns the number of classes."""
    names = classnames_of(dataset)
    shot_list = [shots] if isinstance(shots, int) else list(shots)
    per_class = sum(shot_list) * len(seeds)
    n = len(names) * per_class
    views = auto_views(shot_list, len(names)) if views is None else views
    eval_per_class = eval_per_class or {}
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs.update({
            "schema_version": SCHEMA_VERSION, "complete": True, "model": model, "pretrained": weights,
            "open_clip_version": "synthetic", "preprocessing": "{}", "classnames": json.dumps(names),
            "dataset_fingerprint": f"synthetic-{dataset}", "splits": json.dumps(["train", *eval_per_class]),
            "views": views,
            "subsets_requested": json.dumps({"shots": shots, "seeds": list(seeds)}),
        })
        shape = (1 + views, n, FEATURE_DIM[model])  # chunked as `fastcoop cache` writes its default batches
        chunks = feature_chunks(*shape, max(1, 256 // shape[0]))
        features = f.create_dataset("train/features", shape, dtype=np.float16, chunks=chunks)
        for lo in range(0, n, chunks[1]):  # a chunk at a time: the whole array in float64 would take gigabytes
            rows = min(n, lo + chunks[1]) - lo
            features[:, lo:lo + rows] = rng.standard_normal((shape[0], rows, shape[2]), np.float32).astype(np.float16)
        f["train/labels"] = np.repeat(np.arange(len(names)), per_class)
        f["train/paths"] = np.array([f"synthetic/{i}.jpg" for i in range(n)], dtype=object).astype("S")
        drawn = np.stack([c * per_class + rng.permutation(per_class) for c in range(len(names))])
        first = 0  # each subset takes the next images of every class's shuffled rows
        for s in shot_list:
            for seed in seeds:
                f[f"train/subsets/shots{s}_seed{seed}"] = drawn[:, first:first + s].ravel()
                first += s
        for split, count in eval_per_class.items():
            f[f"{split}/features"] = rng.standard_normal((1, len(names) * count, shape[2]), np.float32).astype(
                np.float16)
            if split == "val":  # each subset's val images: min(shots, 4) per class, as `fastcoop cache` keeps them
                for s in shot_list:
                    for seed in seeds:
                        f[f"val/subsets/shots{s}_seed{seed}"] = np.concatenate(
                            [c * count + np.arange(min(s, 4, count)) for c in range(len(names))])
            f[f"{split}/labels"] = np.repeat(np.arange(len(names)), count)
            f[f"{split}/paths"] = np.array([f"synthetic/{split}/{i}.jpg" for i in range(len(names) * count)],
                                           dtype=object).astype("S")
    return len(names)


def save_checkpoint(model: torch.nn.Module, folder: str | Path) -> str:
    """The model's weights as a safetensors file: a full run then loads them by path, as a user's real weights
    load (random init, 'none', takes a different and slower path)."""
    path = Path(folder).resolve() / "weights.safetensors"
    save_file({name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}, path)
    return str(path)


def schedule(dataset: str, shots: int = 16) -> tuple[int, int]:
    """(epochs, steps) of the paper's schedule for this dataset."""
    k = len(classnames_of(dataset))
    epochs = published_epochs(shots, k)
    return epochs, epochs * batches_per_epoch(k * shots, 32)


# parts of the loop's time, not stages of their own
INSIDE_LOOP = ("first_epoch_s", "kernels_s", "capture_s")


def derived_times(wall: float, timings: dict, steps: int, epochs: int) -> dict:
    """What the stage times imply: the interpreter's own start and exit, and the loop's time per step after its
    first epoch (which holds the kernels' compilation or loading and the graph capture). The host enqueues
    steps without waiting, so only whole-loop times measure the device's steps."""
    stages = sum(t for name, t in timings.items() if name not in INSIDE_LOOP)
    after_first = timings["loop_s"] - timings["first_epoch_s"]
    return {"interpreter_seconds": wall - stages,
            "start_to_loop_seconds": wall - timings["loop_s"] - timings["save_and_test_s"],
            "loop_ms_per_step": 1000 * after_first / (steps - steps // epochs) if epochs > 1 else None}


def help_seconds() -> float:
    """Wall time of `fastcoop --help`: what every command pays before its own work."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fastcoop", "--help"], check=True, capture_output=True)
    return time.perf_counter() - start


# what `fastcoop train` imports, in the order it first imports them, and the packages inside them worth naming
IMPORT_STAGES = ("torch", "open_clip", "fastcoop.pipeline")
IMPORTS_INSIDE = {"open_clip": ("torchvision", "torch._dynamo", "timm")}


def import_seconds() -> dict:
    """Where `fastcoop train`'s import time goes: seconds for torch, then open_clip (of which torchvision, the
    torch._dynamo that torchvision imports, and timm), then fastcoop's own modules and the rest they import
    (Triton, h5py, ...), imported in a fresh process as the CLI imports them (cyclic GC paused). `python -X
    importtime` adds its own overhead: compare the parts, not the total with the stage times."""
    code = "import gc; gc.disable(); " + "; ".join(f"import {name}" for name in IMPORT_STAGES)
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                          check=True)
    cumulative = {}
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, total, name = line.split("|")
            if total.strip().isdigit():
                cumulative.setdefault(name.strip(), int(total) / 1e6)
    seconds = {name: cumulative.get(name, 0.0) for name in IMPORT_STAGES}
    for outer, inner in IMPORTS_INSIDE.items():
        seconds |= {f"{outer}: {name}": cumulative.get(name, 0.0) for name in inner}
    return seconds


def compiled_kernels(folder: str | Path) -> int:
    """GPU binaries in a Triton cache folder: how many kernel variants have been compiled into it."""
    return sum(1 for path in Path(folder).rglob("*") if path.suffix in (".cubin", ".hsaco"))


def run_fastcoop_train(dataset: str, device: str, model: str = "ViT-B-16", kernel_cache: str | None = None,
                       options: tuple[str, ...] = (), weights: str = "none") -> dict:
    """`fastcoop train` as a user runs it: wall time from process start to finish, split by the stages the run
    records (imports, model, setup, loop with its first epoch, save and test); the rest is the interpreter's start
    and exit. `kernel_cache`: Triton's cache folder (a fresh one times a cold first run; the row counts the kernel
    variants the run compiled into it: a warm run that compiles any met shapes it had not met); `options`: more
    `fastcoop train` options (e.g. --method cocoop); `weights`: a checkpoint path (save_checkpoint), or 'none'."""
    env = os.environ | ({"TRITON_CACHE_DIR": kernel_cache} if kernel_cache else {})
    compiled_before = compiled_kernels(kernel_cache) if kernel_cache else None
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / f"{dataset}.h5"
        k = write_synthetic_cache(cache, dataset, model, weights=weights)
        command = [sys.executable, "-m", "fastcoop", "train", str(cache), "--out", str(Path(tmp) / "run"),
                   "--shots", "16", "--seed", "1", "--device", device, *options]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"fastcoop train failed on {dataset}: {done.stderr.strip()[-500:]}")
        results = json.loads((Path(tmp) / "run" / RESULTS_FILE).read_text())
    timings = results["timings"]
    compiled = compiled_kernels(kernel_cache) - compiled_before if kernel_cache else None
    return {"dataset": dataset, "classes": k, "epochs": results["epochs"], "steps": results["steps"],
            "kernels_compiled": compiled,
            "process_seconds": wall, **{name.removesuffix("_s") + "_seconds": t for name, t in timings.items()},
            **derived_times(wall, timings, results["steps"], results["epochs"]),
            "warnings": [line.strip() for line in done.stderr.splitlines() if "warning" in line.lower()][:5]}
