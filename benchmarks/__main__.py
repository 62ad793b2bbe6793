"""python -m benchmarks [--device cuda|cpu] [--quick] [--out benchmarks/results] [--sections ...]

Runs the sections named (default: all, the most telling first), writes results/<device>.json after each, and
regenerates benchmarks/README.md (tables) and the plots from every result file present.
"""

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.attention import run_attention_section
from benchmarks.bytecode import bytecode_state
from benchmarks.cache import run_cache_section
from benchmarks.cocoop import run_cocoop_section
from benchmarks.common import classnames_of, device_slug, environment, median_ms, real_classnames
from benchmarks.exactness import run_exactness_section
from benchmarks.full_run import DATASETS, help_seconds, import_seconds, run_fastcoop_train, save_checkpoint
from benchmarks.kernel import run_kernel_section
from benchmarks.protocol import SHAPES, run_protocol_section, startup_seconds
from benchmarks.launches import device_ops, interpreted_step_device_ops
from benchmarks.load import run_load_section
from benchmarks.methods import image_encoder_ms, run_methods_section, run_tip_adapter_row
from benchmarks.report import write_report
from benchmarks.sweep import run_sweep_section, run_table_section
from benchmarks.profile import kernel_profile
from benchmarks.step import run_step_section, step_variants, time_breakdown, training_memory_gb
from fastcoop.models import load_model

# the default order: the most telling first, so that a run cut short keeps them
SECTIONS = ("step", "exactness", "full_run", "protocol", "cocoop", "cache", "sweep", "table", "kernel", "attention",
            "load", "methods")


def plan(name: str, device: str) -> dict:
    """What each section runs: the issue's full grid; `quick`, a subset that finishes on a CPU in minutes;
    `headline`, the README's headline numbers on a GPU in about 7 minutes."""
    if name == "headline":
        return {"step": [("ViT-B-16", 100, 16, False), ("ViT-B-16", 1000, 16, False), ("ViT-B-16", 1000, 16, True)],
                "repeats": 20,
                "breakdown": ("ViT-B-16", 1000), "device_ops": ("ViT-B-16", 100),
                "datasets": ["caltech101", "eurosat", "imagenet"],
                "kernel": [(b, k) for b in (32, 16384, 131072) for k in (100, 1000)], "attention": [100, 1000],
                "exactness": [("ViT-B-16", 100, 16, False), ("ViT-B-16", 100, 16, True)], "exact_steps": 100,
                "cache": ("ViT-B-16", 200, 200, 512), "sweep": [("eurosat", None, True)],
                "table": ("eurosat", [1, 2, 4, 8, 16], [1, 2, 3]), "protocol": [("caltech101", False)],
                "cocoop": ("ViT-B-16", 500, [1, 32], 50000, "caltech101"), "methods": ("caltech101", 50),
                "tip_adapter": "imagenet"}
    if name == "quick":  # every section once, small: whole runs of a few epochs, no interpreted kernel count
        return {"step": [("ViT-B-16", 37, 16, False)], "repeats": 1,
                "breakdown": ("ViT-B-16", 37), "device_ops": None, "datasets": ["eurosat"],
                "run_epochs": 10, "cocoop_epochs": 2, "kernel": [(32, 100), (1024, 1000)], "attention": [],
                "exactness": [("ViT-B-16", 37, 4, True)], "exact_steps": 5,
                "cache": ("ViT-B-16", 8, 7, 32), "sweep": [("eurosat", 2, False)], "protocol": [("eurosat", True)],
                "table": ("eurosat", [1], [1]),
                "cocoop": ("ViT-B-16", 37, [1], 64, "eurosat"), "methods": ("eurosat", 3),
                "tip_adapter": "caltech101", "load": {"busy_counts": (1,), "kinds": ("torch",)}}
    grid = [(m, k, n, csc) for m in ("ViT-B-16", "RN50") for k in (37, 100, 397, 1000) for n in (4, 16)
            for csc in (False, True)]
    return {"step": grid, "repeats": 20 if device.startswith("cuda") else 3, "breakdown": ("ViT-B-16", 1000),
            "device_ops": ("ViT-B-16", 100),
            "datasets": list(DATASETS), "kernel": [(b, k) for b in (32, 1024, 16384, 131072) for k in (100, 1000)],
            "attention": [37, 100, 397, 1000],
            "exactness": grid, "exact_steps": 100,
            "cache": ("ViT-B-16", 1000, 200, 512) if device.startswith("cuda") else ("ViT-B-16", 32, 15, 64),
            "table": ("eurosat", [1, 2, 4, 8, 16], [1, 2, 3]),
            "sweep": [(d, None, True) for d in ("eurosat", "caltech101", "imagenet")] if device.startswith("cuda")
            else [("eurosat", None, False), ("eurosat", 2, True)],
            "protocol": [(d, False) for d in ("eurosat", "caltech101", "imagenet")] if device.startswith("cuda")
            else [("eurosat", True)],
            "cocoop": ("ViT-B-16", 500, [1, 32], 50000, "imagenet") if device.startswith("cuda")
            else ("ViT-B-16", 37, [1, 4], 256, "eurosat"),
            "methods": ("caltech101", 50) if device.startswith("cuda") else ("caltech101", 3),
            "tip_adapter": "imagenet" if device.startswith("cuda") else "caltech101", "load": {}}


def published_step_ms(dataset_k: int, device: str, repeats: int, loaded) -> float:
    variants = step_variants(loaded, real_classnames(dataset_k), device, graph=False)
    return median_ms(variants["published"], device, repeats)


def _epochs(todo: dict, key: str = "run_epochs") -> tuple[str, ...]:
    """`fastcoop train` options for the plan's whole runs: its few epochs (quick), or the published schedule."""
    return ("--epochs", str(todo[key])) if todo.get(key) else ()


def _note(result: dict, note: str) -> None:
    if note not in result["notes"]:
        result["notes"].append(note)


def gpu_memory_and_profile(configs, device: str, step_rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """For each unified-context configuration: a training run's GPU memory, and its eager step's kernels."""
    memory, profiles = [], []
    for model_name, k, n_ctx, csc in configs:
        if csc:
            continue
        try:
            peak, resident = training_memory_gb(model_name, real_classnames(k), device, torch.bfloat16, n_ctx=n_ctx)
            memory.append({"model": model_name, "classes": k, "n_ctx": n_ctx, "peak_gb": peak, "resident_gb": resident})
            print(f"  training run memory {model_name} K={k}: {peak:.3f} GB ({resident:.3f} GB resident)", flush=True)
            eager = step_variants(load_model(model_name, "none", device), real_classnames(k), device, n_ctx=n_ctx,
                                  precision=torch.bfloat16, graph=False)["fastcoop_eager"]
            graph_ms = next((r["median_ms"] for r in step_rows if r["variant"] == "fastcoop_graph" and
                             (r["model"], r["classes"], r["n_ctx"], r["csc"]) == (model_name, k, n_ctx, csc)), None)
            profiles.append({"model": model_name, "classes": k, "n_ctx": n_ctx, "graph_ms": graph_ms,
                             "device_ops_per_step": sum(device_ops(eager).values()), **kernel_profile(eager)})
            print(f"  profile {model_name} K={k}: {profiles[-1]['kernels_per_step']:.0f} kernels "
                  f"({profiles[-1]['device_ops_per_step']} device operations), "
                  f"{profiles[-1]['kernel_ms_per_step']:.3f} ms kernel time per step", flush=True)
        except Exception as exc:  # a measurement failing here must not lose the step section
            print(f"  memory/profile {model_name} K={k}: failed ({str(exc).splitlines()[0][:160]})", flush=True)
    return memory, profiles


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a CPU-sized subset (a few minutes)")
    parser.add_argument("--plan", choices=["full", "quick", "headline"], default=None,
                        help="what to run (default: full, or quick with --quick)")
    parser.add_argument("--report-only", action="store_true", help="only regenerate README.md and plots")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the result files, README.md and plots (default: benchmarks/results, "
                             "with the README in benchmarks/)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}, run in the order named")
    parser.add_argument("--datasets", default=None, help="full-run datasets (default: by mode)")
    parser.add_argument("--exact-steps", type=int, default=None, help="training steps compared for exactness")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    if args.out is None:
        args.out, readme = Path(__file__).parent / "results", Path(__file__).parent / "README.md"
    else:  # everything inside the folder named
        readme = args.out / "README.md"
    if args.report_only:
        write_report(args.out, readme)
        return
    sections = args.sections.split(",")
    if not set(sections) <= set(SECTIONS):
        parser.error(f"unknown sections {sorted(set(sections) - set(SECTIONS))}; choose from {', '.join(SECTIONS)}")
    mode = args.plan or ("quick" if args.quick else "full")
    todo = plan(mode, args.device)
    if args.datasets:
        todo["datasets"] = args.datasets.split(",")
    if args.exact_steps:
        todo["exact_steps"] = args.exact_steps
    env = environment(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{device_slug(env)}.json"
    # sections run now replace their own entries; other sections measured earlier on this device stay
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update({"environment": env, "plan": mode})
    result.setdefault("notes", [])
    print(f"benchmarks on {env.get('gpu') or 'CPU'} ({mode})", flush=True)

    published_ms: dict[int, float] = {}  # the published step at K classes, measured once per benchmark run

    def published_step(k: int, loaded) -> float:
        if k not in published_ms:
            published_ms[k] = published_step_ms(k, args.device, todo["repeats"], loaded)
        return published_ms[k]

    def save(section: str) -> None:
        """Write after every section, so a run cut short keeps what it measured."""
        result.setdefault("measured", {})[section] = {"commit": env["commit"], "date": env["date"], "plan": mode}
        path.write_text(json.dumps(result, indent=2) + "\n")
        write_report(args.out, readme)
        print(f"  wrote {section} to {path} and {readme}", flush=True)

    def run_step():
        result["step"] = run_step_section(todo["step"], args.device, todo["repeats"])
        model, k = todo["breakdown"]
        result["breakdown"] = {"model": model, "classes": k, "ms": time_breakdown(
            load_model(model, "none", args.device), real_classnames(k), args.device, todo["repeats"])}
        if args.device.startswith("cuda"):
            result["training_memory"], result["profile"] = gpu_memory_and_profile(todo["step"], args.device,
                                                                                  result["step"])
        elif todo["device_ops"]:  # the GPU path's operations, counted with its Triton kernels interpreted
            model, k = todo["device_ops"]
            result["device_ops"] = [interpreted_step_device_ops(model, k)]
            print(f"  device operations {model} K={k}: {result['device_ops'][0]['device_ops_per_step']} per "
                  f"step", flush=True)
        save("step")
    def run_kernel():
        result["kernel"] = run_kernel_section(todo["kernel"], args.device, todo["repeats"])
        if not args.device.startswith("cuda"):
            _note(result, "No GPU: the Triton kernel is not timed on CPU (it runs there only under the "
                          "interpreter, for correctness); cosine_ce on CPU is the PyTorch reference.")
        save("kernel")
    def run_attention():
        if not (args.device.startswith("cuda") and todo["attention"]):
            return
        result["attention"] = run_attention_section(todo["attention"], args.device, todo["repeats"])
        save("attention")
    def run_exactness():
        result["exactness"] = run_exactness_section(todo["exactness"], args.device, todo["exact_steps"])
        save("exactness")
    def run_full_run():
        result["full_run"] = []
        result["help_seconds"] = help_seconds()
        print(f"  fastcoop --help: {result['help_seconds']:.2f} s", flush=True)
        result["import_seconds"] = import_seconds()
        result["bytecode"] = {name: bytecode_state(name) for name in ("torch", "open_clip")}
        print("  imports: " + ", ".join(f"{name} {t:.2f} s" for name, t in result["import_seconds"].items())
              + "; bytecode: " + ", ".join(f"{name} {state}" for name, state in result["bytecode"].items()),
              flush=True)
        loaded = load_model("ViT-B-16", "none", args.device)
        with tempfile.TemporaryDirectory() as kernels:
            weights = save_checkpoint(loaded.model, kernels)
            for i, dataset in enumerate(todo["datasets"]):
                # the first run compiles the Triton kernels into an empty cache (cold), later ones reuse them
                row = run_fastcoop_train(dataset, args.device, kernel_cache=kernels, weights=weights,
                                         options=_epochs(todo))
                row["kernel_cache"] = "cold" if i == 0 else "warm"
                if i == 0 and args.device.startswith("cuda"):
                    warm = run_fastcoop_train(dataset, args.device, kernel_cache=kernels, weights=weights,
                                              options=_epochs(todo))
                    result["full_run"].append(row)
                    row = warm | {"kernel_cache": "warm"}
                row["published_step_ms"] = published_step(row["classes"], loaded)
                row["published_estimate_seconds"] = row["published_step_ms"] * row["steps"] / 1000
                result["full_run"].append(row)
                print(f"  full run {dataset} ({row['kernel_cache']} kernels, {row['kernels_compiled']} compiled): "
                      f"{row['process_seconds']:.1f} s = "
                      f"interpreter {row['interpreter_seconds']:.1f} + imports {row['imports_seconds']:.1f} + "
                      f"model {row['model_seconds']:.1f} + setup {row['setup_seconds']:.1f} + loop "
                      f"{row['loop_seconds']:.1f} (first epoch {row['first_epoch_seconds']:.1f}: kernels "
                      f"{row['kernels_seconds']:.1f}, capture {row['capture_seconds']:.1f}) + save and test "
                      f"{row['save_and_test_seconds']:.1f}; published ≈ {row['published_estimate_seconds']:.0f} s",
                      flush=True)
                _note(result, "Published full-run times are estimates: the published step time (no data loading) "
                              "× the schedule's steps; fastcoop's are measured whole processes.")
                save("full_run")
    def run_cache():
        model, images, views, batch = todo["cache"]
        result["cache"] = [run_cache_section(args.device, model, images, views, batch, todo["repeats"])]
        save("cache")
    def run_sweep():
        result["sweep"] = []
        loaded = load_model("ViT-B-16", "none", args.device)
        for dataset, epochs, alone in todo["sweep"]:
            k = len(classnames_of(dataset))
            step_ms = published_step(k, loaded)
            shots = [1, 2] if epochs else [1, 2, 4, 8, 16]
            seeds = [1, 2] if epochs else [1, 2, 3]
            result["sweep"].append(run_sweep_section(dataset, args.device, shots, seeds, step_ms, epochs,
                                                      alone))
            save("sweep")
    def run_table():
        result["table"] = [run_table_section(*todo["table"], args.device)]
        save("table")

    def run_protocol():
        result["protocol"] = []
        loaded = load_model("ViT-B-16", "none", args.device)
        startup = startup_seconds()
        for dataset, quick in todo["protocol"]:
            step_ms = published_step(SHAPES[dataset][0], loaded)
            result["protocol"].append(run_protocol_section(dataset, args.device, step_ms, startup, quick))
            _note(result, "Published protocol times are estimates: the published step time (no data loading) × "
                          "the runs' steps, plus one start-up (importing torch and open_clip) per run; fastcoop's "
                          "are its two commands' whole processes on generated JPEGs.")
            save("protocol")
    def run_cocoop():
        model, k, batches, eval_images, dataset = todo["cocoop"]
        result["cocoop"] = run_cocoop_section(model, k, batches, eval_images, dataset, args.device, todo["repeats"],
                                              _epochs(todo, "cocoop_epochs"))
        save("cocoop")

    def run_methods():
        dataset, epochs = todo["methods"]
        loaded = load_model("ViT-B-16", "none", args.device)
        published = published_step(len(classnames_of(dataset)), loaded)
        image_ms = image_encoder_ms(args.device, max(1, todo["repeats"] // 10))
        result["methods"] = run_methods_section(dataset, args.device, epochs, published, image_ms)
        result["tip_adapter"] = [run_tip_adapter_row(todo["tip_adapter"], args.device, todo["repeats"])]
        save("methods")

    def run_load():
        result["load"] = [run_load_section(**todo.get("load", {}))] if not args.device.startswith("cuda") else []
        save("load")

    runners = {"load": run_load, "methods": run_methods, "step": run_step, "kernel": run_kernel, "attention": run_attention, "exactness": run_exactness,
               "full_run": run_full_run, "cache": run_cache, "sweep": run_sweep, "table": run_table, "cocoop": run_cocoop,
               "protocol": run_protocol}
    for section in sections:  # in the order named: a run cut short keeps the first ones
        started = time.perf_counter()
        runners[section]()
        print(f"  section {section}: {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
