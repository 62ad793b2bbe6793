"""`fastcoop sweep`: the paper's protocol for one dataset in one command — every (variant, shots, seed) run of
each method asked (fastcoop.methods) from one cache, zero-shot CLIP and the baselines beside them, a summary,
a Markdown table and the paper's figure (accuracy against shots). With CoCoOp's protocol (`--classes base`), every
run trains on the base classes and is tested on base and new, and the table gives base, new and H beside
zero-shot CLIP's.

The runs go in this process, sharing the model, the cache and the compiled kernels, so no run pays a process's
start-up; a method's unfinished runs (every variant, shot count and seed; CoCoOp's per variant) train stacked,
all their prompts in one text-encoder pass per step, each on its own schedule, leaving the stack when it ends;
under torchrun the runs are shared among the processes (GPUs). Each is an ordinary
run directory (DIR/<method>-<variant>/<shots>shot-seed<seed>), so `eval`,
`predict` and `interpret` work on it; rerunning the same sweep keeps the finished runs and resumes or redoes the
others. DIR/sweep.json records what the sweep is, so a different sweep never writes into it.
"""

import json
import shutil
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from fastcoop import methods
from fastcoop.cache import FeatureCache
from fastcoop.config import Recipe, Runtime
from fastcoop.devices import resolve_device
from fastcoop.distributed import World
from fastcoop.errors import FastCoopError, changed, first_few
from fastcoop.classifiers import text_classifier
from fastcoop.evaluate import evaluate_split, score_run
from fastcoop.fewshot import class_subset
from fastcoop.models import LoadedModel
from fastcoop.pipeline import train_to_run_dir, train_to_run_dirs
from fastcoop.report import sweep_curves, sweep_table
from fastcoop.run import evaluation_key, load_run, record_evaluation
from fastcoop.run_files import (CONFIG_FILE, FIGURE_FILE, RESULTS_FILE, RESUMABLE, SUMMARY_FILE, SWEEP_FILE,
                                TABLE_FILE, read_config, read_evaluations)
from fastcoop.zeroshot import zeroshot_classifier


@dataclass(frozen=True)
class Variant:
    """The recipe options a sweep varies (its method, that method's context and own options); everything else is
    the sweep's recipe. `variant_for` fills in a method's published context."""

    method: str = "coop"
    n_ctx: int | None = 16
    init: str | None = None
    csc: bool = False
    position: str = "end"
    options: tuple[tuple[str, object], ...] = ()

    @property
    def name(self) -> str:
        """The prompt's layout (none for a method that learns no prompt)."""
        return f"M{self.n_ctx}-{'csc' if self.csc else 'unified'}-{self.position}" if self.n_ctx else ""

    @property
    def label(self) -> str:
        """As tables and figures name it: the method as its paper writes it, then the context."""
        return f"{methods.get(self.method).title} {self.name}".strip()

    @property
    def folder(self) -> str:
        return "-".join(filter(None, (methods.get(self.method).name, self.name)))

    def record(self) -> dict:
        return {**asdict(self), "options": dict(self.options)}

    @classmethod
    def from_record(cls, record: dict) -> "Variant":
        return cls(**{**record, "options": tuple(sorted(record.get("options", {}).items()))})


def variant_for(method: str, n_ctx: int | None = None, csc: bool = False, position: str = "end",
                options: dict | None = None) -> Variant:
    """A method's variant: its published context (M and the words it starts from) when no M is named, a named M
    starting random (as published); of `options`, those the method declares."""
    declared = methods.get(method)
    recipe = methods.published_context(Recipe(method=method, n_ctx=n_ctx), declared)
    own = tuple(sorted((k, v) for k, v in (options or {}).items() if k in declared.options))
    return Variant(method, recipe.n_ctx, recipe.init, csc, position, own)


def sweep_runs(cache: FeatureCache, shots: list[int], seeds: list[int], variants: list[Variant]):
    """Every (variant, shots, seed), checked against the cache's subsets before any work."""
    for s in shots:
        for seed in seeds:
            cache.rows("train", s, seed)  # a clear error for a subset the cache lacks
    return [(v, s, seed) for v in variants for s in shots for seed in seeds]


def run_dir_of(out: Path, variant: Variant, shots: int, seed: int) -> Path:
    """Where a sweep keeps one of its runs."""
    return Path(out) / variant.folder / f"{shots}shot-seed{seed}"


def check_sweep_dir(out: Path, request: dict, overwrite: bool = False, world: World = World()) -> None:
    """`out` may take this sweep: it is new or empty, or holds this sweep (its shot counts and seeds may grow: only
    the new runs train), or another sweep to replace with `overwrite`; never a run or a user's own files. Under
    torchrun the writer looks and every rank gets its answer (a rank looking for itself could see another's runs)."""
    refused = None
    if world.is_writer:
        try:
            _check_sweep_dir(Path(out), request, overwrite)
        except FastCoopError as exc:
            refused = str(exc)
    refused = world.from_writer(refused)
    if refused:
        raise FastCoopError(refused)


def _check_sweep_dir(out: Path, request: dict, overwrite: bool) -> None:
    if (out / CONFIG_FILE).exists():
        raise FastCoopError(f"{out} holds a run, not a sweep; choose another --out")
    path = out / SWEEP_FILE
    if not path.is_file():
        if out.is_dir() and any(out.iterdir()):
            found = first_few(sorted(p.name for p in out.iterdir()))
            raise FastCoopError(f"{out} holds files that are not a fastcoop sweep ({found}); choose an empty or new "
                                "--out")
        return
    differ = _differences(json.loads(path.read_text()), request)
    if differ and not overwrite:
        raise FastCoopError(f"{out} holds a different sweep ({differ}); pass --overwrite to replace it, or choose "
                            "another --out")


def _differences(was: dict, now: dict) -> str:
    """What makes two sweeps different, as 'name: was → now': the cache, the variants, the shared recipe (their
    shot counts and seeds do not: each run is checked on its own)."""
    parts = [] if was.get("cache") == now["cache"] else ["feature cache: another cache"]
    if was.get("variants") != now["variants"]:
        parts += changed({"variants": _labels(was.get("variants", []))}, {"variants": _labels(now["variants"])})
        parts = parts or ["variants: their options"]
    return "; ".join(parts + changed(was.get("recipe", {}), now["recipe"], show=repr))


def _labels(variants: list[dict]) -> str:
    return ", ".join(Variant.from_record(v).label for v in variants)


def clear_sweep_dir(out: Path) -> None:
    """Remove what the sweep in `out` wrote (its files and its variants' run folders), and only that."""
    variants = json.loads((Path(out) / SWEEP_FILE).read_text()).get("variants", [])
    for variant in variants:
        shutil.rmtree(Path(out) / Variant.from_record(variant).folder, ignore_errors=True)
    for name in (SWEEP_FILE, SUMMARY_FILE, TABLE_FILE, FIGURE_FILE):
        (Path(out) / name).unlink(missing_ok=True)


def run_sweep(cache: FeatureCache, loaded: LoadedModel, out: Path, shots: list[int], seeds: list[int],
              variants: list[Variant], base: Recipe, runtime: Runtime = Runtime(), progress: bool = True,
              echo=print, world: World = World(), stack: bool = True, eval_on: list[FeatureCache] = (),
              baselines: tuple[str, ...] = ("linear-probe",), overwrite: bool = False) -> dict | None:
    """Train every run not finished yet, then write the summary, the table and the figure; returns the summary.
    `stack`: a method's unfinished runs (they differ in variant, shots and seed; CoCoOp's only in shots and
    seed) train together, one text-encoder pass per step for all of them. `eval_on`: other datasets' caches
    every run is also tested on (domain generalisation, cross-dataset transfer), recorded in each run's
    evaluations and tabulated. `baselines`: names of fastcoop.methods.BASELINES to run beside the runs (the
    all-classes protocol, with val and test splits). `overwrite`: replace another sweep in `out`. Under torchrun
    each rank trains every N-th run and the first writes the summary (None elsewhere)."""
    out = Path(out)
    runs = sweep_runs(cache, shots, seeds, variants)
    request = sweep_request(cache, shots, seeds, variants, base)
    check_sweep_dir(out, request, overwrite, world)
    if world.is_writer:
        if overwrite and (out / SWEEP_FILE).is_file():
            clear_sweep_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / SWEEP_FILE).write_text(json.dumps(request, indent=2) + "\n")
    world.from_writer(None)  # no rank writes a run before the writer has claimed the folder
    device = resolve_device(runtime.device)
    started = time.perf_counter()
    groups: dict = {}  # what runs stacked share (methods.stack_key) → this rank's runs to start or resume
    for i, (variant, s, seed) in enumerate(runs, start=1):
        if i % world.size != world.rank % world.size:
            continue
        run_dir = run_dir_of(out, variant, s, seed)
        recipe = replace(base, shots=s, seed=seed, **asdict(variant))
        done = read_config(run_dir)
        same = done is not None and done.get("request") == methods.publish(recipe, len(cache.classnames), device,
                                                                           cache.dataset).record()
        if stack and (done is None or done["state"] in RESUMABLE and same):
            groups.setdefault(methods.stack_key(recipe, methods.get(recipe.method)), []).append((variant, recipe,
                                                                                                 run_dir))
        elif done is None or done["state"] != "complete" or not same:
            echo(f"[{i}/{len(runs)}] {variant.label}, {s} shots, seed {seed}")
            train_to_run_dir(cache, loaded, recipe, run_dir, runtime, progress=progress, overwrite=done is not None
                             and done["state"] == "complete")
    for group in groups.values():
        stacked = list(dict.fromkeys(variant for variant, _, _ in group))  # the group's variants
        if len(group) == 1:
            echo(f"{stacked[0].label}, {group[0][1].shots} shots, seed {group[0][1].seed}")
        else:
            named = stacked[0].label if len(stacked) == 1 else \
                f"{methods.get(stacked[0].method).title} {', '.join(v.name for v in stacked)}"
            echo(f"{named}: {len(group)} runs stacked ({_listed({c.shots for _, c, _ in group})} shots, "
                 f"seeds {_listed({c.seed for _, c, _ in group})})")
        _train_stacked(cache, loaded, [(recipe, run_dir) for _, recipe, run_dir in group], runtime, progress, echo)
    world.from_writer(None)  # every rank's runs are finished
    if not world.is_writer:
        return None
    results = []
    for variant, s, seed in runs:
        run_dir = run_dir_of(out, variant, s, seed)
        scores = json.loads((run_dir / RESULTS_FILE).read_text())
        results.append({"variant": variant.label, "shots": s, "seed": seed,
                        "run": str(run_dir),
                        "test": scores.get("test", {}).get("top1"),
                        **({"test_new": scores["test_new"]["top1"]} if "test_new" in scores else {}),
                        **({"transfer": _transfer(run_dir, loaded, eval_on)} if eval_on else {})})
    seconds = {"runs": time.perf_counter() - started}  # trained and tested (on --eval-on's caches too)
    started = time.perf_counter()
    summary = {"cache": str(Path(cache.path).resolve()), "classes": len(cache.classnames),
               "methods": sorted({methods.get(variant.method).name for variant in variants}),
               "trained_on": base.classes, "runs": results,
               "zero_shot": _zero_shot(cache, loaded, device, base.classes)}
    if base.classes == "base":  # the base-to-new protocol: zero-shot CLIP on the new half too, no baselines
        summary["zero_shot_new"] = _zero_shot(cache, loaded, device, "new")
    seconds["zero_shot"] = time.perf_counter() - started
    if base.classes != "base":
        summary.update(_baselines(cache, loaded, shots, seeds, baselines, device, seconds))
    summary["seconds"] = seconds
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    (out / TABLE_FILE).write_text(sweep_table([summary], [out.name]) + "\n")
    plot_accuracy(summary, out / FIGURE_FILE, title=Path(cache.path).stem)
    return summary


def _baselines(cache: FeatureCache, loaded: LoadedModel, shots: list[int], seeds: list[int],
               baselines: tuple[str, ...], device: str, seconds: dict) -> dict:
    """The baselines of the all-classes protocol (fastcoop.methods.BASELINES) for every (shots, seed), each on
    the runs' own few-shot images, as {"baselines": {title: rows}}; each one's time into `seconds`. They select
    their settings on val: without it, none."""
    found = {}
    for name in baselines:
        baseline = methods.baseline(name)
        missing = [split for split in baseline.needs if split not in cache.splits]
        if missing:
            if "test" in cache.splits:
                warnings.warn(f"{cache.path} has no {' or '.join(missing)} split, so the table has no "
                              f"{baseline.title} ({baseline.why_val}): cache with --splits train,val,test for it")
            continue
        started = time.perf_counter()
        found[baseline.title] = baseline.run(cache, loaded, [(s, seed) for s in shots for seed in seeds], device)
        seconds[baseline.title] = time.perf_counter() - started
    return {"baselines": found} if found else {}


def _listed(values) -> str:
    return ", ".join(str(v) for v in sorted(values, key=lambda v: (v is None, v)))


def _train_stacked(cache: FeatureCache, loaded: LoadedModel, group: list, runtime: Runtime, progress: bool,
                   echo) -> None:
    """Train (recipe, run_dir) pairs as one stack; a stack the device's memory cannot hold is split in two and
    each half trained in turn (each run resumes from whatever its half saved)."""
    try:
        train_to_run_dirs(cache, loaded, [r for r, _ in group], [d for _, d in group], runtime=runtime,
                          progress=progress)
    except torch.OutOfMemoryError:
        if len(group) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(group) // 2
        echo(f"  {len(group)} runs stacked do not fit in the device's memory: training them as {half} and "
             f"{len(group) - half}")
        _train_stacked(cache, loaded, group[:half], runtime, progress, echo)
        _train_stacked(cache, loaded, group[half:], runtime, progress, echo)


def _transfer(run_dir: Path, loaded: LoadedModel, caches: list[FeatureCache]) -> dict[str, float]:
    """A run's test top-1 on each of `caches` (the whole test split, all its classes), recorded in the run's
    evaluations as `fastcoop eval` records them; one measured before on the same cache is read back."""
    evaluations, scores, run = read_evaluations(run_dir), {}, None
    for cache in caches:
        done = evaluations.get(evaluation_key(cache, "test", "all"))
        if done is None or done.get("identity") != cache.identity():
            run = run or load_run(run_dir, loaded=loaded)
            try:
                done, classes = score_run(run, cache)
            except FastCoopError as exc:  # a class-specific context on classes it has none for
                warnings.warn(f"{run_dir} is not tested on {cache.path}: {exc}")
                continue
            record_evaluation(run_dir, cache, "test", classes, done)
        scores[cache.dataset or Path(cache.path).stem] = done["top1"]
    return scores


def sweep_request(cache, shots, seeds, variants, base: Recipe) -> dict:
    """What a sweep is (its sweep.json): the cache, the runs and the recipe they share."""
    return {"cache": cache.identity(), "shots": shots, "seeds": seeds,
            "variants": [v.record() for v in variants], "recipe": replace(base, shots=None, seed=0).record()}


def _zero_shot(cache: FeatureCache, loaded: LoadedModel, device: str, classes: str = "all") -> float | None:
    """Zero-shot CLIP's test top-1 among a class subset's names (all, or a half of the base-to-new protocol)."""
    if "test" not in cache.splits:
        return None
    names = [cache.classnames[k] for k in class_subset(len(cache.classnames), classes)]
    return evaluate_split(cache, text_classifier(zeroshot_classifier(loaded, names, device=device)),
                          classes=classes)["top1"]


def plot_accuracy(summary: dict, path: Path, title: str) -> None:
    """The paper's figure (accuracy_figure) written to `path`."""
    import matplotlib.pyplot as plt

    fig = accuracy_figure(summary, title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def accuracy_figure(summary: dict, title: str):
    """The paper's figure: test accuracy against shots (1, 2, 4, 8, 16 on a log axis), a curve per variant and
    baseline, each its own colour (a base-to-new variant's new classes dotted in its base curve's colour), zero-shot
    CLIP as red stars at zero shots (hollow: on the new classes); the legend beside the axes, never over a point."""
    import matplotlib
    import matplotlib.colors

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    red = "#d62728"  # zero-shot CLIP's, and no curve's
    palette = [c for c in map(matplotlib.colors.to_hex, plt.rcParams["axes.prop_cycle"].by_key()["color"]) if c != red]
    colours: dict[str, str] = {}
    for method, by_shots in sweep_curves(summary).items():
        curve = method.removesuffix(" new").removesuffix(" base")
        colour = colours.setdefault(curve, palette[len(colours) % len(palette)])
        shots = sorted(by_shots)
        means = [100 * statistics.mean(by_shots[s]) for s in shots]
        errors = [100 * statistics.stdev(by_shots[s]) if len(by_shots[s]) > 1 else 0 for s in shots]
        new = method.endswith(" new")
        ax.errorbar(shots, means, yerr=errors, marker="s" if new else "o", capsize=3, label=method, color=colour,
                    linestyle=":" if new else "--" if method in summary.get("baselines", {}) else "-",
                    markerfacecolor="none" if new else colour)
    for key, label, face in (("zero_shot", "zero-shot CLIP", red), ("zero_shot_new", "zero-shot CLIP new", "none")):
        if summary.get(key) is not None:
            ax.plot([0.5], [100 * summary[key]], marker="*", markersize=14, color=red, markerfacecolor=face,
                    linestyle="none", label=label + (" base" if key == "zero_shot" and "zero_shot_new" in summary
                                                     else ""))
    ax.set_xscale("log", base=2)
    ticks = [0.5] + sorted({run["shots"] for run in summary["runs"]})
    ax.set_xticks(ticks, ["0"] + [str(t) for t in ticks[1:]])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    fig.tight_layout()
    return fig
