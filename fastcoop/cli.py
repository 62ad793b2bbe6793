"""The `fastcoop` command line: a thin layer over the Python API; bad input is one line on stderr and exit code 2."""

import sys
import time
from pathlib import Path

import click

from fastcoop.errors import FastCoopError


def _int_list(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got '{value}'") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="fastcoop")
def cli():
    """Fast, exact CoOp prompt learning on cached CLIP features."""


@cli.command()
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Feature file to write (.h5).")
@click.option("--model", default="ViT-B-16", show_default=True, help="open_clip architecture, or a JSON config path.")
@click.option("--pretrained", default="openai", show_default=True,
              help="open_clip weight tag, local checkpoint path, or 'none' (random init).")
@click.option("--layout", default="auto", show_default=True,
              type=click.Choice(["auto", "imagefolder", "coop", "csv"]), help="How ROOT is organised.")
@click.option("--image-root", type=click.Path(path_type=Path), help="Image folder of a CoOp split file.")
@click.option("--classnames", "classnames_file", type=click.Path(path_type=Path),
              help="Class names, one per line (CSV with integer labels).")
@click.option("--shots", default="16", show_default=True, help="Images per class for training, or 'all'.")
@click.option("--seeds", default="1,2,3", show_default=True, help="Few-shot sampling seeds.")
@click.option("--views", default=0, show_default=True, type=click.IntRange(min=0),
              help="Augmented views per train image, besides the eval view.")
@click.option("--splits", default="train,test", show_default=True, help="Splits to encode.")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=4, show_default=True, type=click.IntRange(min=0))
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
              help="Autocast precision on GPU (auto: fp16, as published); CPU runs fp32.")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images (recorded in the file) instead of stopping.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file made with other settings.")
def cache(root, out, model, pretrained, layout, image_root, classnames_file, shots, seeds, views, splits,
          batch_size, workers, device, precision, skip_bad, overwrite):
    """Encode the images under ROOT once with the frozen image encoder into an HDF5 feature file."""
    from fastcoop import fewshot, read_dataset
    from fastcoop.cache import extract_features
    from fastcoop.devices import resolve_device, resolve_precision
    from fastcoop.models import load_model

    try:
        n_shots = fewshot.parse_shots(shots)
    except ValueError as exc:
        raise FastCoopError(str(exc)) from None
    data = read_dataset(root, layout, image_root, classnames_file)
    device = resolve_device(device)
    loaded = load_model(model, pretrained, device)
    _say_weights(loaded)
    start = time.perf_counter()
    path = extract_features(data, out, loaded, splits=[s.strip() for s in splits.split(",")], shots=n_shots,
                            seeds=_int_list(seeds), views=views, batch_size=batch_size, workers=workers,
                            device=device, precision=resolve_precision(precision, device, "fp16"),
                            skip_bad=skip_bad, overwrite=overwrite)
    _describe_cache(path, time.perf_counter() - start)


def _say_weights(loaded):
    if loaded.random_init:
        click.echo(f"{loaded.name}: random-init weights (--pretrained none): accuracies mean nothing")
    else:
        click.echo(f"{loaded.name}: weights {loaded.pretrained}")


def _describe_cache(path, seconds):
    from fastcoop.cache import FeatureCache

    with FeatureCache(path) as cache:
        parts = []
        for split in cache.splits:
            views, n, dim = cache.file[split]["features"].shape
            parts.append(f"{split} {n} images × {views} view(s)")
        subsets = ", ".join(f"{s}-shot seed {r}" for s, r in cache.subsets())
        click.echo(f"wrote {path}: {len(cache.classnames)} classes, {'; '.join(parts)}, {dim}-d features"
                   + (f"; subsets {subsets}" if subsets else "") + f" ({seconds:.1f} s)")


@cli.command()
@click.option("--dir", "folder", default="demo-output", show_default=True, type=click.Path(path_type=Path),
              help="Where the example images and outputs go.")
@click.option("--model", default="ViT-B-32", show_default=True)
@click.option("--pretrained", default="openai", show_default=True,
              help="Weights to try; random init is used when they cannot be had.")
@click.option("--device", default="auto", show_default=True)
def demo(folder, model, pretrained, device):
    """Run the whole pipeline on a built-in example image set."""
    from fastcoop.demo import run_demo

    run_demo(folder, model, pretrained, device)


def main(argv: list[str] | None = None):
    """Entry point: FastCoopError → 'error: …' and exit 2; Ctrl-C → exit 130 with a resume hint."""
    try:
        cli.main(args=argv, prog_name="fastcoop", standalone_mode=False)
    except FastCoopError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("interrupted: run the same command again to resume", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    sys.exit(0)


if __name__ == "__main__":
    main()
