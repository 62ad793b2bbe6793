"""A table of trained runs, averaged over seeds as the CoOp paper reports them."""

import json
import statistics
from pathlib import Path

from fastcoop.errors import FastCoopError
from fastcoop.run import CONFIG_FILE, RESULTS_FILE, check_complete, read_config

GROUP_BY = ("shots", "n_ctx", "csc", "position", "init", "epochs")


def collect(run_dirs: list[Path]) -> list[dict]:
    """One row per finished run: its dataset (cache), model, recipe and accuracies."""
    rows = []
    for run_dir in run_dirs:
        config, results_path = read_config(run_dir), Path(run_dir) / RESULTS_FILE
        if config is None or (config["state"] == "complete" and not results_path.is_file()):
            raise FastCoopError(f"{run_dir} is not a finished fastcoop run (no {CONFIG_FILE} / {RESULTS_FILE})")
        check_complete(run_dir, config)
        results = json.loads(results_path.read_text())
        rows.append({"run": str(run_dir), "cache": Path(config["cache"]["path"]).name, "model": Path(config["model"]).stem,
                     "pretrained": Path(config["pretrained"]).name, **{k: config["train"][k] for k in GROUP_BY},
                     "seed": config["train"]["seed"], "test": results.get("test", {}).get("top1"),
                     "train_seconds": results["train_seconds"]})
    return rows


def summary_table(rows: list[dict]) -> str:
    """Markdown: one line per (cache, model, weights, recipe), test accuracy mean ± std over its seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in ("cache", "model", "pretrained", *GROUP_BY)), []).append(row)
    lines = ["| cache | model | weights | shots | M | context | position | init | epochs | seeds | test top-1 "
             "(mean ± std) | train s (mean) |", "|" + " --- |" * 12]
    for key, runs in groups.items():
        cache, model, weights, shots, n_ctx, csc, position, init, epochs = key
        accs = [r["test"] for r in runs if r["test"] is not None]
        acc = "–" if not accs else (f"{100 * statistics.mean(accs):.2f}"
                                    + (f" ± {100 * statistics.stdev(accs):.2f}" if len(accs) > 1 else ""))
        seconds = statistics.mean(r["train_seconds"] for r in runs)
        lines.append(f"| {cache} | {model} | {weights} | {shots or 'all'} | {n_ctx} | {'CSC' if csc else 'unified'} "
                     f"| {position} | {init or 'random'} | {epochs} | {','.join(str(r['seed']) for r in runs)} | "
                     f"{acc} | {seconds:.1f} |")
    return "\n".join(lines)
