"""`fastcoop demo`: the pipeline end to end on the built-in example, with the time of each stage."""

import shutil
import socket
import time
import warnings
from pathlib import Path

import click

from fastcoop.cache import FeatureCache, extract_features
from fastcoop.data import read_dataset
from fastcoop.devices import resolve_device
from fastcoop.errors import FastCoopError
from fastcoop.evaluate import evaluate_split
from fastcoop.example import make_example_images
from fastcoop.models import load_model
from fastcoop.pipeline import train_to_run_dir
from fastcoop.train import TrainConfig
from fastcoop.zeroshot import zeroshot_classifier


DEMO_VIEWS = 2


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


def run_demo(folder: str | Path, model: str = "ViT-B-32", pretrained: str = "openai", device: str = "auto",
             epochs: int = 50):
    """Example images → feature cache → zero-shot → CoOp training → evaluation, timing each stage."""
    folder = Path(folder)
    device = resolve_device(device)
    times = {}

    def stage(name, start):
        times[name] = time.perf_counter() - start

    start = time.perf_counter()
    images = make_example_images(folder / "images")
    loaded = _load_demo_model(model, pretrained, device)
    stage("example images + model", start)

    start = time.perf_counter()
    cache_path = extract_features(read_dataset(images), folder / "features.h5", loaded, shots=8, seeds=[1],
                                  views=DEMO_VIEWS, batch_size=64, workers=0, device=device, overwrite=True)
    stage("cache (encode images once)", start)
    with FeatureCache(cache_path) as cache:
        click.echo(f"cached {len(cache.classnames)} classes into {cache_path}: "
                   + ", ".join(f"{s} {cache.labels(s).numel()} images" for s in cache.splits))
        start = time.perf_counter()
        zero_shot = evaluate_split(cache, zeroshot_classifier(loaded, cache.classnames, device=device))
        stage("zero-shot 'a photo of a {}.'", start)

        start = time.perf_counter()
        config = TrainConfig(shots=8, seed=1, n_ctx=4, init="a photo of a", epochs=epochs, device=device)
        run_dir = folder / "run"
        shutil.rmtree(run_dir, ignore_errors=True)  # the demo's own output, remade each time
        with warnings.catch_warnings():  # said once below, in the demo's own words
            warnings.filterwarnings("ignore", message="the cache holds")
            _, results = train_to_run_dir(cache, loaded, config, run_dir, progress=False)
        stage(f"CoOp train + evaluate ({results['steps']} steps)", start)
        learned = results["test"]
    click.echo(f"zero-shot test accuracy: {zero_shot['top1']:.1%}; CoOp test accuracy: {learned['top1']:.1%} "
               f"(12 classes, chance 8.3%){'  [random-init weights: meaningless]' if loaded.random_init else ''}")
    click.echo(f"(to stay quick the demo caches {DEMO_VIEWS} augmented views per image and cycles them over its "
               f"{epochs} epochs; `fastcoop cache` defaults to a fresh view every epoch, as published)")
    click.echo(f"learned prompt in {run_dir}; stage times:")
    for name, seconds in times.items():
        click.echo(f"  {name:<32s} {seconds:6.1f} s")
