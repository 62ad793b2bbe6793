"""Tables of trained runs and of sweeps, averaged over seeds as the CoOp paper reports them; runs of the
base-to-new protocol (trained on base classes) also get the new classes' accuracy and the harmonic mean H, as
CoCoOp reports them. Read from the run and sweep directories' JSON files alone, without torch."""

import json
import statistics
import warnings
from pathlib import Path

from fastcoop.datasets import DATASETS, IMAGENET_VARIANTS
from fastcoop.errors import FastCoopError
from fastcoop.fewshot import harmonic_mean
from fastcoop.run_files import (CONFIG_FILE, RESULTS_FILE, SUMMARY_FILE, SWEEP_FILE, check_complete, read_config,
                                read_evaluations)

GROUP_BY = ("method", "classes", "shots", "n_ctx", "csc", "position", "init", "epochs")


def collect(run_dirs: list[Path]) -> list[dict]:
    """One row per finished run: its dataset (cache), model, recipe and accuracies."""
    rows = []
    for run_dir in run_dirs:
        config, results_path = read_config(run_dir), Path(run_dir) / RESULTS_FILE
        if config is None:
            raise FastCoopError(_not_a_run(Path(run_dir)))
        if config["state"] == "complete" and not results_path.is_file():
            raise FastCoopError(f"{run_dir} is not a finished fastcoop run (no {RESULTS_FILE})")
        check_complete(run_dir, config)
        results = json.loads(results_path.read_text())
        rows.append({"run": str(run_dir), "cache": Path(config["cache"]["path"]).name,
                     "model": Path(config["model"]).stem, "pretrained": Path(config["pretrained"]).name,
                     **{k: config["train"][k] for k in GROUP_BY}, "method": _method(config["train"]["method"]),
                     "seed": config["train"]["seed"], "test": results.get("test", {}).get("top1"),
                     "test_new": results.get("test_new", {}).get("top1"),
                     "transfer": _transfer(config, read_evaluations(run_dir)),
                     "train_seconds": results["train_seconds"]})
    return rows


def _method(spec: str) -> str:
    """A method as tables name it: its registered name, or FILE.py:Class without the file's folder."""
    path, colon, cls = spec.rpartition(":")
    return f"{Path(path).name}:{cls}" if colon and path.endswith(".py") else spec


def _not_a_run(path: Path) -> str:
    """Why `path` is no run to report, and what to pass instead where it holds runs."""
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_dir():
        return f"{path} is a file, not a run directory"
    runs = sorted(p.parent for p in path.glob(f"*/{CONFIG_FILE}"))
    if runs:
        return (f"{path} is not a run but holds {len(runs)}: pass them ({path}/*), e.g. "
                + " ".join(str(r) for r in runs[:2]) + (" ..." if len(runs) > 2 else ""))
    return f"{path} is neither a fastcoop run nor a sweep (no {CONFIG_FILE} or {SWEEP_FILE})"


def _transfer(config: dict, evaluations: dict) -> dict:
    """Top-1 on other datasets (`fastcoop eval RUN OTHER_CACHE`), by the dataset's name (and split, if not test);
    a score on the run's own cache (another split or class half) is not a transfer score."""
    own = config["cache"].get("identity")
    return {e["dataset"] + ("" if e["split"] == "test" else f" ({e['split']})"): e["top1"]
            for e in evaluations.values() if e.get("identity") != own and e["cache"] != config["cache"]["path"]
            and e.get("classes", "all") == "all"}


def summary_table(rows: list[dict]) -> str:
    """Markdown: one line per (cache, model, weights, recipe), test accuracy mean ± std over its seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        group = groups.setdefault(tuple(row[k] for k in ("cache", "model", "pretrained", *GROUP_BY)), [])
        twin = next((r for r in group if r["seed"] == row["seed"]), None)
        if twin is None:
            group.append(row)
        elif Path(twin["run"]).resolve() != Path(row["run"]).resolve():  # one seed is one sample of the mean
            warnings.warn(f"{row['run']} repeats {twin['run']} (same recipe, cache and seed {row['seed']}): "
                          "counted once")
    base_to_new = any(r["test_new"] is not None for r in rows)
    lines = ["| cache | model | weights | method | classes | shots | M | context | position | init | epochs | seeds | "
             "test top-1 (mean ± std) | " + ("new top-1 | H | " if base_to_new else "") + "train s (mean) |",
             "|" + " --- |" * (16 if base_to_new else 14)]
    for key, runs in groups.items():
        cache, model, weights, method, classes, shots, n_ctx, csc, position, init, epochs = key
        seconds = statistics.mean(r["train_seconds"] for r in runs)
        new = f"{percent([r['test_new'] for r in runs])} | {_harmonic_of_means(runs)} | "
        prompt = (f"{n_ctx} | {'CSC' if csc else 'unified'} | {position} | {init or 'random'}" if n_ctx is not None
                  else "– | – | – | –")  # a method that learns no prompt
        lines.append(f"| {cache} | {model} | {weights} | {method} | {classes} | {shots or 'all'} | {prompt} | "
                     f"{epochs} | {','.join(str(r['seed']) for r in runs)} | {percent([r['test'] for r in runs])} | "
                     + (new if base_to_new else "") + f"{seconds:.1f} |")
    columns = ["cache", "model", "method", "context", "classes", "shots", "seeds"]
    labelled = [([cache, model, method, f"M{n_ctx} {'CSC' if csc else 'unified'}" if n_ctx is not None else "–",
                  classes, str(shots or "all"),
                  ",".join(str(r["seed"]) for r in runs)], runs)
                for (cache, model, _, method, classes, shots, n_ctx, csc, *_), runs in groups.items()]
    return "\n".join(lines + transfer_tables(columns, labelled))


def transfer_tables(columns: list[str], groups: list[tuple[list[str], list[dict]]]) -> list[str]:
    """The papers' transfer tables: domain generalisation (ImageNet's context on ImageNetV2, -Sketch, -A and -R)
    and cross-dataset transfer (on every other dataset). A row per group of runs (its `columns` cells), with the
    runs' own test top-1 as the source, then each target's and their average (means over the seeds evaluated
    there; a cell from fewer seeds than the row's names them); runs are dicts with 'test', 'seed' and 'transfer'
    ({dataset: top-1})."""
    targets = {name for _, runs in groups for r in runs for name in r.get("transfer", {})}
    variants = [t for t in _in_paper_order(targets) if t in IMAGENET_VARIANTS]
    others = [t for t in _in_paper_order(targets) if t not in IMAGENET_VARIANTS]
    lines = []
    for title, targets in (("Domain generalisation", variants), ("Cross-dataset transfer", others)):
        if not targets:
            continue
        lines += ["", f"{title}: test top-1 on other datasets (mean over seeds)", "",
                  "| " + " | ".join(columns) + " | source | " + " | ".join(_paper_name(t) for t in targets)
                  + " | average |", "|" + " --- |" * (len(columns) + len(targets) + 2)]
        for cells, runs in groups:
            means = [_mean([r.get("transfer", {}).get(t) for r in runs]) for t in targets]
            if any(m is not None for m in means):
                partial = any(_from_some_seeds(runs, t) for t in targets)
                lines.append("| " + " | ".join(cells) + f" | {percent([r['test'] for r in runs])} | "
                             + " | ".join(percent([m]) + _from_some_seeds(runs, t) for m, t in zip(means, targets))
                             + f" | {percent([_mean(means)])}{' (partial)' if partial else ''} |")
    return lines


def _from_some_seeds(runs: list[dict], target: str) -> str:
    """' (seed 1)' where only some of a row's runs were tested on `target` (so its mean is over those alone)."""
    seeds = [str(r.get("seed", "?")) for r in runs if r.get("transfer", {}).get(target) is not None]
    if not seeds or len(seeds) == len(runs):
        return ""
    return f" (seed{'s' if len(seeds) > 1 else ''} {','.join(seeds)})"


def _in_paper_order(names: set[str]) -> list[str]:
    """CoOp's datasets in the order of its tables, then any others by name."""
    known = [n for n in DATASETS if n in names]
    return known + sorted(names - set(known))


def _paper_name(name: str) -> str:
    return DATASETS[name].paper_name if name in DATASETS else name


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


def read_sweep_summaries(folders: list[Path]) -> list[dict]:
    """The summaries of sweep folders; [] when none is a sweep; mixing sweeps and runs is refused."""
    is_sweep = [(Path(f) / SUMMARY_FILE).is_file() for f in folders]
    if not any(is_sweep):
        return []
    if not all(is_sweep):
        odd = folders[is_sweep.index(False)]
        raise FastCoopError(f"{odd} is not a finished sweep (no {SUMMARY_FILE}); report sweeps or runs, not both")
    return [json.loads((Path(f) / SUMMARY_FILE).read_text()) for f in folders]


def sweep_curves(summary: dict) -> dict[str, dict[int, list[float]]]:
    """name → shots → test accuracies over seeds: each variant (base-to-new: on base and on new classes), and the
    baselines the sweep ran (by title: the linear probe, Tip-Adapter, Tip-Adapter-F)."""
    table: dict[str, dict[int, list[float]]] = {}
    base_to_new = summary.get("trained_on") == "base"
    for run in summary["runs"]:
        for key, suffix in (("test", " base" if base_to_new else ""), ("test_new", " new")):
            if run.get(key) is not None:
                table.setdefault(run["variant"] + suffix, {}).setdefault(run["shots"], []).append(run[key])
    for name, rows in summary.get("baselines", {}).items():
        for row in rows:
            table.setdefault(name, {}).setdefault(row["shots"], []).append(row["test"])
    return table


def sweep_table(summaries: list[dict], names: list[str]) -> str:
    """Markdown: test top-1 (%) mean ± std over seeds, per dataset and variant (rows) and shots (columns); with
    several datasets, their average too (the paper's first panel). Base-to-new sweeps show each variant's base, new
    and H rows, H from the mean base and mean new accuracy as CoCoOp reports it (for the average: from the
    averaged base and new)."""
    shots = sorted({run["shots"] for s in summaries for run in s["runs"]})
    lines = ["| dataset | method | zero-shot | " + " | ".join(f"{s} shot{'s' if s != 1 else ''}" for s in shots) + " |",
             "|" + " --- |" * (3 + len(shots))]
    per_dataset = [_sweep_rows(summary) for summary in summaries]
    for name, rows in zip(names, per_dataset):
        for method, (zero, by_shots) in rows.items():
            lines.append(f"| {name} | {method} | {percent([zero])} | "
                         + " | ".join(percent(by_shots.get(s, [])) for s in shots) + " |")
    if len(summaries) > 1:
        average: dict[str, tuple] = {}
        for method in [m for m in per_dataset[0] if all(m in rows for rows in per_dataset)]:
            if method.endswith(" H"):  # from the averaged base and new rows
                variant = method.removesuffix(" H")
                base, new = average.get(variant + " base"), average.get(variant + " new")
                if base and new:
                    cells = {s: [harmonic_mean(base[1][s][0], new[1][s][0])] for s in base[1] if s in new[1]}
                    average[method] = (harmonic_mean(base[0], new[0]), cells)
                continue
            zeros = [rows[method][0] for rows in per_dataset]
            cells = {s: [statistics.mean(statistics.mean(rows[method][1][s]) for rows in per_dataset)] for s in shots
                     if all(rows[method][1].get(s) for rows in per_dataset)}
            average[method] = (statistics.mean(zeros) if None not in zeros else None, cells)
        for method, (zero, cells) in average.items():
            lines.append(f"| average of {len(summaries)} | {method} | {percent([zero])} | "
                         + " | ".join(percent(cells.get(s, [])) for s in shots) + " |")
    groups: dict[tuple, list[dict]] = {}  # (dataset, variant, shots) → runs, for the runs evaluated elsewhere
    for name, summary in zip(names, summaries):
        for run in summary["runs"]:
            groups.setdefault((name, run["variant"], str(run["shots"])), []).append(run)
    return "\n".join(lines + transfer_tables(["dataset", "method", "shots"], [(list(k), v) for k, v in groups.items()]))


def _sweep_rows(summary: dict) -> dict[str, tuple[float | None, dict[int, list[float]]]]:
    """Row name → (zero-shot top-1 beside it, shots → test accuracies over seeds); base-to-new sweeps get each
    variant's H row too."""
    rows = {name: (summary.get("zero_shot_new" if name.endswith(" new") else "zero_shot"), by_shots)
            for name, by_shots in sweep_curves(summary).items()}
    for name in [n for n in rows if n.endswith(" base")]:
        variant = name.removesuffix(" base")
        (zero, base), (zero_new, new) = rows[name], rows.get(variant + " new", (None, {}))
        rows[variant + " H"] = (harmonic_mean(zero, zero_new), {
            s: [harmonic_mean(statistics.mean(base[s]), statistics.mean(new[s]))] for s in base if new.get(s)})
    return rows
