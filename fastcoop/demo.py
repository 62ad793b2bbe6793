"""`fastcoop demo`: the pipeline end to end on the built-in example, with the time of each stage."""

import socket
import time
from pathlib import Path

import click

from fastcoop.cache import FeatureCache, extract_features
from fastcoop.data import read_dataset
from fastcoop.devices import resolve_device
from fastcoop.errors import FastCoopError
from fastcoop.example import make_example_images
from fastcoop.models import load_model


def _hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def _load_demo_model(model: str, pretrained: str, device: str):
    """Pretrained weights when they can be had (local file, or hub reachable), else random init with a warning."""
    try:
        if Path(pretrained).exists() or pretrained == "none" or _hub_reachable():
            return load_model(model, pretrained, device)
        reason = "no network access"
    except FastCoopError as exc:
        reason = str(exc)
    if pretrained != "none":
        click.echo(f"could not load {model} '{pretrained}' weights ({reason}).")
        click.echo("Using RANDOM-INIT weights instead: the accuracies below mean nothing.")
        return load_model(model, "none", device)


def run_demo(folder: str | Path, model: str = "ViT-B-32", pretrained: str = "openai", device: str = "auto"):
    folder = Path(folder)
    device = resolve_device(device)
    times = {}
    start = time.perf_counter()
    images = make_example_images(folder / "images")
    loaded = _load_demo_model(model, pretrained, device)
    times["example images + model"] = time.perf_counter() - start

    start = time.perf_counter()
    cache_path = extract_features(read_dataset(images), folder / "features.h5", loaded, shots=8, seeds=[1],
                                  views=0, batch_size=64, workers=0, device=device, overwrite=True)
    times["cache"] = time.perf_counter() - start
    with FeatureCache(cache_path) as cache:
        click.echo(f"cached {len(cache.classnames)} classes into {cache_path}: "
                   + ", ".join(f"{s} {cache.labels(s).numel()} images" for s in cache.splits))
    for stage, seconds in times.items():
        click.echo(f"  {stage:<28s} {seconds:6.1f} s")
