"""The `fastcoop` command line: a thin layer over the Python API; bad input is one line on stderr and exit code 2."""

import dataclasses
import gc
import itertools
import logging
import os
import signal
import sys
import warnings
import time
import typing
from contextlib import contextmanager
from pathlib import Path

import click

from fastcoop import machine, methods
from fastcoop.config import Recipe, Runtime, option_fields, parse_impl_detail, resolve_precision
from fastcoop.datasets import DATASETS
from fastcoop.errors import FastCoopError


@contextmanager
def _importing():
    """Import a command's modules with the cyclic garbage collector paused, then freeze what they made. Importing
    torch and open_clip makes about a million long-lived objects, which the collector would otherwise scan again
    and again while importing and once more at exit (together a third of a short command's start and exit). Only
    the process's first import of torch is managed; a caller that imported it already is left as it is."""
    if "torch" in sys.modules:
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _int_list(value: str, option: str) -> list[int]:
    try:
        numbers = [int(v) for v in value.split(",")]  # an empty item ('1,,2') is a typo, not nothing
    except ValueError:
        numbers = []
    if not numbers:
        raise FastCoopError(f"{option} must be comma-separated integers such as 1,2,3, not '{value}'")
    return numbers


class _Shots(click.ParamType):
    """A shot count: a positive integer, or 'all' (None: the whole train split)."""

    name = "shots"

    def convert(self, value, param, ctx):
        from fastcoop.fewshot import parse_shots

        if value is None or isinstance(value, int):
            return value
        try:
            return parse_shots(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class _ImplDetail(click.ParamType):
    """--impl-detail's 'op=choice,...', checked against the ops and their implementations."""

    name = "op=choice,..."

    def convert(self, value, param, ctx):
        return value if isinstance(value, tuple) else parse_impl_detail(value)


def _field_options(cls, names: tuple[str, ...], **overrides):
    """The click options of a Recipe's or Runtime's fields `names`, declared once in their metadata
    (fastcoop.config.option); `overrides`: a field's metadata changed for this command."""
    def decorate(command):
        for f in reversed(option_fields(cls, names)):
            settings = {**f.metadata, **overrides.get(f.name, {})}
            kind, choices = settings.pop("kind", None), settings.pop("choices", None)
            low, min_open = settings.pop("min", None), settings.pop("min_open", False)
            numeric = float if float in (f.type, *typing.get_args(f.type)) else int
            if kind is not None:
                settings["type"] = {"shots": _Shots(), "impl_detail": _ImplDetail()}[kind]
            elif choices:
                settings["type"] = click.Choice(choices)
            elif low is not None:
                settings["type"] = (click.FloatRange(min=low, min_open=min_open) if numeric is float else
                                    click.IntRange(min=low))
            elif f.type in (int, float):
                settings["type"] = f.type
            default = "" if f.default == () else f.default
            command = click.option("--" + f.name.replace("_", "-"), f.name, default=default,
                                   show_default=default not in (None, False, ""), **settings)(command)
        return command
    return decorate


def _from_options(cls, options: dict):
    """A Recipe or Runtime from a command's options (those it has of the class's fields)."""
    return cls(**{f.name: options[f.name] for f in dataclasses.fields(cls) if f.name in options})


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="fastcoop")
def cli():
    """Fast, exact few-shot CLIP methods (CoOp, CoCoOp, KgCoOp, Tip-Adapter, your own) on cached CLIP features."""


@cli.command()
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Feature file to write (.h5).")
@click.option("--model", default="ViT-B-16", show_default=True, help="open_clip architecture, or a JSON config path.")
@click.option("--pretrained", default="openai", show_default=True,
              help="open_clip weight tag, local checkpoint path, or 'none' (random init).")
@click.option("--layout", default="auto", show_default=True,
              type=click.Choice(["auto", "imagefolder", "coop", "csv"]),
              help="How ROOT is organised (auto also recognises CoOp's dataset folders).")
@click.option("--dataset", type=click.Choice(list(DATASETS)),
              help="Read ROOT (or ROOT/<its folder>) as this one of CoOp's datasets, named as its configs are.")
@click.option("--image-root", type=click.Path(path_type=Path), help="Image folder of a CoOp split file.")
@click.option("--classnames", "classnames_file", type=click.Path(path_type=Path),
              help="Class names, one per line (CSV with integer labels).")
@click.option("--shots", default="16", show_default=True,
              help="Images per class for training (several: 1,2,4,8,16), or 'all'.")
@click.option("--seeds", default="1,2,3", show_default=True, help="Few-shot sampling seeds.")
@click.option("--views", default="auto", show_default=True,
              help="Augmented views per train image besides the eval view; auto: one per epoch of the published "
                   "schedule for --shots (a fresh view every epoch, as the published loader draws).")
@click.option("--splits", default=None,
              help="Splits to encode  [default: train,test; test for ImageNet's four variants, which have only it]")
@click.option("--split-ratios", default="0.5,0.2", show_default=True,
              help="A folder of classes without train/val/test folders is split per class into these train,val "
                   "fractions (test: the rest), as the published code does, and the split saved beside --out as "
                   "OUT.split.json (reused when present); 'none' reads every image as train.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1),
              help="Views per encoder call.")
@click.option("--workers", default=None, type=click.IntRange(min=0),
              help="Decode/crop worker processes  [default: on a GPU one per core but one, at most 32; on the CPU "
                   "one per core, at most 8; torchrun's processes on a node share the cores]")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
              help="Autocast precision (auto: fp16 on a GPU, as published; fp32 on CPU, bf16 there on request).")
@click.option("--crops", default="auto", show_default=True, type=click.Choice(["auto", "pil", "device"]),
              help="Where the augmented views are cut: pil (in the decoding workers) or device (where the encoder "
                   "runs, equal to PIL's to the bit); auto: device on a GPU, pil on the CPU.")
@click.option("--crop-scale", default="0.08,1", show_default=True,
              help="The augmented views' crop areas as fractions of the image, 'low,high': CoOp's (the default); "
                   "Tip-Adapter's own code crops at 0.5,1.")
@click.option("--encoder", default="eager", show_default=True, type=click.Choice(["eager", "graph"]),
              help="graph: on a GPU, replay the image encoder from a CUDA graph captured for --batch-size views.")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images (recorded in the file) instead of stopping.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file made with other settings.")
@click.option("--verbose", is_flag=True,
              help="Show each stage's share of the time (decode, crop, encode, write): the largest is what the "
                   "others wait on.")
def cache(root, out, model, pretrained, layout, dataset, image_root, classnames_file, shots, seeds, views, splits,
          split_ratios, batch_size, workers, device, precision, crops, crop_scale, encoder, skip_bad, overwrite,
          verbose):
    """Encode the images under ROOT once with the frozen image encoder into an HDF5 feature file.

    Under `torchrun --nproc-per-node N -m fastcoop cache ...` each process encodes a share of the batches and the
    first writes the file, the same file as one process makes."""
    from fastcoop import fewshot
    from fastcoop.cache.writer import check_replaceable
    from fastcoop.data import SPLITS
    from fastcoop.datasets import read_dataset
    from fastcoop.outputs import check_writable, held

    try:
        n_shots = None if shots == "all" else [fewshot.parse_shots(s) for s in shots.split(",")]
    except ValueError as exc:
        raise FastCoopError(str(exc)) from None
    n_views = _views(views)
    scale = _crop_scale(crop_scale)
    seed_list = _int_list(seeds, "--seeds")
    data = read_dataset(root, layout, image_root, classnames_file, dataset, skip_missing=skip_bad)  # before torch
    check_writable(out, "feature cache", folder=False)
    check_replaceable(out)
    if splits is None:
        splits = "train,test" if "train" in data.splits else ",".join(s for s in ("val", "test") if s in data.splits)
    unknown = [s.strip() for s in splits.split(",") if s.strip() not in SPLITS]
    if unknown:
        raise FastCoopError(f"--splits takes train, val and test (comma-separated), not {', '.join(unknown)}")
    with _importing():
        from fastcoop.cache import extract_features
        from fastcoop.devices import resolve_device
        from fastcoop.distributed import join
        from fastcoop.models import load_model

    world, device = join(resolve_device(device))
    if world.is_writer:
        click.get_current_context().with_resource(held(out))  # until the command ends
    if encoder == "graph" and not device.startswith("cuda"):
        raise FastCoopError(f"--encoder graph needs a GPU; the device is {device}")
    new_split, split_note = None, None
    if data.layout == "flat" and split_ratios != "none":
        data, new_split, split_note = _split_flat(data, root, out, split_ratios)
    loaded = load_model(model, pretrained, device)

    announced = []

    def announce():  # what the work is, said once every check has passed and there is work to do
        _say_dataset(root, data)
        if split_note:
            click.echo(split_note)
        _say_weights(loaded)
        announced.append(True)

    start = time.perf_counter()
    path = extract_features(data, out, loaded, splits=[s.strip() for s in splits.split(",")], shots=n_shots,
                            seeds=seed_list, views=n_views, batch_size=batch_size, workers=workers,
                            device=device, precision=resolve_precision(precision, device, "fp16"),
                            skip_bad=skip_bad, overwrite=overwrite, world=world, crops=crops, verbose=verbose,
                            encoder=encoder, crop_scale=scale, on_start=announce)
    if world.is_writer:
        if new_split is not None:  # saved once the cache is made, so that a refusal leaves no file behind
            from fastcoop.data import write_coop_split

            write_coop_split(data, new_split, root)
        if not announced:  # a finished cache with these settings was there
            click.echo(f"{out} holds this cache, finished: nothing to do (--overwrite encodes it again)")
        else:
            _describe_cache(path, time.perf_counter() - start)


@cli.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--check-images", is_flag=True,
              help="Also read each image's first bytes and count those that are no image (slow on a cold disk).")
def datasets(data, check_images):
    """Which of the CoOp papers' 15 datasets the folder DATA holds (laid out as CoOp's DATASETS.md says), read as
    `fastcoop cache` reads them: classes and images per split, what is wrong, and the command that caches each."""
    from fastcoop.survey import survey, survey_table

    click.echo(survey_table(survey(data, check_images), data))


def _split_flat(data, root, out, ratios):
    """Train/val/test for a flat folder: the split saved beside the cache, or made now (the same every time: a
    fixed seed) with the path to save it at once the cache is made; and what to say of it."""
    from fastcoop.data import read_coop_split, split_flat_folder

    path = Path(out).with_suffix(".split.json")
    if path.is_file():
        return read_coop_split(path, root), None, f"{root} has no split folders: using the split in {path}"
    try:
        train, val = (float(r) for r in ratios.split(","))
    except ValueError:
        raise FastCoopError(f"--split-ratios must be 'train,val' fractions such as 0.5,0.2, or 'none', "
                            f"not '{ratios}'") from None
    return split_flat_folder(data, train, val), path, (
        f"{root} has no split folders: split each class {train:.0%} / {val:.0%} / {1 - train - val:.0%} into "
        f"train / val / test, saved in {path} with the cache")


def _crop_scale(value: str) -> tuple[float, float]:
    """--crop-scale 'low,high': fractions of the image with 0 < low ≤ high ≤ 1."""
    try:
        low, high = (float(v) for v in value.split(","))
    except ValueError:
        low = high = -1.0
    if not 0 < low <= high <= 1:
        raise FastCoopError(f"--crop-scale takes 'low,high' fractions of the image with 0 < low ≤ high ≤ 1, such "
                            f"as 0.08,1 or 0.5,1, not '{value}'")
    return low, high


def _views(value: str) -> int | str:
    """--views: 'auto' or a non-negative integer."""
    if value == "auto":
        return value
    if not value.isdigit():
        raise FastCoopError(f"--views must be a non-negative integer or 'auto', not '{value}'")
    return int(value)


def _say_dataset(root, data) -> None:
    if data.dataset:
        sizes = ", ".join("val = test" if split == "val" and items is data.splits.get("test") else
                          f"{split} {len(items):,}" for split, items in data.splits.items())
        click.echo(f"{root}: CoOp's {data.dataset}, {len(data.classnames)} classes ({sizes} images)")


def _say_weights(loaded):
    if loaded.random_init:
        click.echo(f"{loaded.name}: random-init weights (--pretrained none): accuracies mean nothing")
    else:
        click.echo(f"{loaded.name}: weights {loaded.pretrained}")


def _describe_cache(path, seconds):
    from fastcoop.cache import FeatureCache

    with FeatureCache(path) as cache:
        parts = [f"{split} {cache.num_images(split)} images × {cache.num_views(split)} view(s)"
                 for split in cache.splits]
        subsets = ", ".join(f"{s}-shot seed {r}" for s, r in cache.subsets())
        click.echo(f"wrote {path}: {len(cache.classnames)} classes, {'; '.join(parts)}, {cache.feature_dim}-d "
                   "features" + (f"; subsets {subsets}" if subsets else "") + f" ({seconds:.1f} s)")
        if cache.skipped():
            click.echo(f"skipped {len(cache.skipped())} unreadable image(s); their paths are in /skipped")


@cli.command()
@click.argument("cache_file", type=click.Path(path_type=Path))
@click.option("--out", "run_dir", required=True, type=click.Path(path_type=Path), help="Run directory to write.")
@_field_options(Recipe, ("method", "shots", "seed", "classes", "n_ctx", "csc", "position", "init", "epochs",
                         "batch_size", "lr", "precision"), method={"help": (
    f"Registered: {', '.join(methods.names())} (the README's table); or your own, FILE.py:ClassName. Each with "
    "its published recipe.")})
@click.option("-o", "--option", "method_options", multiple=True, metavar="NAME=VALUE",
              help="One of the method's own options, e.g. -o kg_weight=4 (KgCoOp's λ); repeat for more.")
@_field_options(Runtime, ("device", "impl", "impl_detail", "threads"))
@click.option("--verbose", is_flag=True, help="Print which implementation runs each op, and where the time went.")
@click.option("--overwrite", is_flag=True, help="Replace a run already in --out (finished, or made otherwise).")
@click.option("--save-every", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds between checkpoints while training.")
@click.option("--profile", "profile", type=click.Path(path_type=Path),
              help="Write a PyTorch profiler trace (Chrome's JSON, for chrome://tracing or Perfetto) of 20 steps "
                   "after the first epoch.")
def train(cache_file, run_dir, method_options, verbose, overwrite, save_every, profile, **options):
    """Train a method (CoOp by default) on a feature cache; writes the learned tensors, config, metrics and a
    curve to the run directory --out.

    An interrupted run (Ctrl-C, SIGTERM, kill -9) is resumed by the same command, also under another --impl or
    --device; a finished one is kept unless --overwrite is given."""
    start = time.perf_counter()
    from fastcoop import fewshot
    from fastcoop.cache import FeatureCache
    from fastcoop.outputs import check_writable

    options["method"] = methods.check_spec(options["method"])  # a name no method has: before torch is imported
    recipe, runtime = _from_options(Recipe, options), _from_options(Runtime, options)
    cache = FeatureCache(cache_file)
    cache.rows("train", recipe.shots, recipe.seed if recipe.shots else None)  # a clear error before importing torch
    fewshot.check_classes(len(cache.classnames), recipe.classes)
    check_writable(run_dir, "run directory", folder=True)
    if profile is not None:
        check_writable(profile, "profiler trace", folder=False)
    with _importing():
        from fastcoop.backends import resolve
        from fastcoop.devices import resolve_device
        from fastcoop.kernels import hash_triton_in_background
        from fastcoop.models import load_model
        from fastcoop.outputs import held
        from fastcoop.pipeline import train_to_run_dir
        from fastcoop.run import plan_run_dir
        from fastcoop.run_files import recorded_threads
        from fastcoop.training import plan_runs

    imported = time.perf_counter()
    recipe = dataclasses.replace(recipe, options=_method_options(method_options, [methods.get(recipe.method)]))
    runtime = dataclasses.replace(runtime, device=resolve_device(runtime.device))
    device = runtime.device
    resolve(device, runtime.impl, runtime.impl_detail)  # an impossible request fails here, early (the plan decides)
    click.get_current_context().with_resource(held(run_dir))  # until the command ends
    request = methods.publish(recipe, len(cache.classnames), device, cache.dataset).record()
    doing = plan_run_dir(run_dir, cache, request, overwrite)  # early, before the model
    if doing == "done":  # as cache and sweep do: a script rerun after a kill goes on
        click.echo(f"{run_dir} holds this run, finished: nothing to do (--overwrite trains it again)")
        return
    runtime = _with_threads(runtime, recorded_threads([run_dir]) if doing == "resume" else None)
    hash_triton_in_background(device)
    if doing == "resume":
        click.echo(f"resuming the unfinished run in {run_dir}")
    timings = {"imports_s": imported - start}
    loading = time.perf_counter()
    loaded = load_model(cache.model, cache.pretrained, "cpu", image_tower=False)  # the device gets only what runs
    timings["model_s"] = time.perf_counter() - loading
    _say_weights(loaded)
    plan = plan_runs(cache, loaded, [recipe], runtime)  # the method, recipe, device and implementations, decided
    result, results = train_to_run_dir(cache, loaded, plan, run_dir, timings=timings, overwrite=overwrite,
                                       save_every=save_every, profile=profile)
    _say_trained(result, results, run_dir, profile, verbose)
    if verbose:
        click.echo(f"CPU threads: {runtime.threads} ({machine.usable_cores()} cores usable, "
                   f"{_others_running():.0f} other thread(s) running at the start)")


def _method_options(values: tuple[str, ...], chosen: list) -> tuple[tuple[str, object], ...]:
    """-o NAME=VALUE pairs, each typed by the declaration of a method of `chosen` that has it (it applies to
    those); one that none of them declares is refused by name."""
    parsed = {}
    for item in values:
        name, equals, text = item.partition("=")
        owners = [method for method in chosen if name in method.options]
        if not equals:
            raise FastCoopError(f"-o takes NAME=VALUE, not '{item}'")
        if not owners:
            have = "; ".join(f"{m.title}'s: {', '.join(m.options) or 'none'}" for m in chosen)
            raise FastCoopError(f"-o {name} is not an option of {' or '.join(m.title for m in chosen)} ({have})")
        parsed[name] = owners[0].options[name].parse(name, text, owners[0].title)
    return tuple(sorted(parsed.items()))


def _others_running() -> float:
    """What main() saw running beside this process when it started (0 when the CLI is called otherwise)."""
    return (click.get_current_context().obj or {}).get("others_running", 0.0)


def _with_threads(runtime, recorded: int | None = None):
    """The runtime with its CPU threads in use (torch's and BLAS's): --threads, else the number a resumed run
    `recorded` (a CPU run's last bits follow the thread count), else chosen from the machine."""
    threads = runtime.threads or recorded or machine.cpu_threads(_others_running(), machine.usable_cores())
    machine.use_threads(threads)
    return dataclasses.replace(runtime, threads=threads)


def _say_trained(result, results: dict, run_dir: Path, profile: Path | None, verbose: bool) -> None:
    """What `train` did: steps, accuracies, where it went; with --verbose what ran (the record config.json keeps)
    and where the time went."""
    last, resumed_at = result.history[-1], results["resumed_at_epoch"] or 0
    steps = (sum(epoch["steps"] for epoch in result.history[resumed_at:])  # what this command trained
             - (results.get("resumed_at_step") or 0))
    click.echo(f"trained {steps} steps in {result.seconds:.1f} s"
               + (f" (epochs {resumed_at + 1}–{len(result.history)})" if resumed_at else "")
               + f": train acc {last['train_acc']:.1%}"
               + (f", test acc {results['test']['top1']:.2%}" if "test" in results else "")
               + (f" (base); new {results['test_new']['top1']:.2%}, H {results['harmonic_mean']:.2%}"
                  if "test_new" in results else "") + f" → {run_dir}")
    if profile is not None:
        click.echo(f"profiler trace of the steps after the first epoch: {profile}")
    if verbose:
        click.echo(f"implementations: {result.backends.describe()}")
        t = results["timings"]
        click.echo(f"time: imports {t['imports_s']:.1f} s, model {t['model_s']:.1f} s, setup {t['setup_s']:.1f} s, "
                   f"loop {t['loop_s']:.1f} s (first epoch {t['first_epoch_s']:.1f} s: kernels {t['kernels_s']:.1f} "
                   f"s, graph capture {t['capture_s']:.1f} s)")


@cli.command("eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("cache_file", type=click.Path(path_type=Path))
@click.option("--split", default="test", show_default=True)
@click.option("--classes", type=click.Choice(["all", "base", "new"]), default=None,
              help="Class subset to test on  [default: the run's own]; a run trained on base classes can be "
                   "tested on the new ones (the base-to-new protocol).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
def evaluate(run_dir, cache_file, split, classes, device):
    """Top-1 and mean per-class accuracy of a trained prompt on a cached split."""
    from fastcoop.cache import FeatureCache
    from fastcoop.run_files import complete_config

    if run_dir.is_file() and cache_file.is_dir():
        raise FastCoopError(f"the arguments are swapped: `fastcoop eval RUN_DIR CACHE` ({run_dir} is a file, "
                            f"{cache_file} a folder)")
    cache = FeatureCache(cache_file)  # a wrong path or run is answered before torch is imported
    complete_config(run_dir)
    with _importing():
        from fastcoop.devices import resolve_device
        from fastcoop.evaluate import check_same_model, score_run
        from fastcoop.run import load_run, record_evaluation

    device = resolve_device(device)
    run = load_run(run_dir, device, image_tower=False)
    check_same_model(cache, run.loaded.name, run.loaded.pretrained)
    scores, classes = score_run(run, cache, split, classes)
    click.echo(f"{split}: top-1 {scores['top1']:.2%}, mean per-class {scores['mean_per_class']:.2%} "
               f"({scores['images']} images)")
    try:  # for `fastcoop report`'s transfer table; the score above stands without it
        record_evaluation(run_dir, cache, split, classes, scores)
    except OSError as exc:
        click.echo(f"warning: the score was not recorded in {run_dir} ({exc.strerror or exc})", err=True)


@cli.command()
@click.argument("cache_file", type=click.Path(path_type=Path))
@click.option("--template", default=None, help="One prompt template with {} for the class name.")
@click.option("--templates", default=None, help="Template ensemble: a built-in set (e.g. imagenet) or a file.")
@click.option("--cupl", type=click.Path(path_type=Path), help="CuPL descriptions JSON {class: [texts]}.")
@click.option("--split", default="test", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
def zeroshot(cache_file, template, templates, cupl, split, device):
    """Zero-shot accuracy: a hand-written prompt (default 'a photo of a {}.'), an ensemble, or CuPL."""
    from fastcoop.cache import FeatureCache

    if sum(x is not None for x in (template, templates, cupl)) > 1:
        raise FastCoopError("give one of --template, --templates, --cupl")
    cache = FeatureCache(cache_file)  # a wrong path is answered before torch is imported
    with _importing():
        from fastcoop.devices import resolve_device
        from fastcoop.classifiers import text_classifier
        from fastcoop.evaluate import evaluate_split
        from fastcoop.models import load_model
        from fastcoop.zeroshot import check_templates, read_templates, zeroshot_classifier

    chosen = read_templates(templates) if templates else [template] if template else None
    if chosen:
        check_templates(chosen)
    device = resolve_device(device)
    loaded = load_model(cache.model, cache.pretrained, device, image_tower=False)
    text = zeroshot_classifier(loaded, cache.classnames, chosen, cupl, device)
    scores = evaluate_split(cache, text_classifier(text), split)
    what = "CuPL" if cupl else f"{len(chosen)} templates" if chosen and len(chosen) > 1 else "one template"
    click.echo(f"zero-shot ({what}) {split}: top-1 {scores['top1']:.2%}, "
               f"mean per-class {scores['mean_per_class']:.2%}")


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--classes", "class_names", default=None,
              help="Classify among these classes instead of the run's own: names, comma-separated, or a file with "
                   "one per line (the learned context carried over; a class-specific one only to its own classes).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
def predict(run_dir, images, top_k, class_names, device):
    """Classify image files with a trained prompt."""
    from fastcoop.classnames import spoken
    from fastcoop.run_files import complete_config

    complete_config(run_dir)  # a wrong or unfinished run is answered before torch is imported
    names = _class_names(class_names) if class_names is not None else None
    with _importing():
        from fastcoop.devices import resolve_device
        from fastcoop.predict import predict_images
        from fastcoop.run import load_run, with_classnames

    device = resolve_device(device)
    run = load_run(run_dir, device)
    if names is not None:
        run = with_classnames(run, [spoken(n) for n in names])
    for path, top in zip(images, predict_images(run, [str(p) for p in images], top_k, device)):
        click.echo(f"{path}: " + ", ".join(f"{name} {p:.1%}" for name, p in top))


def _class_names(value: str) -> list[str]:
    """--classes: a file of names, one per line, or names separated by commas; at least two, none twice."""
    path = Path(value)
    names = ([line.strip() for line in path.read_text().splitlines() if line.strip()] if path.is_file() else
             [name.strip() for name in value.split(",") if name.strip()])
    if len(names) < 2 or len(set(names)) < len(names):
        raise FastCoopError(f"--classes takes two or more different class names (comma-separated, or a file with one "
                            f"per line), not '{value}'")
    return names


@cli.command("tip-adapter")
@click.argument("cache_file", type=click.Path(path_type=Path))
@click.option("--shots", default=16, show_default=True, type=click.IntRange(min=1), help="Which cached subset.")
@click.option("--seed", default=1, show_default=True, type=int, help="Which cached subset.")
@click.option("--finetune", is_flag=True, help="Also Tip-Adapter-F: the keys trained with its published recipe.")
@click.option("--out", type=click.Path(path_type=Path), help="Write the results (JSON) to this file too.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
def tip_adapter(cache_file, shots, seed, finetune, out, device):
    """Tip-Adapter (and -F) beside zero-shot CLIP on a cache's few-shot subset: α and β searched on val, test
    accuracy; the published recipe of the cache's dataset (needs val and test splits)."""
    import json

    from fastcoop.cache import FeatureCache
    from fastcoop.outputs import check_writable

    cache = FeatureCache(cache_file)  # a wrong path or subset is answered before torch is imported
    cache.rows("train", shots, seed)
    if out is not None:
        check_writable(out, "results file", folder=False)
    with _importing():
        from fastcoop.devices import resolve_device
        from fastcoop.models import load_model
        from fastcoop.methods.tip_adapter import check_cache, run_tip_adapter

    check_cache(cache)
    device = resolve_device(device)
    loaded = load_model(cache.model, cache.pretrained, device, image_tower=False)
    _say_weights(loaded)
    with cache:
        result, = run_tip_adapter(cache, loaded, [(shots, seed)], finetune, device)
    rows = [("zero-shot CLIP", result["zero_shot"]), ("Tip-Adapter", result["tip_adapter"])] + (
        [("Tip-Adapter-F", result["tip_adapter_f"])] if finetune else [])
    for name, scores in rows:
        chosen = f" (β {scores['beta']:.2f}, α {scores['alpha']:.2f} from val)" if "beta" in scores else ""
        click.echo(f"{name}: val {scores['val']:.2%}, test {scores['test']:.2%}{chosen}")
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")


@cli.command("linear-probe")
@click.argument("cache_file", type=click.Path(path_type=Path))
@click.option("--shots", default=16, show_default=True, type=click.IntRange(min=1), help="Which cached subset.")
@click.option("--seed", default=1, show_default=True, type=int, help="Which cached subset.")
def linear_probe(cache_file, shots, seed):
    """The paper's linear-probe baseline on a cache's few-shot subset (needs its val and test splits)."""
    from fastcoop.cache import FeatureCache

    with FeatureCache(cache_file) as cache:
        cache.rows("train", shots, seed)  # a wrong path or a missing subset is answered before the imports
        with _importing():
            from fastcoop.methods.linear_probe import linear_probe as probe
        result = probe(cache, shots, seed)
    click.echo(f"linear probe, {shots} shots, seed {seed}: test top-1 {result['test']['top1']:.2%} "
               f"(C = {result['C']:.3g}, chosen on {result['val_top1']:.1%} validation accuracy)")


@cli.command()
@click.argument("cache_file", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for every run and the summary.")
@click.option("--shots", default="1,2,4,8,16", show_default=True, help="Shot counts (each cached).")
@click.option("--seeds", default="1,2,3", show_default=True, help="Few-shot sampling seeds (each cached).")
@_field_options(Recipe, ("method", "classes"), method={
    "help": f"Methods, comma-separated (registered: {', '.join(methods.names())}; or your own, FILE.py:ClassName), "
            "each with its published recipe: their runs side by side in one table and figure."}, classes={
    "choices": ("all", "base"),
    "help": "base: the base-to-new protocol (train on base classes; test on base and new, with H)."})
@click.option("--n-ctx", default=None,
              help="Context lengths M, comma-separated  [default: each method's published M]")
@click.option("--csc", default="no", show_default=True, help="Class-specific context: no, yes, or no,yes.")
@click.option("--position", default="end", show_default=True, help="Class token positions: end, middle, front.")
@_field_options(Recipe, ("epochs", "lr", "precision"))
@click.option("-o", "--option", "method_options", multiple=True, metavar="NAME=VALUE",
              help="A method's own option, e.g. -o kg_weight=4 (KgCoOp's λ), for the methods that have it.")
@click.option("--baselines", default="linear-probe", show_default=True,
              help="Beside the runs, on the same few-shot images (comma-separated; needs val and test splits): "
                   f"{', '.join(methods.BASELINES)}, or none.")
@click.option("--no-stack", is_flag=True, help="Train each run alone instead of stacking a method's runs.")
@click.option("--overwrite", is_flag=True,
              help="Replace another sweep in --out (its runs too) and train every run again. Without it a rerun keeps "
                   "the finished runs, and more --shots or --seeds train only the new runs.")
@click.option("--eval-on", default=None,
              help="Other datasets' caches (comma-separated) to test every run on too, e.g. ImageNet's four "
                   "variants: the domain-generalisation table (or cross-dataset transfer).")
@_field_options(Runtime, ("device", "impl", "impl_detail", "threads"))
def sweep(cache_file, out, shots, seeds, n_ctx, csc, position, method_options, baselines, no_stack, overwrite, eval_on,
          **options):
    """The paper's protocol on one cache: every (variant, shots, seed) run, zero-shot CLIP, the linear probe (with
    a val split), a summary table and the accuracy-against-shots figure in OUT; with --classes base, CoCoOp's
    base-to-new protocol (base, new and H). Rerun to finish an interrupted
    sweep: finished runs are kept. Under `torchrun --nproc-per-node N -m fastcoop sweep ...` the runs are shared
    among N processes (GPUs)."""
    from fastcoop.cache import FeatureCache
    from fastcoop.fewshot import check_classes
    from fastcoop.outputs import check_writable
    from fastcoop.run_files import TABLE_FILE

    shot_list, seed_list = _int_list(shots, "--shots"), _int_list(seeds, "--seeds")
    contexts = _int_list(n_ctx, "--n-ctx") if n_ctx else [None]
    flags = [_choice(v, {"no": False, "yes": True}, "--csc") for v in csc.split(",")]
    positions = [_choice(v, {p: p for p in ("end", "middle", "front")}, "--position") for v in position.split(",")]
    if min(shot_list) < 1 or (n_ctx and min(contexts) < 1):
        raise FastCoopError("--shots and --n-ctx take positive integers")
    specs = [methods.check_spec(v.strip()) for v in options.pop("method").split(",")]  # before torch
    base = _from_options(Recipe, options)  # what every variant shares: the class subset and the schedule
    runtime = _from_options(Runtime, options)
    cache = FeatureCache(cache_file)  # a wrong path is answered before torch is imported
    check_classes(len(cache.classnames), base.classes)
    baseline_list = _baselines(baselines, base.classes)
    others = [FeatureCache(Path(p.strip())) for p in eval_on.split(",") if p.strip()] if eval_on else []
    for other in others:
        if "test" not in other.splits:
            raise FastCoopError(f"--eval-on {other.path} has no test split to test the runs on")
    check_writable(out, "sweep folder", folder=True)  # before torch loads
    with _importing():
        from fastcoop.backends import resolve
        from fastcoop.devices import resolve_device
        from fastcoop.distributed import join
        from fastcoop.evaluate import check_same_model
        from fastcoop.kernels import hash_triton_in_background
        from fastcoop.models import load_model
        from fastcoop.outputs import held
        from fastcoop.run_files import recorded_threads
        from fastcoop.sweep import check_sweep_dir, run_dir_of, run_sweep, sweep_request, sweep_runs, variant_for

    for other in others:
        check_same_model(other, cache.model, cache.pretrained)
    chosen = _method_options(method_options, [methods.get(spec) for spec in specs])
    # each method's published context when no M is named (CoCoOp's from "a photo of a"); a named M starts random
    variants = [variant_for(spec, m, c, p, dict(chosen))
                for spec, m, c, p in itertools.product(specs, contexts, flags, positions)]
    world, device = join(resolve_device(runtime.device))
    for variant in variants:  # what a method does not have fails here, before any work
        methods.publish(dataclasses.replace(base, **dataclasses.asdict(variant)), len(cache.classnames), device)
    for name in baseline_list if base.classes == "all" else ():  # e.g. Tip-Adapter's val, test and views
        methods.baseline(name).check(cache, [(s, seed) for s in shot_list for seed in seed_list])
    resolve(device, runtime.impl, runtime.impl_detail)  # an impossible request fails here, early
    if world.is_writer:
        click.get_current_context().with_resource(held(out))  # until the command ends
    with cache:
        runs = sweep_runs(cache, shot_list, seed_list, variants)
        check_sweep_dir(out, sweep_request(cache, shot_list, seed_list, variants, base), overwrite, world)
        runtime = _with_threads(dataclasses.replace(runtime, device=device),
                                None if overwrite else recorded_threads(run_dir_of(out, *run) for run in runs))
        hash_triton_in_background(device)
        loaded = load_model(cache.model, cache.pretrained, "cpu", image_tower=False)
        if world.is_writer:
            _say_weights(loaded)
            click.echo(f"{len(runs)} runs: {len(variants)} variant(s) × shots {shots} × seeds {seeds}")
        run_sweep(cache, loaded, out, shot_list, seed_list, variants, base, runtime, progress=world.is_writer,
                  echo=click.echo if world.is_writer else lambda _: None, world=world, stack=not no_stack,
                  eval_on=others, baselines=baseline_list, overwrite=overwrite)
    if world.is_writer:
        click.echo((out / TABLE_FILE).read_text().rstrip())
        click.echo(f"summary, table and figure in {out}")


def _baselines(value: str, classes: str) -> tuple[str, ...]:
    """--baselines: names from fastcoop.methods.BASELINES, or none; they are the all-classes protocol's."""
    names = tuple(v.strip() for v in value.split(",") if v.strip() and v.strip() != "none")
    unknown = [n for n in names if n not in methods.BASELINES]
    if unknown:
        raise FastCoopError(f"--baselines takes {', '.join(methods.BASELINES)} or none (comma-separated), not "
                            f"'{unknown[0]}'")
    if classes == "base" and names != ("linear-probe",) and names:
        raise FastCoopError("--baselines run on all classes; the base-to-new table (--classes base) has zero-shot "
                            "CLIP on each half beside the runs")
    return names


def _choice(value: str, choices: dict, option: str):
    if value not in choices:
        raise FastCoopError(f"{option} takes {', '.join(choices)} (comma-separated), not '{value}'")
    return choices[value]


@cli.command("methods")
@click.argument("name", required=False)
def list_methods(name):
    """The methods `--method` takes (the built-in ones, installed packages', or FILE.py:ClassName), and with NAME one
    method's paper, published recipe and own options (-o)."""
    spec = methods.check_spec(name) if name else None  # a wrong name is answered before torch is imported
    with _importing():
        click.echo(methods.describe(spec) if spec else methods.method_table())


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
def report(run_dirs):
    """A Markdown table of runs, or of sweeps: test accuracy averaged over seeds (mean ± std), as the paper reports
    it; several sweeps (one per dataset) also get their average."""
    from fastcoop.report import collect, read_sweep_summaries, summary_table, sweep_table

    sweeps = read_sweep_summaries(list(run_dirs))
    click.echo(sweep_table(sweeps, [Path(d).name for d in run_dirs]) if sweeps else
               summary_table(collect(list(run_dirs))))


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--class", "class_name", default=None, help="With class-specific context: which class (default: first).")
def interpret(run_dir, top_k, class_name):
    """The vocabulary words nearest to each learned context vector."""
    from fastcoop.classnames import spoken
    from fastcoop.run_files import complete_config

    names = complete_config(run_dir)["classnames"]  # mistakes are answered before torch is imported
    if class_name is not None and spoken(class_name) not in names:
        raise FastCoopError(f"no class '{class_name}' in {run_dir}")
    index = names.index(spoken(class_name)) if class_name else 0
    with _importing():
        from fastcoop.interpret import nearest_words
        from fastcoop.run import load_run

    run = load_run(run_dir, image_tower=False)
    whose = f" of class '{names[index]}'" if run.learner.csc else ""
    click.echo(f"the {top_k} vocabulary words nearest to each context vector{whose} "
               "(Euclidean distance in the token-embedding space):")
    for i, words in enumerate(nearest_words(run, top_k, index), start=1):
        click.echo(f"V{i}: " + ", ".join(f"{w} (distance {d:.2f})" for w, d in words))


@cli.command()
@click.option("--dir", "folder", default="demo-output", show_default=True, type=click.Path(path_type=Path),
              help="Where the example images and outputs go.")
@click.option("--model", default="ViT-B-32", show_default=True)
@click.option("--pretrained", default="openai", show_default=True,
              help="Weights to try; random init is used when they cannot be had.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
def demo(folder, model, pretrained, device):
    """Run the whole pipeline on a built-in example image set."""
    with _importing():
        from fastcoop.demo import run_demo

    run_demo(folder, model, pretrained, device)


def main(argv: list[str] | None = None):
    """Entry point: FastCoopError → 'error: …' and exit 2; Ctrl-C or SIGTERM → exit 130, saying what was kept."""
    others = machine.others_running()
    if "OMP_WAIT_POLICY" not in os.environ:  # read once, when torch loads: decided before any import of it
        os.environ["OMP_WAIT_POLICY"] = machine.wait_policy(others)
    machine.default_threads_before_loading(machine.cpu_threads(others, machine.usable_cores()))
    logging.basicConfig(level=logging.ERROR)  # our own lines say what open_clip's warnings would
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a polite kill saves like Ctrl-C
    try:
        cli.main(args=argv, prog_name="fastcoop", standalone_mode=False, obj={"others_running": others})
    except FastCoopError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.ClickException as exc:  # a bad option: one line too, as click's message says it
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort) as exc:
        said = str(exc.__cause__ if isinstance(exc, click.exceptions.Abort) else exc)  # click wraps Ctrl-C
        click.echo(f"interrupted{': ' + said if said and said != 'None' else ''}", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    sys.exit(0)


if __name__ == "__main__":
    main()
