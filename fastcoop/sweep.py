"""`fastcoop sweep`: the paper's protocol for one dataset in one command — every (variant, shots, seed) CoOp run
from one cache, zero-shot CLIP and the linear probe beside them, a summary, a Markdown table and the paper's
figure (accuracy against shots). With CoCoOp's protocol (`--method cocoop --classes base`), every run trains on
the base classes and is tested on base and new, and the table gives base, new and H beside zero-shot CLIP's.

The runs go in this process, sharing the model, the cache and the compiled kernels, so no run pays a process's
start-up; new runs that differ only in their seed train stacked, all their prompts in one text-encoder pass per
step; under torchrun the runs are shared among the processes (GPUs). Each is an ordinary
run directory (DIR/<variant>/<shots>shot-seed<seed>), so `eval`,
`predict` and `interpret` work on it; rerunning the same sweep keeps the finished runs and resumes or redoes the
others. DIR/sweep.json records what the sweep is, so a different sweep never writes into it.
"""

import json
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from fastcoop.cache import FeatureCache
from fastcoop.config import TrainConfig
from fastcoop.distributed import World
from fastcoop.errors import FastCoopError
from fastcoop.evaluate import evaluate_split, text_classifier
from fastcoop.fewshot import class_subset, harmonic_mean
from fastcoop.linear_probe import linear_probe
from fastcoop.models import LoadedModel
from fastcoop.pipeline import train_to_run_dir, train_to_run_dirs
from fastcoop.report import percent
from fastcoop.run import RESULTS_FILE, read_config
from fastcoop.zeroshot import zeroshot_classifier

SWEEP_FILE, SUMMARY_FILE, TABLE_FILE, FIGURE_FILE = "sweep.json", "summary.json", "summary.md", "accuracy.png"


@dataclass(frozen=True)
class Variant:
    """The recipe options a sweep varies; everything else is the published recipe."""

    n_ctx: int = 16
    csc: bool = False
    position: str = "end"

    @property
    def name(self) -> str:
        return f"M{self.n_ctx}-{'csc' if self.csc else 'unified'}-{self.position}"


def sweep_runs(cache: FeatureCache, shots: list[int], seeds: list[int], variants: list[Variant]):
    """Every (variant, shots, seed), checked against the cache's subsets before any work."""
    for s in shots:
        for seed in seeds:
            cache.rows("train", s, seed)  # a clear error for a subset the cache lacks
    return [(v, s, seed) for v in variants for s in shots for seed in seeds]


def check_sweep_dir(out: Path, request: dict) -> None:
    path = Path(out) / SWEEP_FILE
    if path.is_file() and json.loads(path.read_text()) != request:
        raise FastCoopError(f"{out} holds a different sweep (see its {SWEEP_FILE}); choose another --out")


def run_sweep(cache: FeatureCache, loaded: LoadedModel, out: Path, shots: list[int], seeds: list[int],
              variants: list[Variant], base: TrainConfig, progress: bool = True, echo=print,
              world: World = World(), stack: bool = True) -> dict | None:
    """Train every run not finished yet, then write the summary, the table and the figure; returns the summary.
    `stack`: new runs of one variant and shot count (they differ only in seed) train together, one text-encoder
    pass per step for all of them. Under torchrun each rank trains every N-th run and the first writes the
    summary (None elsewhere)."""
    out = Path(out)
    runs = sweep_runs(cache, shots, seeds, variants)
    request = sweep_request(cache, shots, seeds, variants, base)
    check_sweep_dir(out, request)
    if world.is_writer:
        out.mkdir(parents=True, exist_ok=True)
        (out / SWEEP_FILE).write_text(json.dumps(request, indent=2) + "\n")
    groups: dict[tuple, list] = {}  # (variant, shots) → this rank's runs to start, trained together when stacked
    for i, (variant, s, seed) in enumerate(runs, start=1):
        if i % world.size != world.rank % world.size:
            continue
        run_dir = out / variant.name / f"{s}shot-seed{seed}"
        config = replace(base, shots=s, seed=seed, **asdict(variant))
        done = read_config(run_dir)
        if done is None and stack:
            groups.setdefault((variant, s), []).append((config, run_dir))
        elif done is None or done["state"] != "complete" or done.get("request") != asdict(config):
            echo(f"[{i}/{len(runs)}] {variant.name}, {s} shots, seed {seed}")
            train_to_run_dir(cache, loaded, config, run_dir, progress=progress, overwrite=done is not None
                             and done["state"] == "complete")
    for (variant, s), group in groups.items():
        echo(f"{variant.name}, {s} shots, seeds {', '.join(str(c.seed) for c, _ in group)}")
        train_to_run_dirs(cache, loaded, [c for c, _ in group], [d for _, d in group], progress=progress)
    world.from_writer(None)  # every rank's runs are finished
    if not world.is_writer:
        return None
    results = []
    for variant, s, seed in runs:
        run_dir = out / variant.name / f"{s}shot-seed{seed}"
        scores = json.loads((run_dir / RESULTS_FILE).read_text())
        results.append({"variant": variant.name, "shots": s, "seed": seed, "run": str(run_dir),
                        "test": scores.get("test", {}).get("top1"),
                        **({"test_new": scores["test_new"]["top1"]} if "test_new" in scores else {})})
    summary = {"cache": str(Path(cache.path).resolve()), "classes": len(cache.classnames), "method": base.method,
               "trained_on": base.classes, "runs": results,
               "zero_shot": _zero_shot(cache, loaded, base.device, base.classes)}
    if base.classes == "base":  # the base-to-new protocol: zero-shot CLIP on the new half too
        summary["zero_shot_new"] = _zero_shot(cache, loaded, base.device, "new")
    elif "val" in cache.splits and "test" in cache.splits:  # the linear probe is CoOp's baseline, on all classes
        summary["linear_probe"] = [linear_probe(cache, s, seed) for s in shots for seed in seeds]
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    (out / TABLE_FILE).write_text(summary_table([summary], [out.name]) + "\n")
    plot_accuracy(summary, out / FIGURE_FILE, title=Path(cache.path).stem)
    return summary


def sweep_request(cache, shots, seeds, variants, base: TrainConfig) -> dict:
    return {"cache": cache.identity(), "shots": shots, "seeds": seeds,
            "variants": [asdict(v) for v in variants], "recipe": asdict(replace(base, shots=None, seed=0))}


def _zero_shot(cache: FeatureCache, loaded: LoadedModel, device: str, classes: str = "all") -> float | None:
    """Zero-shot CLIP's test top-1 among a class subset's names (all, or a half of the base-to-new protocol)."""
    if "test" not in cache.splits:
        return None
    names = [cache.classnames[k] for k in class_subset(len(cache.classnames), classes)]
    return evaluate_split(cache, text_classifier(zeroshot_classifier(loaded, names, device=device)),
                          classes=classes)["top1"]


def read_summaries(folders: list[Path]) -> list[dict]:
    """The summaries of sweep folders; [] when none is a sweep; mixing sweeps and runs is refused."""
    is_sweep = [(Path(f) / SUMMARY_FILE).is_file() for f in folders]
    if not any(is_sweep):
        return []
    if not all(is_sweep):
        odd = folders[is_sweep.index(False)]
        raise FastCoopError(f"{odd} is not a finished sweep (no {SUMMARY_FILE}); report sweeps or runs, not both")
    return [json.loads((Path(f) / SUMMARY_FILE).read_text()) for f in folders]


def curves(summary: dict) -> dict[str, dict[int, list[float]]]:
    """name → shots → test accuracies over seeds: each variant (base-to-new: on base and on new classes), and the
    linear probe."""
    table: dict[str, dict[int, list[float]]] = {}
    base_to_new = summary.get("trained_on") == "base"
    for run in summary["runs"]:
        for key, suffix in (("test", " base" if base_to_new else ""), ("test_new", " new")):
            if run.get(key) is not None:
                table.setdefault(run["variant"] + suffix, {}).setdefault(run["shots"], []).append(run[key])
    for probe in summary.get("linear_probe", []):
        table.setdefault("linear probe", {}).setdefault(probe["shots"], []).append(probe["test"]["top1"])
    return table


def summary_table(summaries: list[dict], names: list[str]) -> str:
    """Markdown: test top-1 (%) mean ± std over seeds, per dataset and variant (rows) and shots (columns); with
    several datasets, their average too (the paper's first panel). Base-to-new sweeps show each variant's base, new
    and H rows, H from the mean base and mean new accuracy as CoCoOp reports it (for the average: from the
    averaged base and new)."""
    shots = sorted({run["shots"] for s in summaries for run in s["runs"]})
    lines = ["| dataset | method | zero-shot | " + " | ".join(f"{s} shots" for s in shots) + " |",
             "|" + " --- |" * (3 + len(shots))]
    per_dataset = [_table_rows(summary) for summary in summaries]
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
    return "\n".join(lines)


def _table_rows(summary: dict) -> dict[str, tuple[float | None, dict[int, list[float]]]]:
    """Row name → (zero-shot top-1 beside it, shots → test accuracies over seeds); base-to-new sweeps get each
    variant's H row too."""
    rows = {name: (summary.get("zero_shot_new" if name.endswith(" new") else "zero_shot"), by_shots)
            for name, by_shots in curves(summary).items()}
    for name in [n for n in rows if n.endswith(" base")]:
        variant = name.removesuffix(" base")
        (zero, base), (zero_new, new) = rows[name], rows.get(variant + " new", (None, {}))
        rows[variant + " H"] = (harmonic_mean(zero, zero_new), {
            s: [harmonic_mean(statistics.mean(base[s]), statistics.mean(new[s]))] for s in base if new.get(s)})
    return rows


def plot_accuracy(summary: dict, path: Path, title: str) -> None:
    """The paper's figure: test accuracy against shots (1, 2, 4, 8, 16 on a log axis), a curve per variant and
    the linear probe, zero-shot CLIP as a star at zero shots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for method, by_shots in curves(summary).items():
        shots = sorted(by_shots)
        means = [100 * statistics.mean(by_shots[s]) for s in shots]
        errors = [100 * statistics.stdev(by_shots[s]) if len(by_shots[s]) > 1 else 0 for s in shots]
        ax.errorbar(shots, means, yerr=errors, marker="o", capsize=3, label=method,
                    linestyle="--" if method == "linear probe" else "-")
    if summary.get("zero_shot") is not None:
        ax.plot([0.5], [100 * summary["zero_shot"]], marker="*", markersize=14, color="tab:red", linestyle="none",
                label="zero-shot CLIP")
    ax.set_xscale("log", base=2)
    ticks = [0.5] + sorted({run["shots"] for run in summary["runs"]})
    ax.set_xticks(ticks, ["0"] + [str(t) for t in ticks[1:]])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
