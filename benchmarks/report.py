"""Tables (benchmarks/README.md) and plots from the per-device result files."""

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.step import GRAPH_VARIANTS as STEP_GRAPH_VARIANTS  # noqa: E402

INTRO = """# Benchmarks: fastcoop against the published CoOp computation

Made by `python -m benchmarks` (all sections; `--quick`: a CPU-sized subset; `--plan headline`: the README's
headline numbers on a GPU); each device writes `results/<device>.json` and this page is regenerated from every
result file present. Random-init weights (speed does not depend on weight values); real class names from the
paper's datasets, so real prompt lengths. The published step runs the image encoder on 32 images and all K
prompts × 77 tokens through the text encoder, forward and backward (fp16 autocast on GPU, as published; fp32 on
CPU); it leaves out JPEG decoding and augmentation, so it flatters the published code. fastcoop steps run bf16
autocast on GPU, fp32 on CPU. Each section is stamped with the plan, commit and date that measured it;
`CHANGELOG.md` says what changed between measured versions and what each change was predicted to do.
"""


GRAPH_VARIANTS = list(STEP_GRAPH_VARIANTS)
STEP_KEYS = ("step", "training_memory", "profile", "device_ops")  # measured by the step section
SECTION_OF = {**{key: "step" for key in STEP_KEYS}, "tip_adapter": "methods"}  # keys measured by another's run


def fmt(value, digits=1):
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def device_title(env: dict) -> str:
    what = env.get("gpu") or f"CPU ({env.get('cpu_count')} threads)"
    extra = f", driver {env['driver']}, CUDA {env['cuda']}" if env.get("gpu") else ""
    return (f"{what} — {env['date']}, torch {env['torch']}, triton {env.get('triton')}, open_clip "
            f"{env['open_clip']}{extra}, commit {env.get('commit')}")


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table's lines: the header, its rule, a line per row of cells."""
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


BF16_CPU = "fastcoop_eager_bf16"  # benchmarks.step's CPU step in bf16


def step_table(rows: list[dict]) -> list[str]:
    """Speed-up: the published step against fastcoop's fastest at the default precision (bf16 on a GPU, fp32 on
    CPU); a CPU's bf16 step (on request) is shown beside it in parentheses."""
    lines = ["| model | K | M | context | published ms | cached 77-token ms | fastcoop eager ms (CPU: fp32 (bf16)) | "
             "fastcoop graph ms "
             "(triton / grid / flex attention / triton, no fused elementwise kernels / triton, one class per "
             "attention tile / triton, activation inside the MLP's products) | speed-up | step's own GB "
             "(published → cached → fastcoop eager) |", "|" + " --- |" * 10]
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["classes"], r["n_ctx"], r["csc"]), {})[r["variant"]] = r
    for (model, k, m, csc), v in groups.items():
        def ms(name, digits=1):
            return fmt(v.get(name, {}).get("median_ms"), digits)
        best = min(x["median_ms"] for name, x in v.items() if name.startswith("fastcoop") and name != BF16_CPU)
        speedup = f"{v['published']['median_ms'] / best:.1f}×" if "published" in v else "–"
        eager = ms("fastcoop_eager", 2)
        if BF16_CPU in v:
            eager += f" ({ms(BF16_CPU, 2)})"
            if "published" in v:
                speedup += f" ({v['published']['median_ms'] / v[BF16_CPU]['median_ms']:.1f}×)"
        peaks = " → ".join(fmt(v.get(n, {}).get("peak_gb"), 2) for n in ("published", "cached_77_tokens",
                                                                            "fastcoop_eager"))
        lines.append(f"| {model} | {k} | {m} | {'CSC' if csc else 'unified'} | {ms('published')} | "
                     f"{ms('cached_77_tokens')} | {eager} | "
                     f"{' / '.join(ms(n, 2) for n in GRAPH_VARIANTS)} | {speedup} | {peaks} |")
    return lines


def memory_table(rows: list[dict]) -> list[str]:
    return markdown_table(
        ["model", "K", "M", "GPU memory of a graphed 16-shot training run, GB",
         "of it resident before the first step (weights, learner, features), GB"],
        [[r["model"], r["classes"], r["n_ctx"], fmt(r["peak_gb"], 3), fmt(r.get("resident_gb"), 3)] for r in rows])


def profile_table(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        ops = f" from {r['device_ops_per_step']} device operations" if r.get("device_ops_per_step") else ""
        lines += [f"{r['model']}, K = {r['classes']}, eager step: {r['kernels_per_step']:.0f} kernels{ops}, "
                  f"{r['kernel_ms_per_step']:.3f} ms of kernel time per step (the graphed step measured "
                  f"{fmt(r.get('graph_ms'), 3)} ms).", "", "| kernel | calls per step | ms per step |",
                  "|" + " --- |" * 3]
        lines += [f"| `{t['kernel']}` | {t['calls_per_step']:g} | {t['ms_per_step']:.4f} |" for t in r["top"]]
        lines.append("")
    return lines


def device_ops_table(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        lines += [f"{r['model']}, K = {r['classes']}: {r['device_ops_per_step']} device operations per step "
                  "(PyTorch operators that compute or write, and Triton launches; each is one GPU kernel or more).",
                  "", "| operation | per step |", "| --- | --- |"]
        lines += [f"| `{name}` | {count} |" for name, count in r["ops"].items()]
        lines.append("")
    return lines


def attention_table(rows: list[dict]) -> list[str]:
    return markdown_table(["K", "packed rows", "heads", "implementation", "forward + backward, graphed ms"],
                          [[r["classes"], r["rows"], r["heads"], r["implementation"], f"{r['graph_ms']:.4f}"]
                           for r in rows])


def full_run_table(rows: list[dict]) -> list[str]:
    stages = ("interpreter", "imports", "model", "setup", "loop", "save_and_test")
    lines = ["| dataset | K | epochs | steps | Triton kernels | whole process s | " +
             " | ".join(f"{s.replace('_', ' ')} s" for s in stages) + " | of the loop: first epoch s | "
             "of it: kernels s | of it: graph capture s | process start → loop s | "
             "loop ms per step after the first epoch | published estimate s | ratio |",
             "|" + " --- |" * 19]
    for r in rows:
        est = r.get("published_estimate_seconds")
        ratio = "–" if est is None else f"{est / r['process_seconds']:.1f}×"
        seconds = [r.get(f"{s}_seconds") for s in (*stages, "first_epoch", "kernels", "capture", "start_to_loop")]
        lines.append(f"| {r['dataset']} | {r['classes']} | {r['epochs']} | {r['steps']} | "
                     f"{_kernel_cache(r)} | {fmt(r['process_seconds'])} | "
                     f"{' | '.join(fmt(s) for s in seconds)} | {fmt(r.get('loop_ms_per_step'), 2)} | "
                     f"{fmt(est)} | {ratio} |")
    return lines


def _kernel_cache(row: dict) -> str:
    """cold or warm, and how many kernel variants the run compiled (where counted)."""
    cache = row.get("kernel_cache", "–")
    return cache if row.get("kernels_compiled") is None else f"{cache}, {row['kernels_compiled']} compiled"


def cocoop_table(rows: list[dict]) -> list[str]:
    lines = ["| model | K | batch | published step ms | fastcoop step ms | speed-up | fastcoop GPU memory GB |",
             "|" + " --- |" * 7]
    lines += [f"| {r['model']} | {r['classes']} | {r['batch']} | {r['published_ms']:.1f} | {r['fastcoop_ms']:.2f} | "
              f"{r['speedup']:.1f}× | {fmt(r.get('fastcoop_peak_gb'), 2)} |" for r in rows if "batch" in r]
    lines += ["", "| model | K | test images | evaluation s |", "|" + " --- |" * 4]
    lines += [f"| {r['model']} | {r['classes']} | {r['eval_images']} | {r['eval_seconds']:.2f} |"
              for r in rows if "eval_images" in r]
    lines += ["", "| base-to-new run (16 shots, 10 epochs, batch 1) | base classes | steps | whole process s | of it "
              "imports, model, loop s | published estimate s | ratio |", "|" + " --- |" * 7]
    return lines + [f"| {r['dataset']}-shaped | {r['classes']} | {r['steps']} | {r['process_seconds']:.1f} | "
                    f"{r['imports_seconds']:.1f}, {r['model_seconds']:.1f}, {r['loop_seconds']:.1f} | "
                    f"{r['published_estimate_seconds']:.0f} | "
                    f"{r['published_estimate_seconds'] / r['process_seconds']:.1f}× |"
                    for r in rows if "process_seconds" in r]


def cache_table(rows: list[dict]) -> list[str]:
    lines = ["| model | JPEGs (500×375) | views each | batch | workers | crops | whole command s | "
             "of it extracting s | views/s (whole / extracting) | workers alone views/s | encoder alone views/s | extracting ÷ "
             "encoder | peak RSS GB | file GB |", "|" + " --- |" * 14]
    for r in rows:
        ratio = r["extract_views_per_s"] / r["encoder_views_per_s"] if r.get("extract_views_per_s") else None
        crops = r.get("crops", "pil") + (f" ({fmt(r['device_crop_views_per_s'], 0)} views/s alone)"
                                         if r.get("device_crop_views_per_s") else "")
        lines.append(f"| {r['model']} | {r['images']} | {r['views_per_image']} | {r['batch']} | {r['workers']} | "
                     f"{crops} | "
                     f"{fmt(r['process_seconds'])} | {fmt(r.get('extract_seconds'))} | {fmt(r['views_per_s'])} / "
                     f"{fmt(r.get('extract_views_per_s'))} | {fmt(r['decode_views_per_s'])} | "
                     f"{fmt(r['encoder_views_per_s'])}"
                     + (f" (graphed {fmt(r['encoder_graph_views_per_s'])})" if r.get("encoder_graph_views_per_s")
                        else "") + f" | {'–' if ratio is None else f'{ratio:.0%}'} | "
                     f"{fmt(r['peak_rss_gb'], 2)} | {fmt(r['file_gb'], 3)} |")
    return lines


def sweep_table(rows: list[dict]) -> list[str]:
    lines = ["| dataset | K | runs | epochs | steps | one `fastcoop sweep` s (all runs stacked) | its largest run alone s "
             "| sweep ÷ largest run | two variants (`--csc no,yes`) s | ÷ sweep | the same, runs one by one s | "
             "separate `fastcoop train` processes s | separate ÷ sweep | published estimate s |",
             "|" + " --- |" * 14]
    for r in rows:
        ratio = r.get("separate_vs_sweep")
        lines.append(f"| {r['dataset']} | {r['classes']} | {r['runs']} | {r['epochs'] or 'published'} | {r['steps']} | "
                     f"{fmt(r['sweep_seconds'])} | {fmt(r.get('largest_run_seconds'))} | "
                     f"{fmt(r.get('sweep_vs_largest_run'), 2)}{'×' if r.get('sweep_vs_largest_run') else ''} | "
                     f"{fmt(r.get('two_variants_seconds'))} | "
                     f"{fmt(r.get('two_variants_vs_sweep'), 2)}{'×' if r.get('two_variants_vs_sweep') else ''} | "
                     f"{fmt(r.get('unstacked_sweep_seconds'))} | {fmt(r.get('separate_seconds'))} | "
                     f"{f'{ratio:.1f}×' if ratio else '–'} | {fmt(r['published_estimate_seconds'], 0)} |")
    return lines


def load_table(rows: list[dict]) -> list[str]:
    """fastcoop's whole run alone and beside busy processes; beside each, the plain PyTorch loop under the same
    load, and fastcoop's slowdown as a multiple of the plain loop's (where the row has it)."""
    kinds = [k.removesuffix("_seconds") for k in rows[0] if k.startswith("beside_") and k.endswith("_seconds")] \
        if rows else []

    def cell(r: dict, kind: str) -> str:
        ours = f"{fmt(r[kind + '_seconds'])} ({r[kind + '_seconds'] / r['alone_seconds']:.1f}×)"
        plain = r.get("plain_" + kind + "_seconds")
        if plain is None:
            return ours
        return (f"{ours}; plain {fmt(plain)} ({plain / r['plain_alone_seconds']:.1f}×); "
                f"{r[kind + '_excess']:.2f}× its slowdown")

    return markdown_table(
        ["dataset", "cores", "epochs", "alone s (plain loop s)",
         *(k.removeprefix("beside_").replace("_", " ") + " busy: s" for k in kinds)],
        [[r["dataset"], r["cores"], r["epochs"],
          fmt(r["alone_seconds"]) + (f" ({fmt(r['plain_alone_seconds'])})" if "plain_alone_seconds" in r else ""),
          *(cell(r, k) for k in kinds)] for r in rows])


def table_table(rows: list[dict]) -> list[str]:
    return markdown_table(
        ["dataset", "K", "methods × subsets", "baselines", "one `fastcoop sweep` s", "of it: not prompt learners"],
        [[r["dataset"], r["classes"], f"{len(r['methods'])} × {r['runs'] // len(r['methods'])}",
          ", ".join(r["baselines"]), f"**{fmt(r['sweep_seconds'])}**", f"{r['not_prompt_share']:.0%}"]
         for r in rows])


def methods_table(rows: list[dict]) -> list[str]:
    return markdown_table(
        ["dataset", "method", "epochs", "steps", "whole process s", "loop s", "loop ms per step", "vs CoOp's step",
         "published estimate s (prompt learners: steps × published CoOp step; others: their image encoding)"],
        [[r["dataset"], r["method"], r["epochs"], r["steps"], fmt(r["process_seconds"]), fmt(r["loop_seconds"]),
          fmt(r["loop_ms_per_step"]), f"{fmt(r['per_step_vs_coop'], 2)}×" if r["per_step_vs_coop"] else "–",
          fmt(r["published_estimate_seconds"], 0)]
         for r in rows])


def tip_adapter_table(rows: list[dict]) -> list[str]:
    return markdown_table(
        ["dataset", "K", "keys", "val images", "`fastcoop tip-adapter --finetune` s (whole command)",
         "published search estimate s (one setting × grid × 2)"],
        [[r["dataset"], r["classes"], f"{r['keys']:,}", f"{r['val_images']:,}", f"**{fmt(r['process_seconds'])}**",
          f"{fmt(r['published_search_estimate_seconds'], 0)} ({fmt(r['published_setting_ms'])} ms × "
          f"{r['grid'][0]} × {r['grid'][1]} × 2)"] for r in rows])


def protocol_table(rows: list[dict]) -> list[str]:
    return markdown_table(
        ["dataset", "K", "runs", "JPEGs per class (train / test), size", "`fastcoop cache` s", "`fastcoop sweep` s",
         "protocol s", "published estimate s (steps × step + start-ups)", "published ÷ protocol"],
        [[f"{r['dataset']}{' (quick)' if r['quick'] else ''}", r["classes"], r["runs"],
          f"{r['train_images_per_class']} / {r['test_images_per_class']}, {r['image_size'][0]}×{r['image_size'][1]}",
          fmt(r["cache_seconds"]), fmt(r["sweep_seconds"]), f"**{fmt(r['protocol_seconds'])}**",
          f"{fmt(r['published_estimate_seconds'], 0)} ({r['steps']} × {fmt(r['published_step_ms'])} ms + "
          f"{r['runs']} × {fmt(r['published_startup_seconds'])} s)", f"{r['published_vs_protocol']:.1f}×"]
         for r in rows])


def kernel_table(rows: list[dict]) -> list[str]:
    """Launched: one forward + backward timed as a program runs it (host launch overhead included);
    graphed: the same captured in a CUDA graph, the GPU work alone (how the training step runs it). Runs > 1:
    a training step's stacked runs, each B × K."""
    names = sorted({r["implementation"] for r in rows})
    keys = ("median_ms", "graph_ms") if any(r.get("graph_ms") for r in rows) else ("median_ms",)
    columns = [(n, key) for key in keys for n in names]
    header = " | ".join(f"{n} {'launched' if key == 'median_ms' else 'graphed'} ms" for n, key in columns)
    lines = [f"| runs | B | K | D | dtype | {header} |", "|" + " --- |" * (5 + len(columns))]
    groups = {}
    for r in rows:
        groups.setdefault((r.get("runs", 1), r["batch"], r["classes"], r["dim"], r["dtype"]), {})[
            r["implementation"]] = r
    for (runs, b, k, d, dt), v in groups.items():
        lines.append(f"| {runs} | {b} | {k} | {d} | {dt} | " +
                     " | ".join(fmt(v.get(n, {}).get(key), 3) for n, key in columns) + " |")
    return lines


def exactness_table(rows: list[dict]) -> list[str]:
    lines = ["| model | K | M | context | attention | text max abs diff / max | steps | context max abs diff | "
             "context rel. diff |", "|" + " --- |" * 9]
    for r in rows:
        lines.append(f"| {r['model']} | {r['classes']} | {r['n_ctx']} | {'CSC' if r['csc'] else 'unified'} | "
                     f"{r.get('attention', 'grid')} | "
                     f"{r['text_max_abs_diff_rel']:.1e} | {r['steps']} | {r['ctx_max_abs_diff']:.1e} | "
                     f"{r['ctx_rel_norm_diff']:.1e} |")
    return lines


def plots(result: dict, out: Path, slug: str) -> list[str]:
    """speed-up vs K, where a step's time goes, a step's own memory vs K (GPU only); returns the file names."""
    made = []
    steps = result.get("step", [])
    if steps:
        fig, ax = plt.subplots(figsize=(6, 4))
        series = {}
        for r in steps:
            series.setdefault((r["model"], r["n_ctx"], r["csc"]), {}).setdefault(r["classes"], {})[r["variant"]] = r
        for (model, m, csc), by_k in series.items():
            ks = sorted(by_k)
            speedups = [by_k[k]["published"]["median_ms"] / min(v["median_ms"] for n, v in by_k[k].items()
                                                                if n.startswith("fastcoop")) for k in ks]
            ax.plot(ks, speedups, marker="o", label=f"{model} M={m} {'CSC' if csc else 'unified'}")
        made.append(_save_against_k(fig, ax, "speed-up over the published step", out / f"speedup_vs_k_{slug}.png"))
        peaks = [r for r in steps if r["peak_gb"]]
        if peaks:
            fig, ax = plt.subplots(figsize=(6, 4))
            for variant in ("published", "cached_77_tokens", "fastcoop_eager", *GRAPH_VARIANTS):
                pts = sorted((r["classes"], r["peak_gb"]) for r in peaks if r["variant"] == variant
                             and r["n_ctx"] == 16 and not r["csc"] and r["model"] == peaks[0]["model"])
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=variant)
            made.append(_save_against_k(fig, ax, "GB one eager step allocates", out / f"memory_vs_k_{slug}.png"))
    if result.get("breakdown"):
        b = result["breakdown"]
        fig, ax = plt.subplots(figsize=(7, 3))
        published = ["image encoder (32 images)", "text 77 tokens fwd+bwd", "loss fwd+bwd", "SGD update"]
        fast = ["text fast fwd+bwd", "loss fwd+bwd", "SGD update"]
        colours = {part: f"C{i}" for i, part in enumerate(published + fast[:1])}
        for y, parts in ((1, published), (0, fast)):
            left = 0.0
            for part in parts:
                ax.barh(y, b["ms"][part], left=left, color=colours[part],
                        label=part if y == 1 or part == fast[0] else None)
                left += b["ms"][part]
        ax.set_yticks([0, 1], ["fastcoop", "published"])
        ax.set_xlabel(f"ms per step (components timed alone; {b['model']}, K = {b['classes']})")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        made.append(_save(fig, out / f"breakdown_{slug}.png"))
    return made


def _save_against_k(fig, ax, ylabel: str, path: Path) -> str:
    ax.set_xscale("log")
    ax.set_xlabel("classes K")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def write_report(results_dir: Path, readme: Path) -> None:
    """README.md from every result file in `results_dir`; its links are relative to the README's folder."""
    where = Path(os.path.relpath(results_dir, readme.parent)).as_posix()
    lines = [INTRO]
    for path in sorted(results_dir.glob("*.json")):
        result = json.loads(path.read_text())
        env, slug = result["environment"], path.stem
        lines += [f"## {device_title(env)}", "", f"Raw numbers in `{where}/{path.name}`.", ""]
        for title, key, table in (("The protocol of one dataset, as a user waits for it: `fastcoop cache` of JPEGs "
                                   "+ `fastcoop sweep` of its 15 runs", "protocol", protocol_table),
                                  ("Step time", "step", step_table),
                                  ("Memory of a training run", "training_memory", memory_table),
                                  ("Where the step's GPU time goes", "profile", profile_table),
                                  ("What the GPU step launches, counted on the CPU (its Triton kernels interpreted)",
                                   "device_ops", device_ops_table),
                                  ("One layer's packed attention (bf16), by implementation", "attention",
                                   attention_table),
                                  ("Full 16-shot runs", "full_run", full_run_table),
                                  ("`fastcoop cache`: the whole command against its halves alone", "cache",
                                   cache_table),
                                  ("The protocol: one `fastcoop sweep` against separate runs", "sweep", sweep_table),
                                  ("A paper's table: every method and baseline in one `fastcoop sweep`", "table",
                                   table_table),
                                  ("A CPU run on a shared machine: alone and beside busy processes", "load",
                                   load_table),
                                  ("The methods beside CoOp: whole runs (the prompt learners at CoOp's shape, the "
                                   "others at their published recipe)", "methods", methods_table),
                                  ("Tip-Adapter and Tip-Adapter-F: the whole command beside the published search",
                                   "tip_adapter", tip_adapter_table),
                                  ("CoCoOp: the step (published per-image 77-token prompts from pixels against "
                                   "fastcoop on cached features) and test-set evaluation", "cocoop", cocoop_table),
                                  ("cosine_ce forward + backward (launched: as a program calls it, host overhead "
                                   "included; graphed: the GPU work alone, as inside the training step)", "kernel",
                                   kernel_table),
                                  ("Exactness (fp32, fast path vs published computation)", "exactness",
                                   exactness_table)):
            if result.get(key):
                when = result.get("measured", {}).get(SECTION_OF.get(key, key), {})
                source = f"plan `{when['plan']}`, commit {when['commit']}, {when['date']}" if when else ""
                lines += [f"### {title}", "", source, "", *table(result[key]), ""]
        for name in plots(result, results_dir, slug):
            lines += [f"![{name}]({where}/{name})", ""]
        if result.get("help_seconds"):
            lines += [f"`fastcoop --help` takes {result['help_seconds']:.2f} s (whole process).", ""]
        if result.get("import_seconds"):
            lines += ["Where the imports go (`python -X importtime`, which adds overhead of its own): " + ", ".join(
                f"{name} {seconds:.2f} s" for name, seconds in result["import_seconds"].items()) + ".", ""]
        if result.get("bytecode"):
            lines += ["Bytecode during the whole runs: " + ", ".join(
                f"{name} {state}" for name, state in result["bytecode"].items()) + ".", ""]
        for note in result.get("notes", []):
            lines.append(f"- {note}")
        lines.append("")
    readme.write_text("\n".join(lines))
