"""A run directory: the learned context (safetensors), its config, per-epoch metrics, results and a curve."""

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import fastcoop
from fastcoop.cache import FeatureCache
from fastcoop.errors import FastCoopError
from fastcoop.models import LoadedModel, load_model
from fastcoop.prompts import PromptLearner
from fastcoop.train import TrainConfig, TrainResult

PROMPT_FILE, CONFIG_FILE, METRICS_FILE, RESULTS_FILE, CURVE_FILE = (
    "prompt.safetensors", "config.json", "metrics.jsonl", "results.json", "curve.png")


def check_run_dir(run_dir: Path, cache: FeatureCache) -> None:
    """Refuse to write into a run directory that holds a run made from another cache."""
    config_path = Path(run_dir) / CONFIG_FILE
    if config_path.exists():
        other = json.loads(config_path.read_text()).get("cache", {})
        if other.get("identity") != _jsonable(cache.identity()):
            raise FastCoopError(f"{run_dir} holds a run from another feature cache ({other.get('path')}); "
                                "choose another --out")


def save_run(run_dir: Path, result: TrainResult, cache: FeatureCache, loaded: LoadedModel) -> None:
    """Write context, config and metrics; called after every epoch so an interrupted run keeps its last epoch."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    learner = result.learner
    save_file({"ctx": learner.ctx.detach().float().cpu().contiguous()}, run_dir / PROMPT_FILE,
              metadata={"n_ctx": str(learner.n_ctx), "csc": str(learner.csc), "position": learner.position})
    config = {
        "fastcoop_version": fastcoop.__version__, "model": loaded.name, "pretrained": loaded.pretrained,
        "classnames": learner.classnames, "train": dataclasses.asdict(result.config),
        "augmentation": result.augmentation,
        "cache": {"path": str(Path(cache.path).resolve()), "identity": _jsonable(cache.identity())},
    }
    (run_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in result.history))


def _jsonable(identity: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in identity.items()}


def save_results(run_dir: Path, results: dict) -> None:
    (Path(run_dir) / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")


def plot_curve(run_dir: Path, history: list[dict]) -> None:
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
    fig.suptitle(f"CoOp training ({Path(run_dir).name})")
    fig.tight_layout()
    fig.savefig(Path(run_dir) / CURVE_FILE, dpi=100)
    plt.close(fig)


@dataclasses.dataclass
class Run:
    """A trained prompt loaded back: its config, its model, and the learner holding the learned context."""

    config: dict
    loaded: LoadedModel
    learner: PromptLearner


def load_run(run_dir: str | Path, device: str = "cpu", loaded: LoadedModel | None = None) -> Run:
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file() or not (run_dir / PROMPT_FILE).is_file():
        raise FastCoopError(f"{run_dir} is not a fastcoop run directory (no {CONFIG_FILE} / {PROMPT_FILE})")
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    loaded = loaded or load_model(config["model"], config["pretrained"], device)
    train = TrainConfig(**config["train"])
    learner = PromptLearner(loaded.model, loaded.tokenizer, config["classnames"], train.n_ctx, train.csc,
                            train.position, train.init).to(device)
    with torch.no_grad():
        learner.ctx.copy_(load_file(run_dir / PROMPT_FILE)["ctx"])
    return Run(config, loaded, learner)
