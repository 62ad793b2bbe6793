"""Train a prompt into a run directory: the loop, checkpoints, resume, the curve and the final accuracies, in one
call (used by `fastcoop train` and the demo)."""

import contextlib
import time
from pathlib import Path

from fastcoop.cache import FeatureCache
from fastcoop.config import Recipe, Runtime
from fastcoop.errors import FastCoopError
from fastcoop.evaluate import evaluate_split
from fastcoop.fewshot import class_subset, harmonic_mean
from fastcoop.models import LoadedModel
from fastcoop.outputs import held
from fastcoop.run import clear_run_dir, new_learner, plan_run_dir, read_checkpoint, save_complete, save_progress
from fastcoop.training import (Checkpoint, NonFiniteLoss, Plan, TrainingInterrupted, TrainResult, plan_runs,
                               train_stack)


def train_to_run_dir(cache: FeatureCache, loaded: LoadedModel, run: Plan | Recipe, run_dir: Path,
                     runtime: Runtime = Runtime(), progress: bool = True, timings: dict | None = None,
                     overwrite: bool = False, save_every: float = 10.0, profile: str | None = None
                     ) -> tuple[TrainResult, dict]:
    """Train into `run_dir`, or go on with the unfinished run there made with the same options and cache.

    The run is checkpointed every `save_every` seconds (each save costs milliseconds), and on Ctrl-C or SIGTERM
    before it exits; on a non-finite loss it keeps the last good epoch. A complete run writes the curve and
    results.json (train loss/accuracy, where the time went, and test accuracy when cached). `timings`: the
    caller's own stages (imports, model). `profile`: a trace file of a few steps (train_stack). `run`: the
    caller's Plan (fastcoop.training.plan_runs), or the recipe (planned here, on `runtime`)."""
    (result, results), = train_to_run_dirs(cache, loaded, run if isinstance(run, Plan) else [run], [run_dir],
                                           runtime, progress, timings, overwrite, save_every, profile)
    return result, results


def train_to_run_dirs(cache: FeatureCache, loaded: LoadedModel, runs: Plan | list[Recipe], run_dirs: list[Path],
                      runtime: Runtime = Runtime(), progress: bool = True, timings: dict | None = None,
                      overwrite: bool = False, save_every: float = 10.0, profile: str | None = None
                      ) -> list[tuple[TrainResult, dict]]:
    """Runs that may train together (train_stack: seeds, shots, epochs, prompts where the method stacks them),
    each into its own run directory with everything train_to_run_dir promises (unfinished ones resumed, each from
    its own epoch)."""
    plan = runs if isinstance(runs, Plan) else plan_runs(cache, loaded, runs, runtime)
    with contextlib.ExitStack() as holding:
        for run_dir in run_dirs:
            holding.enter_context(held(run_dir))
        return _train_held(cache, loaded, plan, run_dirs, progress, timings, overwrite, save_every, profile)


def _train_held(cache, loaded, plan, run_dirs, progress, timings, overwrite, save_every, profile):
    """train_to_run_dirs, its run directories held by this process."""
    requests = [recipe.record() for recipe in plan.recipes]  # each run's identity: its recipe as published
    doing = [plan_run_dir(d, cache, r, overwrite) for d, r in zip(run_dirs, requests)]  # new, resume, replace
    if "done" in doing:
        raise FastCoopError(f"{run_dirs[doing.index('done')]} holds this run, finished; pass --overwrite to train it "
                            "again")
    state_names = plan.method.optimizer(plan.recipes[0]).state_names
    resumes = [Checkpoint(**read_checkpoint(d, state_names)) if what == "resume" else None
               for d, what in zip(run_dirs, doing)]
    for run_dir, what in zip(run_dirs, doing):
        if what == "replace":
            clear_run_dir(run_dir)
    last_save = time.monotonic()

    def save(results, states):
        for run_dir, result, request, state in zip(run_dirs, results, requests, states):
            save_progress(run_dir, result, cache, loaded, request, plan.runtime, state)

    def every_few_seconds(results):
        nonlocal last_save
        if time.monotonic() - last_save >= save_every:
            save(results, ["running"] * len(results))
            last_save = time.monotonic()

    try:
        trained = train_stack(cache, loaded, plan, progress=progress, on_report=every_few_seconds, resumes=resumes,
                              profile=profile)
    except NonFiniteLoss as exc:  # the failed runs keep their last good epoch; the others can resume
        save(exc.results, ["failed" if run in exc.failed else "interrupted" for run in range(len(run_dirs))])
        raise
    except TrainingInterrupted as exc:
        if all(result.checkpoint is None for result in exc.results):
            raise KeyboardInterrupt(f"nothing was trained yet in {run_dirs[0]}") from None
        save(exc.results, ["interrupted"] * len(run_dirs))
        where = (_saved_at(exc.results[0]) + f" in {run_dirs[0]}" if len(run_dirs) == 1 else
                 f"{len(run_dirs)} runs ({run_dirs[0]}, ...) saved where they were")
        raise KeyboardInterrupt(f"{where}; run the same command again to resume") from None
    return [(result, finish_run(run_dir, plan, cache, loaded, result, request, resume, timings, len(run_dirs)))
            for run_dir, result, request, resume in zip(run_dirs, trained, requests, resumes)]


def finish_run(run_dir: Path, plan, cache: FeatureCache, loaded: LoadedModel, result: TrainResult, request: dict,
               resume: Checkpoint | None = None, timings: dict | None = None, trained_with: int = 1) -> dict:
    """A trained run's results (train loss and accuracy, test accuracy when cached, base-to-new's new half and H,
    where the time went), saved with the run as complete in `run_dir`; returns the results."""
    finish_start = time.perf_counter()
    last = result.history[-1]
    results = {"train_loss": last["loss"], "train_acc": last["train_acc"], "train_seconds": result.seconds,
               "setup_seconds": result.setup_seconds, "epochs": result.recipe.epochs,
               "steps": sum(r["steps"] for r in result.history),
               "resumed_at_epoch": resume and resume.epochs_done,
               "resumed_at_step": resume and resume.steps_into_epoch, "trained_with": trained_with,
               "augmentation": result.augmentation}
    if "test" in cache.splits:
        classify = plan.method.classifier(loaded.model, result.learner, result.backends)
        results["test"] = evaluate_split(cache, classify.predict, classes=result.recipe.classes)
        if result.recipe.classes == "base" and not plan.method.per_class(result.recipe):  # base-to-new's new half
            classify = plan.method.classifier(loaded.model, _on_new_classes(plan, loaded, cache, result),
                                              result.backends)
            results["test_new"] = evaluate_split(cache, classify.predict, classes="new")
            results["harmonic_mean"] = harmonic_mean(results["test"]["top1"], results["test_new"]["top1"])
    results["timings"] = {**(timings or {}), "setup_s": result.setup_seconds,
                          "first_epoch_s": result.first_epoch_seconds, "kernels_s": result.kernels_seconds,
                          "capture_s": result.capture_seconds, "loop_s": result.seconds}
    save_complete(run_dir, result, cache, loaded, request, plan.runtime, results, since=finish_start)
    return results


def _saved_at(result) -> str:
    """Where an interrupted run's checkpoint stands, in its schedule."""
    saved, epochs = result.checkpoint, result.recipe.epochs
    if saved.steps_into_epoch:
        return f"saved at step {saved.steps_into_epoch} of epoch {saved.epochs_done + 1} of {epochs}"
    return f"saved after epoch {saved.epochs_done} of {epochs}"


def _on_new_classes(plan, loaded, cache: FeatureCache, result):
    """The learned tensors (CoOp's context, CoCoOp's Meta-Net too) on the new half's class names."""
    names = [cache.classnames[k] for k in class_subset(len(cache.classnames), "new")]
    return new_learner(plan.method, loaded, names, result.recipe, result.learner.trainable(),
                       plan.runtime.device)
