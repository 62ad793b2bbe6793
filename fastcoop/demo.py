"""`fastcoop demo`: the pipeline end to end on the built-in example, with the time of each stage."""

import json
import time
import warnings
from pathlib import Path

import click

from fastcoop.cache import FeatureCache, extract_features
from fastcoop.config import Recipe, Runtime
from fastcoop.datasets import read_dataset
from fastcoop.devices import resolve_device
from fastcoop.errors import FastCoopError
from fastcoop.classifiers import text_classifier
from fastcoop.evaluate import evaluate_split
from fastcoop.example import make_example_images
from fastcoop.models import load_model, resolve_model_name
from fastcoop.outputs import check_writable, held
from fastcoop.pipeline import train_to_run_dir
from fastcoop.report import collect, summary_table
from fastcoop.run_files import FIGURE_FILE, RESULTS_FILE, TABLE_FILE
from fastcoop.sweep import Variant, run_sweep
from fastcoop.zeroshot import zeroshot_classifier


DEMO_VIEWS = 1
SHOTS = (1, 2, 4, 8)  # the example has 16 train images per class
COCOOP_EPOCHS = 2  # of the published 10, to keep the demo quick on a CPU


def _load_demo_model(model: str, pretrained: str, device: str):
    """Pretrained weights when they can be had (a local file or cache, or the hub), else random init, said."""
    try:
        return load_model(model, pretrained, device)
    except FastCoopError as exc:
        if pretrained == "none":
            raise
        click.echo(f"{exc}.")
        click.echo("Using RANDOM-INIT weights instead: the accuracies below mean nothing.")
        return load_model(model, "none", device)


def run_demo(folder: str | Path, model: str = "ViT-B-32", pretrained: str = "openai", device: str = "auto",
             epochs: int = 40):
    """Example images → feature cache → zero-shot → the paper's protocol (CoOp at 1–8 shots beside the linear
    probe, with its table and figure) → base-to-new with CoOp and CoCoOp, timing each stage."""
    folder = Path(folder)
    check_writable(folder, "demo folder", folder=True, option="--dir")
    device = resolve_device(device)
    resolve_model_name(model)  # an unknown architecture is an error before anything is written
    with held(folder, "--dir"):  # one demo per folder at a time
        _run_demo(folder, model, pretrained, device, epochs)


def _run_demo(folder: Path, model: str, pretrained: str, device: str, epochs: int):
    times = {}

    def stage(name, start):
        times[name] = time.perf_counter() - start

    start = time.perf_counter()
    images = make_example_images(folder / "images", test_per_class=4, val_per_class=4)
    loaded = _load_demo_model(model, pretrained, device)
    stage("example images + model", start)

    start = time.perf_counter()
    cache_path = extract_features(read_dataset(images), folder / "features.h5", loaded,
                                  splits=("train", "val", "test"), shots=list(SHOTS), seeds=[1], views=DEMO_VIEWS,
                                  batch_size=64, workers=0, device=device, overwrite=True)
    stage("cache (encode images once)", start)
    with FeatureCache(cache_path) as cache, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the cache holds")  # said once below, in the demo's own words
        click.echo(f"cached {len(cache.classnames)} classes into {cache_path}: "
                   + ", ".join(f"{s} {cache.labels(s).numel()} images" for s in cache.splits))
        start = time.perf_counter()
        zero_shot = evaluate_split(cache, text_classifier(zeroshot_classifier(loaded, cache.classnames, device=device)))
        stage("zero-shot 'a photo of a {}.'", start)

        start = time.perf_counter()
        sweep_dir = folder / "sweep"  # the demo's own sweep, remade each time (its cache is new)
        base, runtime = Recipe(epochs=epochs), Runtime(device=device)
        variant = Variant("coop", n_ctx=4, init="a photo of a")
        summary = run_sweep(cache, loaded, sweep_dir, list(SHOTS), [1], [variant], base, runtime, echo=lambda _: None,
                            overwrite=True)
        steps = sum(json.loads((Path(r["run"]) / RESULTS_FILE).read_text())["steps"] for r in summary["runs"])
        spent = summary["seconds"]
        times[f"CoOp at {len(SHOTS)} shot counts ({steps} steps)"] = spent["runs"]
        times[f"linear probe at {len(SHOTS)} shot counts"] = spent["linear probe"]
        times["sweep's zero-shot, table, figure"] = time.perf_counter() - start - spent["runs"] - spent["linear probe"]

        start = time.perf_counter()  # the base-to-new protocol: CoOp and CoCoOp trained on the first 6 classes
        base_to_new, steps = [], 0
        for method, recipe in (("coop", Recipe(shots=8, seed=1, n_ctx=4, init="a photo of a", epochs=epochs,
                                               classes="base")),
                               ("cocoop", Recipe(method="cocoop", shots=8, seed=1, epochs=COCOOP_EPOCHS,
                                                 classes="base"))):
            base_to_new.append(folder / f"base-to-new-{method}")
            steps += train_to_run_dir(cache, loaded, recipe, base_to_new[-1], runtime, overwrite=True)[1]["steps"]
        stage(f"base-to-new ×2 ({steps} steps)", start)
    meaningless = "  [random-init weights: meaningless]" if loaded.random_init else ""
    eight_shot = next(r["test"] for r in summary["runs"] if r["shots"] == max(SHOTS))
    click.echo(f"zero-shot test accuracy: {zero_shot['top1']:.1%}; CoOp test accuracy: {eight_shot:.1%} at "
               f"{max(SHOTS)} shots (12 classes, chance 8.3%){meaningless}")
    click.echo(f"(to stay quick the demo caches {DEMO_VIEWS} augmented view(s) per image and cycles them over its "
               f"{epochs} epochs; `fastcoop cache` defaults to a fresh view every epoch, as published)")
    click.echo("the paper's protocol, one seed (`fastcoop sweep`):")
    click.echo((sweep_dir / TABLE_FILE).read_text().rstrip())
    click.echo(f"figure: {sweep_dir / FIGURE_FILE}")
    click.echo(f"base-to-new (trained on 6 base classes, tested on them and on the 6 new ones; CoCoOp "
               f"{COCOOP_EPOCHS} of its 10 epochs, batch 1):")
    click.echo(summary_table(collect(base_to_new)))
    click.echo(f"runs in {sweep_dir} and {folder}/base-to-new-*; stage times:")
    for name, seconds in times.items():
        click.echo(f"  {name:<34s} {seconds:6.1f} s")
