"""A run directory: the learned context (safetensors), its config and state, per-epoch metrics, a checkpoint while
unfinished, and, once complete, results and a curve.

`config.json` says the run's state: running (or killed), interrupted, failed (non-finite loss, the last good
context kept) or complete. Every file is replaced atomically, and while training the metrics, the checkpoint
and the config are written in that order, so a kill at any moment leaves a directory that the same command
resumes; results.json and curve.png are written only by a complete run, after the old run's files are gone.
"""

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import fastcoop
from fastcoop import methods
from fastcoop.cache import FeatureCache
from fastcoop.config import Recipe
from fastcoop.errors import FastCoopError, changed, first_few
from fastcoop.fewshot import class_subset
from fastcoop.models import LoadedModel, load_model
from fastcoop.outputs import check_writable
from fastcoop.run_files import (CHECKPOINT_FILE, CONFIG_FILE, CURVE_FILE, EVALUATIONS_FILE, METRICS_FILE,
                                PROMPT_FILE, RESULTS_FILE, RESUMABLE, RUN_FILES, SWEEP_FILE, complete_config,
                                read_config, read_evaluations)

EPOCH_END = "epoch_end."  # inside an epoch: a learned tensor as it was at the end of the last one
PROGRESS = ("epochs_done", "steps_into_epoch", "partial_loss", "partial_correct")  # a checkpoint's counters


def plan_run_dir(run_dir: Path, cache: FeatureCache, request: dict, overwrite: bool) -> str:
    """What training into `run_dir` will do — 'new', 'resume', 'replace' or 'done' (it holds this run, finished) —
    checked before any work: the folder must be writable, and an existing run is resumed only when made with the
    same recipe (`request`: a Recipe's published form, as a dict) and cache, replaced only with --overwrite; the
    runtime may differ."""
    run_dir = Path(run_dir)
    check_writable(run_dir, "run directory", folder=True)
    if (run_dir / SWEEP_FILE).exists():
        raise FastCoopError(f"{run_dir} holds a sweep, not a run; choose another --out")
    config = read_config(run_dir)
    if config is None:
        foreign = _not_a_run(run_dir)
        if foreign:  # a user's own files, never mixed with a run's (nor removed by --overwrite)
            raise FastCoopError(f"{run_dir} holds files that are not a fastcoop run ({first_few(foreign)}); choose an "
                                "empty or new --out")
        return "new"
    if overwrite:
        return "replace"
    state = config["state"]
    differences = _differences(config, cache, request)
    if state == "complete":
        if differences:
            raise FastCoopError(f"{run_dir} holds a finished run made with other settings ({differences}); pass "
                                "--overwrite to replace it, or choose another --out")
        return "done"
    if differences:
        raise FastCoopError(f"{run_dir} holds an unfinished run made with other settings ({differences}); run its "
                            "command again to finish it, or pass --overwrite")
    if state not in RESUMABLE:
        raise FastCoopError(f"{run_dir} holds a run that stopped on a non-finite loss after epoch "
                            f"{config.get('epochs_done', 0)}; pass --overwrite to start it again (e.g. with a "
                            "lower --lr)")
    if not (run_dir / CHECKPOINT_FILE).is_file():
        return "replace"  # killed before its first checkpoint: nothing to resume
    return "resume"


def _not_a_run(run_dir: Path) -> list[str]:
    """What `run_dir` holds that no run writes (a run's files and, after a kill, their temporary copies)."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir()
                  if p.name not in RUN_FILES and not any(p.name.startswith(f".{name}.") for name in RUN_FILES))


def _differences(config: dict, cache: FeatureCache, request: dict) -> str:
    """The settings in which an earlier run differs from this request, as 'name: was → now'."""
    was = config.get("request", {})
    differ = changed({key: was.get(key) for key in request}, request, show=repr)
    if config.get("cache", {}).get("identity") != cache.identity():
        differ.insert(0, f"feature cache: {config.get('cache', {}).get('path')} → {Path(cache.path).resolve()}")
    return "; ".join(differ)


def clear_run_dir(run_dir: Path) -> None:
    """Remove an earlier run's files (only those), so that nothing of it mixes with the new run."""
    for name in RUN_FILES:
        (Path(run_dir) / name).unlink(missing_ok=True)


def read_checkpoint(run_dir: Path, state_names: tuple[str, ...]) -> dict:
    """The state an unfinished run saved (training.Checkpoint's fields): the learned tensors and the optimizer's
    state of each (`state_names`: the optimizer's, each a prefix of the file's names: "momentum.ctx"), the epochs
    done and their metrics, and inside an epoch how far into it, its loss and hits so far and the tensors at the
    end of the last epoch."""
    tensors = load_file(Path(run_dir) / CHECKPOINT_FILE)
    counters = {name: tensors.pop(name).item() for name in PROGRESS if name in tensors}
    lines = (Path(run_dir) / METRICS_FILE).read_text().splitlines()

    def named(prefix):
        return {name.removeprefix(prefix): t for name, t in tensors.items() if name.startswith(prefix)}

    prefixes = tuple(f"{name}." for name in state_names) + (EPOCH_END,)
    return {**counters, "optimizer": {name: named(f"{name}.") for name in state_names},
            "epoch_params": named(EPOCH_END) or None,
            "params": {name: t for name, t in tensors.items() if not name.startswith(prefixes)},
            "history": [json.loads(line) for line in lines[:int(counters["epochs_done"])]]}


def save_progress(run_dir: Path, result, cache: FeatureCache, loaded: LoadedModel, request: dict, runtime,
                  state: str) -> None:
    """An unfinished run's last checkpoint (`result.checkpoint`, if any) and its state."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = result.checkpoint
    if checkpoint is not None:
        _write_metrics(run_dir, checkpoint.history)
        if state in RESUMABLE:
            _atomic(run_dir / CHECKPOINT_FILE, lambda path: save_file({
                **{name: _host(t) for name, t in checkpoint.params.items()},
                **{f"{key}.{name}": _host(t) for key, tensors in checkpoint.optimizer.items()
                   for name, t in tensors.items()},
                **{EPOCH_END + name: _host(t) for name, t in (checkpoint.epoch_params or {}).items()},
                **{name: torch.tensor(getattr(checkpoint, name)) for name in PROGRESS}}, path))
        _write_prompt(run_dir, result.recipe, checkpoint.params)
    _write_config(run_dir, result, cache, loaded, request, runtime, state,
                  checkpoint.epochs_done if checkpoint else 0)
    if state not in RESUMABLE:
        (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)


def save_complete(run_dir: Path, result, cache: FeatureCache, loaded: LoadedModel, request: dict, runtime,
                  results: dict, since: float | None = None) -> None:
    """A finished run: final context, metrics, curve, results, then the config saying so; the checkpoint goes.
    `since`: when the caller's test-and-save stage began (time.perf_counter); results.json's timings then say how
    long it took, up to the last two small files."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_metrics(run_dir, result.history)
    _write_prompt(run_dir, result.recipe, result.learner.trainable())
    plot_curve(run_dir, result.history, methods.get(result.recipe.method).title)
    if since is not None:
        results["timings"]["save_and_test_s"] = time.perf_counter() - since
    _atomic(run_dir / RESULTS_FILE, lambda path: Path(path).write_text(json.dumps(results, indent=2) + "\n"))
    _write_config(run_dir, result, cache, loaded, request, runtime, "complete", len(result.history))
    (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)


def record_evaluation(run_dir: Path, cache: FeatureCache, split: str, classes: str, scores: dict) -> None:
    """Add (or renew) one evaluation in the run's evaluations.json, so that reports can show transfer tables; the
    run's own files are not touched."""
    evaluations = read_evaluations(run_dir)
    evaluations[evaluation_key(cache, split, classes)] = {
        "cache": str(Path(cache.path).resolve()), "dataset": cache.dataset or Path(cache.path).stem,
        "identity": cache.identity(),
        "split": split, "classes": classes, **scores}
    _atomic(Path(run_dir) / EVALUATIONS_FILE,
            lambda path: Path(path).write_text(json.dumps(evaluations, indent=2) + "\n"))


def evaluation_key(cache: FeatureCache, split: str, classes: str) -> str:
    return f"{Path(cache.path).name} {split} {classes}"


def _write_prompt(run_dir: Path, recipe: Recipe, params: dict[str, torch.Tensor]) -> None:
    """The learned tensors by the learner's names (the published state dict's: ctx; CoCoOp's meta_net.* too)."""
    _atomic(run_dir / PROMPT_FILE, lambda path: save_file(
        {name: _host(t) for name, t in params.items()}, path,
        metadata={"method": recipe.method, "n_ctx": str(recipe.n_ctx), "csc": str(recipe.csc),
                  "position": recipe.position}))


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    _atomic(run_dir / METRICS_FILE,
            lambda path: Path(path).write_text("".join(json.dumps(r) + "\n" for r in history)))


def _write_config(run_dir, result, cache, loaded, request, runtime, state, epochs_done) -> None:
    """config.json: the run's state, its recipe as run ("train") and as asked ("request", its identity), the
    runtime asked for and the implementations that ran ("backends")."""
    config = {
        "fastcoop_version": fastcoop.__version__, "state": state, "epochs_done": epochs_done,
        "model": loaded.name, "pretrained": loaded.pretrained, "classnames": result.learner.classnames,
        "method": methods.get(result.recipe.method).title,
        "train": result.recipe.record(), "request": request, "runtime": dataclasses.asdict(runtime),
        "backends": vars(result.backends),
        "augmentation": result.augmentation,
        "cache": {"path": str(Path(cache.path).resolve()), "identity": cache.identity(), "dataset": cache.dataset},
    }
    if cache.class_ids:  # for matching class-specific contexts to another cache's classes by id, not by name
        config["class_ids"] = [cache.class_ids[k] for k in class_subset(len(cache.classnames), result.recipe.classes)]
    _atomic(run_dir / CONFIG_FILE, lambda path: Path(path).write_text(json.dumps(config, indent=2) + "\n"))


def _host(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().float().cpu().contiguous()


def _atomic(path: Path, write) -> None:
    """write(temporary path) beside `path`, then rename over it: a reader (or a kill) never sees half a file. The
    file gets the mode a plain open() would give it."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def plot_curve(run_dir: Path, history: list[dict], method: str = "CoOp") -> None:
    """Loss and train accuracy per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, loss_ax = plt.subplots(figsize=(6, 3.5))
    loss_ax.plot(epochs, [r["loss"] for r in history], color="tab:blue")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("train loss", color="tab:blue")
    acc_ax = loss_ax.twinx()
    acc_ax.plot(epochs, [100 * r["train_acc"] for r in history], color="tab:orange")
    acc_ax.set_ylabel("train accuracy (%)", color="tab:orange")
    fig.suptitle(f"{method} training ({Path(run_dir).name})")
    fig.tight_layout()
    fig.savefig(Path(run_dir) / CURVE_FILE, dpi=100)
    plt.close(fig)


@dataclasses.dataclass
class Run:
    """A trained run loaded back: its config, its method, its model, and the learner holding what it learned."""

    config: dict
    method: methods.Method
    loaded: LoadedModel
    learner: torch.nn.Module

    def classifier(self):
        """The method's classifier of the learned run (fastcoop.methods: logits and predict)."""
        return self.method.classifier(self.loaded.model, self.learner, None)


def load_run(run_dir: str | Path, device: str = "cpu", loaded: LoadedModel | None = None,
             image_tower: bool = True) -> Run:
    """A complete run's prompt; an unfinished one is refused with the command that finishes it. image_tower=False:
    for work on cached image features (load_model)."""
    run_dir = Path(run_dir)
    config = complete_config(run_dir)
    method = methods.get(config["train"]["method"])
    loaded = loaded or load_model(config["model"], config["pretrained"], device, image_tower)
    params = load_file(run_dir / PROMPT_FILE)
    learner = new_learner(method, loaded, config["classnames"], Recipe.from_record(config["train"]), params, device)
    return Run(config, method, loaded, learner)


def new_learner(method: methods.Method, loaded: LoadedModel, classnames: list[str], recipe: Recipe,
                params: dict[str, torch.Tensor], device) -> torch.nn.Module:
    """The method's learner for `recipe` on `classnames`, holding the learned `params`, on `device`."""
    learner = method.learner(loaded.model, loaded.tokenizer, classnames, recipe)
    learner.load_trainable(params)
    return learner.to(device)


def with_classnames(run: Run, classnames: list[str], class_ids: list[str] | None = None) -> Run:
    """The run's learned tensors on other class names (unseen classes, another dataset): what is shared by all
    classes carries over to any; what has a row per class (the method's `per_class`: a class-specific context, a
    linear probe's weights) only to classes the run has a row for (those rows), matched by class id where both
    sides have them (ImageNet's wnids: two of its classes share a name), else by name."""
    params = run.learner.trainable()
    recipe = Recipe.from_record(run.config["train"])
    per_class = run.method.per_class(recipe)
    if per_class:
        own_ids = run.config.get("class_ids")
        by_id = bool(class_ids and own_ids)
        known, wanted = (own_ids, class_ids) if by_id else (run.learner.classnames, classnames)
        missing = [name for name, key in zip(classnames, wanted) if key not in known]
        if missing:
            shown = ", ".join(f"'{m}'" for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5
                                                                 else "")
            raise FastCoopError(f"this run learned a row per class ({', '.join(per_class)}) and has none for "
                                f"{shown}: it carries over only to a subset of its own classes")
        twice = [key for key in wanted if known.count(key) > 1]
        if twice:
            raise FastCoopError(f"this run learned a row per class ({', '.join(per_class)}) and has two classes named "
                                f"'{twice[0]}': which row '{twice[0]}' takes is ambiguous without class ids")
        rows = [known.index(key) for key in wanted]
        params = {**params, **{name: params[name][rows] for name in per_class}}
    device = next(iter(run.learner.trainable().values())).device
    learner = new_learner(run.method, run.loaded, classnames, recipe, params, device)
    return Run(run.config, run.method, run.loaded, learner)
