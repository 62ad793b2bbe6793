"""KgCoOp beside CoOp as a user waits for it: whole `fastcoop train` processes of the two methods at the same
shape (the same context words, epochs and batch size, on one dataset-shaped cache), so that the difference is
KgCoOp's penalty alone; and each against the published step's estimate (steps × the published CoOp step, which
KgCoOp's published step adds a penalty to)."""

from benchmarks.full_run import run_fastcoop_train

SAME_SHAPE = ("--init", "a photo of a", "--batch-size", "32")  # KgCoOp's context; CoOp's batch


def run_methods_section(dataset: str, device: str, epochs: int, published_step_ms: float | None) -> list[dict]:
    """One row per method: the whole process, its loop and the loop's time per step after the first epoch."""
    rows = []
    for method in ("coop", "kgcoop"):
        run = run_fastcoop_train(dataset, device, options=("--method", method, "--epochs", str(epochs), *SAME_SHAPE))
        rows.append({"method": method, "dataset": dataset, "classes": run["classes"], "epochs": run["epochs"],
                     "steps": run["steps"], "process_seconds": run["process_seconds"],
                     "loop_seconds": run["loop_seconds"], "loop_ms_per_step": run["loop_ms_per_step"],
                     "published_estimate_seconds": published_step_ms and run["steps"] * published_step_ms / 1000})
    coop = rows[0]["loop_ms_per_step"]
    for row in rows:
        row["per_step_vs_coop"] = row["loop_ms_per_step"] / coop if coop and row["loop_ms_per_step"] else None
        print(f"  methods {dataset} {row['method']}: process {row['process_seconds']:.1f} s, loop "
              f"{row['loop_seconds']:.1f} s, {row['loop_ms_per_step']:.1f} ms per step "
              f"({row['per_step_vs_coop']:.2f}× CoOp's)", flush=True)
    return rows
