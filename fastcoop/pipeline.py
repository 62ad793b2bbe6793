"""Train a prompt into a run directory: the loop, checkpoints, resume, the curve and the final accuracies, in one
call (used by `fastcoop train` and the demo)."""

import dataclasses
import time
from pathlib import Path

from fastcoop.cache import FeatureCache
from fastcoop.config import TrainConfig
from fastcoop.evaluate import evaluate_split, prompt_text_features
from fastcoop.models import LoadedModel
from fastcoop.run import clear_run_dir, plan_run_dir, read_checkpoint, save_complete, save_progress
from fastcoop.train import Checkpoint, NonFiniteLoss, TrainingInterrupted, TrainResult, train

def train_to_run_dir(cache: FeatureCache, loaded: LoadedModel, config: TrainConfig, run_dir: Path,
                     progress: bool = True, timings: dict | None = None, overwrite: bool = False,
                     save_every: float = 10.0) -> tuple[TrainResult, dict]:
    """Train into `run_dir`, or go on with the unfinished run there made with the same options and cache.

    The run is checkpointed every `save_every` seconds (each save costs milliseconds), and on Ctrl-C or SIGTERM
    before it exits; on a non-finite
    loss it keeps the last good epoch. A complete run writes the curve and results.json (train loss/accuracy,
    where the time went, and test accuracy when cached). `timings`: the caller's own stages (imports, model)."""
    request = dataclasses.asdict(config)  # the options as asked, before the loop resolves its defaults
    plan = plan_run_dir(run_dir, cache, request, overwrite)
    resume = Checkpoint(**read_checkpoint(run_dir)) if plan == "resume" else None
    if plan == "replace":
        clear_run_dir(run_dir)
    last_save = time.monotonic()

    def save(result, state="running"):
        save_progress(run_dir, result, cache, loaded, request, state)

    def every_few_seconds(result):
        nonlocal last_save
        if time.monotonic() - last_save >= save_every:
            save(result)
            last_save = time.monotonic()

    try:
        result = train(cache, loaded, config, progress=progress, on_report=every_few_seconds, resume=resume)
    except NonFiniteLoss as exc:
        save(exc.result, "failed")
        raise
    except TrainingInterrupted as exc:
        if exc.result.checkpoint is None:
            raise KeyboardInterrupt(f"nothing was trained yet in {run_dir}") from None
        save(exc.result, "interrupted")
        raise KeyboardInterrupt(f"{run_dir} saved after epoch {exc.result.checkpoint.epochs_done} of "
                                f"{exc.result.config.epochs}; run the same command again to resume") from None
    finish_start = time.perf_counter()
    last = result.history[-1]
    results = {"train_loss": last["loss"], "train_acc": last["train_acc"], "train_seconds": result.seconds,
               "setup_seconds": result.setup_seconds, "epochs": result.config.epochs,
               "steps": sum(r["steps"] for r in result.history), "resumed_at_epoch": resume and resume.epochs_done,
               "augmentation": result.augmentation}
    if "test" in cache.splits:
        results["test"] = evaluate_split(cache, prompt_text_features(loaded.model, result.learner, result.backends),
                                         classes=result.config.classes)
    results["timings"] = {**(timings or {}), "setup_s": result.setup_seconds,
                          "first_epoch_s": result.first_epoch_seconds, "loop_s": result.seconds,
                          "save_and_test_s": time.perf_counter() - finish_start}
    save_complete(run_dir, result, cache, loaded, request, results)
    return result, results
