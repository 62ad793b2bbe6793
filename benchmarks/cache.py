"""`fastcoop cache` on real-size JPEGs: the whole command, against its two halves measured alone in the same run —
decoding and cropping the views (worker processes, no encoder) and the image encoder on pre-decoded pixels."""

import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import median_ms
from fastcoop.cache.crops import crop_boxes, resized_crops
from fastcoop.cache.encoder import ImageEncoder
from fastcoop.cache.plan import default_workers
from fastcoop.cache.views import ImageViews, split_eval_transform, view_seed
from fastcoop.devices import autocast_dtype
from fastcoop.models import load_model, preprocess_config


def write_jpegs(root: Path, images: int, classes: int = 10, size=(500, 375)) -> Path:
    """`images` photo-sized JPEGs (quality 90) in root/<class>/: smooth colour fields with fine grain, so that
    decoding costs about what a photo's does."""
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / f"class_{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        grain = rng.normal(0, 12, (size[1], size[0], 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def decode_views_per_second(paths: list[str], loaded, views: int, workers: int, engine: str = "pil") -> float:
    """Views per second that `workers` processes hand over, the encoder left out: decoded and cut ('pil'), or
    decoded with their boxes drawn ('device', which cuts them where the encoder runs)."""
    pre = preprocess_config(loaded.model)
    eval_image, _ = split_eval_transform(loaded.preprocess)
    dataset = ImageViews(paths, eval_image, views, "train", pre["size"], engine)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=workers)
    start = time.perf_counter()
    for _ in loader:
        pass
    return len(paths) * (1 + views) / (time.perf_counter() - start)


def device_crop_views_per_second(paths: list[str], loaded, views: int, device: str, images: int = 8) -> float:
    """Views per second that the 'device' crop engine cuts from decoded images already on the device."""
    pre = preprocess_config(loaded.model)
    decoded = []
    for i, path in enumerate(paths[:images]):
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        seeds = [view_seed("train", i, v) for v in range(1, 1 + views)]
        decoded.append((torch.from_numpy(np.array(rgb)).permute(2, 0, 1).to(device),
                        *crop_boxes(rgb.height, rgb.width, seeds, pre["size"])))
    ms = median_ms(lambda: [resized_crops(*cut, pre["size"]) for cut in decoded], device, repeats=3)
    return len(decoded) * views / (ms / 1000)


def encoder_views_per_second(loaded, device: str, batch: int, precision: str, repeats: int,
                             graph: bool = False) -> tuple[float, float]:
    """(views per second, peak GPU GB) of the encoder as extraction calls it (normalisation included; `graph`:
    replayed from a CUDA graph) on pixels already on the device, the features read back."""
    pre = preprocess_config(loaded.model)
    _, normalize = split_eval_transform(loaded.preprocess)
    pixels = torch.randint(0, 256, (batch, 3, *pre["size"]), dtype=torch.uint8, device=device)
    on_gpu = device.startswith("cuda")
    encoder = ImageEncoder(loaded.model, normalize, batch, device, autocast_dtype(precision), graph=graph)
    encoder(pixels).cpu()  # warm-up (and the graph's capture)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encoder(pixels).cpu()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 1e9 if on_gpu else None
    return batch / sorted(times)[len(times) // 2], peak


def run_cache_section(device: str, model: str, images: int, views: int, batch: int, repeats: int) -> dict:
    precision = "fp16" if device.startswith("cuda") else "fp32"
    workers = default_workers(device)
    loaded = load_model(model, "none", device)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_jpegs(Path(tmp) / "images", images)
        paths = sorted(str(p) for p in root.rglob("*.jpg"))
        random.Random(0).shuffle(paths)
        crops = "device" if device.startswith("cuda") else "pil"  # what `fastcoop cache` picks by default
        decode = decode_views_per_second(paths, loaded, views, workers, crops)
        device_crops = device_crop_views_per_second(paths, loaded, views, device) if crops == "device" else None
        encoder, encoder_gb = encoder_views_per_second(loaded, device, batch, precision, repeats)
        graphed = encoder_views_per_second(loaded, device, batch, precision, repeats, graph=True)[0] \
            if device.startswith("cuda") else None
        command = [sys.executable, "-m", "fastcoop", "cache", str(root), "--out", str(Path(tmp) / "f.h5"),
                   "--model", model, "--pretrained", "none", "--shots", "all", "--splits", "train", "--split-ratios", "none",
                   "--views", str(views), "--batch-size", str(batch), "--device", device]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"fastcoop cache failed: {done.stderr.strip()[-500:]}")
        match = re.search(r"\(([0-9.]+) s\)$", done.stdout.strip())  # the command's own extraction time
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # kB → GB, largest process
        file_gb = (Path(tmp) / "f.h5").stat().st_size / 1e9
    total = images * (1 + views)
    row = {"model": model, "images": images, "views_per_image": 1 + views, "batch": batch, "workers": workers,
           "crops": crops, "device_crop_views_per_s": device_crops, "encoder_graph_views_per_s": graphed,
           "precision": precision, "process_seconds": wall, "images_per_s": images / wall,
           "views_per_s": total / wall, "extract_seconds": float(match.group(1)) if match else None, "decode_views_per_s": decode, "encoder_views_per_s": encoder,
           "process_vs_encoder": total / wall / encoder, "peak_rss_gb": peak_rss, "encoder_gpu_gb": encoder_gb,
           "file_gb": file_gb}
    row["extract_views_per_s"] = total / row["extract_seconds"] if match else None
    print(f"  cache {model}, {images} JPEGs × {1 + views} views: {wall:.1f} s for the whole command, "
          f"{row['extract_seconds']} s extracting "
          f"({row['views_per_s']:.1f} views/s = {row['process_vs_encoder']:.0%} of the encoder alone, "
          f"{encoder:.1f} views/s); the workers alone ({crops} crops) {decode:.0f} views/s"
          + (f", device crops alone {device_crops:.0f} views/s" if device_crops else ""), flush=True)
    return row
