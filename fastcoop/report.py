"""A table of trained runs, averaged over seeds as the CoOp paper reports them; runs of the base-to-new protocol
(trained on base classes) also get the new classes' accuracy and the harmonic mean H, as CoCoOp reports them."""

import json
import statistics
from pathlib import Path

from fastcoop.errors import FastCoopError
from fastcoop.fewshot import harmonic_mean
from fastcoop.run import CONFIG_FILE, RESULTS_FILE, check_complete, read_config, read_evaluations

DEFAULTS = {"method": "coop", "classes": "all"}  # what runs recorded before these options existed were
GROUP_BY = ("method", "classes", "shots", "n_ctx", "csc", "position", "init", "epochs")


def collect(run_dirs: list[Path]) -> list[dict]:
    """One row per finished run: its dataset (cache), model, recipe and accuracies."""
    rows = []
    for run_dir in run_dirs:
        config, results_path = read_config(run_dir), Path(run_dir) / RESULTS_FILE
        if config is None or (config["state"] == "complete" and not results_path.is_file()):
            raise FastCoopError(f"{run_dir} is not a finished fastcoop run (no {CONFIG_FILE} / {RESULTS_FILE})")
        check_complete(run_dir, config)
        results = json.loads(results_path.read_text())
        rows.append({"run": str(run_dir), "cache": Path(config["cache"]["path"]).name,
                     "model": Path(config["model"]).stem, "pretrained": Path(config["pretrained"]).name,
                     **{k: config["train"].get(k, DEFAULTS.get(k)) for k in GROUP_BY},
                     "seed": config["train"]["seed"], "test": results.get("test", {}).get("top1"),
                     "test_new": results.get("test_new", {}).get("top1"),
                     "transfer": _transfer(config, read_evaluations(run_dir)),
                     "train_seconds": results["train_seconds"]})
    return rows


def _transfer(config: dict, evaluations: dict) -> dict:
    """Top-1 on other caches (`fastcoop eval RUN OTHER_CACHE`), by the cache's name (and split, if not test)."""
    own = config["cache"]["path"]
    return {e["dataset"] + ("" if e["split"] == "test" else f" ({e['split']})"): e["top1"]
            for e in evaluations.values() if e["cache"] != own}


def summary_table(rows: list[dict]) -> str:
    """Markdown: one line per (cache, model, weights, recipe), test accuracy mean ± std over its seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in ("cache", "model", "pretrained", *GROUP_BY)), []).append(row)
    base_to_new = any(r["test_new"] is not None for r in rows)
    lines = ["| cache | model | weights | method | classes | shots | M | context | position | init | epochs | seeds | "
             "test top-1 (mean ± std) | " + ("new top-1 | H | " if base_to_new else "") + "train s (mean) |",
             "|" + " --- |" * (16 if base_to_new else 14)]
    for key, runs in groups.items():
        cache, model, weights, method, classes, shots, n_ctx, csc, position, init, epochs = key
        seconds = statistics.mean(r["train_seconds"] for r in runs)
        new = f"{percent([r['test_new'] for r in runs])} | {_harmonic_of_means(runs)} | "
        lines.append(f"| {cache} | {model} | {weights} | {method} | {classes} | {shots or 'all'} | {n_ctx} | "
                     f"{'CSC' if csc else 'unified'} | {position} | {init or 'random'} | {epochs} | "
                     f"{','.join(str(r['seed']) for r in runs)} | {percent([r['test'] for r in runs])} | "
                     + (new if base_to_new else "") + f"{seconds:.1f} |")
    return "\n".join(lines + _transfer_table(groups))


def _transfer_table(groups: dict[tuple, list[dict]]) -> list[str]:
    """Cross-dataset and domain-shift results as CoCoOp tabulates them: each run's source, then every other cache
    it was evaluated on, and their average (means over the seeds evaluated there)."""
    targets = sorted({name for runs in groups.values() for r in runs for name in r["transfer"]})
    if not targets:
        return []
    lines = ["", "Transfer: test top-1 on other caches (mean over seeds)", "",
             "| source | model | method | classes | shots | seeds | " + " | ".join(targets) + " | average |",
             "|" + " --- |" * (7 + len(targets))]
    for key, runs in groups.items():
        cache, model, _, method, classes, shots = key[:6]
        means = [_mean([r["transfer"].get(t) for r in runs]) for t in targets]
        lines.append(f"| {cache} | {model} | {method} | {classes} | {shots or 'all'} | "
                     f"{','.join(str(r['seed']) for r in runs)} | {' | '.join(percent([m]) for m in means)} | "
                     f"{percent([_mean(means)])} |")
    return lines


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def _harmonic_of_means(runs: list[dict]) -> str:
    """H as CoCoOp's tables give it: the harmonic mean of the seeds' mean base and mean new accuracy."""
    pairs = [(r["test"], r["test_new"]) for r in runs if r["test"] is not None and r["test_new"] is not None]
    if not pairs:
        return "–"
    return f"{100 * harmonic_mean(*(statistics.mean(values) for values in zip(*pairs))):.2f}"


def percent(values: list[float | None]) -> str:
    """Percent, mean ± std over the seeds that have the number; – where none has it (report's and sweep's tables)."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{100 * statistics.mean(values):.2f}" + (f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1
                                                      else "")
