"""Train a prompt into a run directory: the loop, checkpoints, the curve and the final accuracies, in one call
(used by `fastcoop train` and the demo)."""

import time
from pathlib import Path

from fastcoop.cache import FeatureCache
from fastcoop.evaluate import evaluate_split, prompt_text_features
from fastcoop.models import LoadedModel
from fastcoop.run import check_run_dir, plot_curve, save_results, save_run
from fastcoop.train import NonFiniteLoss, TrainConfig, TrainResult, train

CHECKPOINT_SECONDS = 10.0  # save the run at most this often while training (each save costs a few ms)


def train_to_run_dir(cache: FeatureCache, loaded: LoadedModel, config: TrainConfig, run_dir: Path,
                     progress: bool = True) -> tuple[TrainResult, dict]:
    """Train, saving the run every CHECKPOINT_SECONDS and at the end (on a non-finite loss: the last good epoch);
    then write the curve and results.json (train loss/accuracy, time, and test accuracy when cached)."""
    check_run_dir(run_dir, cache)
    last_save = time.monotonic()

    def checkpoint(result):
        nonlocal last_save
        if time.monotonic() - last_save >= CHECKPOINT_SECONDS:
            save_run(run_dir, result, cache, loaded)
            last_save = time.monotonic()

    try:
        result = train(cache, loaded, config, progress=progress, on_epoch=checkpoint)
    except NonFiniteLoss as exc:
        save_run(run_dir, exc.result, cache, loaded)
        raise
    save_run(run_dir, result, cache, loaded)
    plot_curve(run_dir, result.history)
    last = result.history[-1]
    results = {"train_loss": last["loss"], "train_acc": last["train_acc"], "train_seconds": result.seconds,
               "setup_seconds": result.setup_seconds, "epochs": config.epochs,
               "steps": sum(r["steps"] for r in result.history), "augmentation": result.augmentation}
    if "test" in cache.splits:
        results["test"] = evaluate_split(cache, prompt_text_features(loaded.model, result.learner, config.attention))
    save_results(run_dir, results)
    return result, results
