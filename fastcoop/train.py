"""CoOp training on cached image features: only the context vectors learn, every CLIP weight stays frozen.

The published loop, per epoch: a permutation of the few-shot rows, batches of 32 (the last partial batch dropped),
the K prompts through the text encoder every step, cosine cross-entropy, SGD. Here every epoch's permutation and
learning rate are drawn up front into device tables (the same draws, in the same order, as a per-epoch loop), so
the host only enqueues steps and reads the results back now and then. Epoch e trains on the
cache's augmented view e of every image: each view is an independent draw of the published augmentation, so with
a view per epoch cached this is the published loader's fresh random crop of every image in every epoch.
"""

import dataclasses
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from fastcoop.backends import Backends, resolve
from fastcoop.cache import FeatureCache
from fastcoop.config import TrainConfig
from fastcoop.devices import autocast_dtype, resolve_device, resolve_precision
from fastcoop.errors import FastCoopError
from fastcoop.fewshot import class_subset, relabel
from fastcoop.models import LoadedModel, move_text_tower
from fastcoop.prompts import PromptLearner
from fastcoop.schedule import lr_at, published_epochs
from fastcoop.step import TrainStep, graphed_or_eager
from fastcoop.text_encoder import FastTextEncoder, reference_text_features
from fastcoop.text_tower import TextTower


REPORT_SECONDS = 0.5  # how often the host waits for the device to read the results back


@dataclass
class TrainResult:
    learner: PromptLearner
    config: TrainConfig  # as run: every default resolved
    backends: Backends  # the implementation of each op
    history: list[dict] = field(default_factory=list)
    augmentation: dict = field(default_factory=dict)  # the cache's views and how many distinct ones each image saw
    seconds: float = 0.0  # the epochs' loop (graph capture and kernel compilation included)
    setup_seconds: float = 0.0  # features to the device, learner, text encoder: what runs before the loop
    first_epoch_seconds: float = 0.0  # the loop's first epoch, graph capture and kernel compilation included
    checkpoint: "Checkpoint | None" = None  # the state after the last epoch the host has seen


@dataclass
class Checkpoint:
    """A run after `epochs_done` epochs: with the same options and cache, training goes on from it exactly as if it
    had not stopped (the batch orders are drawn again from the seed; the context and SGD's momentum are here)."""

    epochs_done: int
    ctx: torch.Tensor
    momentum_buffer: torch.Tensor
    history: list[dict]

    @classmethod
    def of(cls, step, history: list[dict]) -> "Checkpoint":
        return cls(len(history), step.learner.ctx.detach().clone(), step.momentum_buffer.clone(), list(history))

    def restore(self, step) -> int:
        """Load into a fresh TrainStep; returns the first epoch still to train."""
        with torch.no_grad():
            step.learner.ctx.copy_(self.ctx)
            step.good_ctx.copy_(self.ctx)
            step.momentum_buffer.copy_(self.momentum_buffer)
            step.step.fill_(self.epochs_done * step.steps)
        return self.epochs_done


def epoch_views(cached: torch.Tensor, epochs: int) -> tuple[torch.Tensor, dict]:
    """The views epochs cycle through (epoch e trains on view e mod their number), and what that means for the
    run; warns once when they are fewer than the epochs, since the published recipe draws a fresh crop of every
    image in every epoch. `cached`: the cache's views × n × D, the eval view first."""
    augmented = len(cached) - 1
    record = {"cached_views": augmented, "distinct_views_per_image": min(augmented, epochs),
              "fresh_view_every_epoch": augmented >= epochs}
    if augmented == 0:
        warnings.warn(f"the cache holds no augmented views: all {epochs} epochs train on each image's un-augmented "
                      "view, where the published recipe draws a fresh random crop every epoch; recache with "
                      "--views auto for a faithful run")
        return cached, record
    if augmented < epochs:
        warnings.warn(f"the cache holds {augmented} augmented views per image for {epochs} epochs: each image's "
                      f"views repeat every {augmented} epochs, where the published recipe draws a fresh random "
                      f"crop every epoch; recache with --views auto (or ≥ {epochs}) for a faithful run")
    return cached[1:], record


def batches_per_epoch(n: int, batch_size: int) -> int:
    """The published loader drops the last partial batch, unless the data is smaller than one batch."""
    return n // batch_size if n >= batch_size else 1


def train(cache: FeatureCache, loaded: LoadedModel, config: TrainConfig, progress: bool = True,
          on_report=None, resume: Checkpoint | None = None) -> TrainResult:
    """Learn the context on `cache`'s (shots, seed) subset, from the start or from `resume`.

    The host enqueues each epoch's steps without waiting for them, and looks at the results after the first epoch,
    then every REPORT_SECONDS and at the end; `on_report(result)` is called then, with `result.checkpoint` the
    state after the last epoch seen."""
    setup_start = time.perf_counter()
    device = resolve_device(config.device)
    dtype = autocast_dtype(resolve_precision(config.precision, device, "bf16"))
    if config.batch_size < 1 or config.lr <= 0:
        raise FastCoopError("--batch-size must be ≥ 1 and --lr > 0")
    backends = resolve(device, config.attention, config.fused, config.fused_mlp)
    rows = cache.rows("train", config.shots, config.seed if config.shots else None)
    epochs = config.epochs or published_epochs(config.shots, len(cache.classnames))
    kept = class_subset(len(cache.classnames), config.classes)  # few-shot sampled first, then kept (published)
    in_subset, labels = relabel(cache.labels("train", rows), kept)
    rows, labels = rows[in_subset.numpy()], labels.to(device)
    classnames = [cache.classnames[k] for k in kept]

    model = loaded.model
    if config.text_path == "reference" or TextTower.of(model).fast_path_problem():
        move_text_tower(model, device)  # the published text path runs the model's own tower
    # else the model stays where it is: the fast encoder runs a copy of the tower's blocks on the device
    torch.manual_seed(config.seed)
    learner = PromptLearner(model, loaded.tokenizer, classnames, config.n_ctx, config.csc, config.position,
                            config.init).to(device)
    # the run's options with every default resolved; the caller's config stays as it was given
    config = dataclasses.replace(config, epochs=epochs, n_ctx=learner.n_ctx, attention=backends.attention)
    if config.text_path == "fast":
        encode_text = FastTextEncoder(model, learner, backends, weight_dtype=dtype)
    else:
        tower = TextTower.of(model)
        encode_text = lambda: reference_text_features(tower, learner)  # noqa: E731
    views, augmentation = epoch_views(cache.features("train", rows), config.epochs)  # on the host, float16
    if device.startswith("cuda"):
        views = views.pin_memory()  # each epoch's view goes to the device asynchronously
    features = torch.empty(views.shape[1:], device=device)  # the epoch's view, in float32
    scale = model.logit_scale.exp().detach().to(device)
    orders, lrs = schedule_tables(len(labels), config)
    step = TrainStep(learner, encode_text, features, labels, scale, orders.to(device), lrs.to(device),
                     config.momentum, config.weight_decay, dtype, backends.loss)
    result = TrainResult(learner, config, backends, augmentation=augmentation)
    first_epoch = 0
    if resume is not None:
        first_epoch = resume.restore(step)
        result.history = list(resume.history)
    use_graph = config.graph and device.startswith("cuda")
    run_step = None  # the graph is captured at the first epoch, once the static tensors hold real data
    start = time.perf_counter()
    result.setup_seconds = start - setup_start
    seen, seen_at = first_epoch, start  # epochs whose results the host has read, and when
    bar = tqdm(total=config.epochs, initial=first_epoch, desc="train", unit="epoch", disable=not progress)
    try:
        with _stop_at_epoch_end() as stop_requested:
            for epoch in range(first_epoch, config.epochs):
                step.load_view(views[epoch % len(views)])
                if run_step is None:
                    run_step = graphed_or_eager(step) if use_graph else step
                for _ in range(orders.shape[1]):
                    run_step()
                step.end_epoch(epoch)
                now = time.perf_counter()
                if epoch == first_epoch or epoch + 1 == config.epochs or now - seen_at >= REPORT_SECONDS or \
                        stop_requested:
                    _read_back(step, result, seen, epoch + 1, now - seen_at)  # waits for the device
                    bar.update(epoch + 1 - seen)
                    seen, seen_at = epoch + 1, time.perf_counter()
                    if epoch == first_epoch:
                        result.first_epoch_seconds = seen_at - start
                    last = result.history[-1]
                    bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['train_acc']:.1%}",
                                    steps_s=f"{last['steps'] / last['seconds']:.0f}")
                    if stop_requested:
                        raise KeyboardInterrupt
                    if on_report:
                        on_report(result)
    except KeyboardInterrupt:  # the caller saves result.checkpoint, the state after the last epoch seen
        raise TrainingInterrupted(result) from None
    finally:
        bar.close()
    result.seconds = time.perf_counter() - start
    return result


@contextmanager
def _stop_at_epoch_end():
    """While training, Ctrl-C and SIGTERM ask the loop to stop at the end of the current epoch, so that what is
    saved is exactly an epoch's end; a second one stops at once."""
    requested = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def ask(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)

    previous = {number: signal.signal(number, ask) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def schedule_tables(n: int, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Every epoch's batch order (epochs × steps × batch, the last partial batch dropped) from one generator
    seeded with the run's seed, a permutation per epoch in epoch order; and every epoch's learning rate."""
    batch_size, steps = min(config.batch_size, n), batches_per_epoch(n, config.batch_size)
    generator = torch.Generator().manual_seed(config.seed)
    orders = torch.stack([torch.randperm(n, generator=generator)[:steps * batch_size] for _ in range(config.epochs)])
    lrs = torch.tensor([lr_at(e, config.epochs, config.lr, config.warmup_epochs, config.warmup_lr)
                        for e in range(config.epochs)])
    return orders.view(config.epochs, steps, batch_size), lrs


def _read_back(step: TrainStep, result: TrainResult, first: int, end: int, seconds: float) -> None:
    """Epochs first..end-1 into the history (their time shared evenly), and a checkpoint after them; on a
    non-finite epoch, the context of the last good one is restored and NonFiniteLoss raised."""
    loss_sums, correct, finite = (t[first:end].tolist() for t in (step.loss_sums, step.correct, step.epoch_finite))
    for i, epoch in enumerate(range(first, end)):
        if not finite[i]:
            with torch.no_grad():
                step.learner.ctx.copy_(step.good_ctx)
            result.checkpoint = Checkpoint.of(step, result.history)
            raise NonFiniteLoss(epoch, result)
        config = result.config
        lr = lr_at(epoch, config.epochs, config.lr, config.warmup_epochs, config.warmup_lr)
        result.history.append({"epoch": epoch + 1, "lr": lr, "loss": loss_sums[i] / step.steps,
                               "train_acc": correct[i] / (step.steps * step.batch_size), "steps": step.steps,
                               "seconds": seconds / (end - first)})
    result.checkpoint = Checkpoint.of(step, result.history)


class TrainingInterrupted(Exception):
    """Ctrl-C (or SIGTERM) during training; `result.checkpoint` is the state after the last epoch seen."""

    def __init__(self, result: TrainResult):
        super().__init__("training interrupted")
        self.result = result


class NonFiniteLoss(FastCoopError):
    """The loss became NaN or infinite; `result.learner` holds the context of the last good epoch."""

    def __init__(self, epoch: int, result: TrainResult):
        super().__init__(f"the loss became non-finite in epoch {epoch + 1}; the last good context "
                         f"(after epoch {epoch}) is kept — try a lower --lr or --precision fp32")
        self.result = result
