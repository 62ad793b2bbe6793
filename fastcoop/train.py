"""CoOp training on cached image features: only the context vectors learn, every CLIP weight stays frozen.

The loop, per epoch: a permutation of the few-shot rows, batches of 32 (the last partial batch dropped, as
published), the K prompts through the text encoder every step, cosine cross-entropy, SGD. Epoch e trains on the
cache's augmented view e of every image: each view is an independent draw of the published augmentation, so with
a view per epoch cached this is the published loader's fresh random crop of every image in every epoch.
"""

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from fastcoop.cache import FeatureCache
from fastcoop.devices import autocast_dtype, resolve_device, resolve_precision
from fastcoop.errors import FastCoopError
from fastcoop.kernels import INTERPRET
from fastcoop.models import LoadedModel, move_text_tower
from fastcoop.prompts import PromptLearner
from fastcoop.schedule import lr_at, published_epochs
from fastcoop.step import TrainStep, graphed_or_eager
from fastcoop.text_encoder import FastTextEncoder, prefix_attention_triton, reference_text_features
from fastcoop.text_tower import TextTower


@dataclass
class TrainConfig:
    """Every option of a run; the defaults are the published recipe."""

    shots: int | None = 16  # None: the whole cached train split
    seed: int = 1
    n_ctx: int = 16
    csc: bool = False
    position: str = "end"
    init: str | None = None
    epochs: int | None = None  # None: the published count for the shot count
    batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    precision: str = "auto"  # GPU: bf16 autocast by default; CPU: fp32
    device: str = "auto"
    text_path: str = "fast"  # or "reference": the published text computation
    graph: bool = True  # on GPU, capture the whole step once in a CUDA graph and replay it
    fused: bool = True  # on GPU, the text blocks' elementwise work in fused Triton kernels (FastTextEncoder)
    attention: str = "auto"  # fast path attention: grid, triton, flex; auto: triton on GPU, grid on CPU


@dataclass
class TrainResult:
    learner: PromptLearner
    config: TrainConfig
    history: list[dict] = field(default_factory=list)
    augmentation: dict = field(default_factory=dict)  # the cache's views and how many distinct ones each image saw
    seconds: float = 0.0  # the epochs' loop (graph capture and kernel compilation included)
    setup_seconds: float = 0.0  # features to the device, learner, text encoder: what runs before the loop


def resolve_attention(attention: str, device: str) -> str:
    """auto → the fused Triton kernel on GPU, the plain-PyTorch grid on CPU (Triton runs there only interpreted)."""
    on_gpu = device.startswith("cuda")
    if attention == "auto":
        return "triton" if on_gpu and prefix_attention_triton is not None else "grid"
    if attention == "triton" and (prefix_attention_triton is None or not (on_gpu or INTERPRET)):
        raise FastCoopError("--attention triton needs a GPU with Triton; use grid")
    if attention == "flex" and not on_gpu:
        raise FastCoopError("--attention flex trains on GPU only (FlexAttention has no CPU backward); use grid")
    return attention


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
          on_epoch=None) -> TrainResult:
    """Learn the context on `cache`'s (shots, seed) subset. `on_epoch(result)` is called after every good epoch."""
    setup_start = time.perf_counter()
    device = resolve_device(config.device)
    dtype = autocast_dtype(resolve_precision(config.precision, device, "bf16"))
    if config.batch_size < 1 or config.lr <= 0:
        raise FastCoopError("--batch-size must be ≥ 1 and --lr > 0")
    config.attention = resolve_attention(config.attention, device)
    rows = cache.rows("train", config.shots, config.seed if config.shots else None)
    config.epochs = config.epochs or published_epochs(config.shots, len(cache.classnames))
    labels = cache.labels("train", rows).to(device)

    model = loaded.model
    if config.text_path == "reference" or TextTower.of(model).fast_path_problem():
        move_text_tower(model, device)  # the published text path runs the model's own tower
    # else the model stays where it is: the fast encoder runs a copy of the tower's blocks on the device
    torch.manual_seed(config.seed)
    learner = PromptLearner(model, loaded.tokenizer, cache.classnames, config.n_ctx, config.csc, config.position,
                            config.init).to(device)
    config.n_ctx = learner.n_ctx
    n = len(labels)
    batch_size, steps = min(config.batch_size, n), batches_per_epoch(n, config.batch_size)
    if config.text_path == "fast":
        encode_text = FastTextEncoder(model, learner, config.attention, weight_dtype=dtype,
                                      fused=None if config.fused else False)
    else:
        tower = TextTower.of(model)
        encode_text = lambda: reference_text_features(tower, learner)  # noqa: E731
    views, augmentation = epoch_views(cache.features("train", rows), config.epochs)  # on the host, float16
    if device.startswith("cuda"):
        views = views.pin_memory()  # each epoch's view goes to the device asynchronously
    features = torch.empty(views.shape[1:], device=device)  # the epoch's view, in float32
    scale = model.logit_scale.exp().detach().to(device)
    step = TrainStep(learner, encode_text, features, labels, scale, batch_size, steps, config.momentum,
                     config.weight_decay, dtype)
    use_graph = config.graph and device.startswith("cuda")
    run_step = None  # the graph is captured at the first epoch, once the static tensors hold real data
    generator = torch.Generator().manual_seed(config.seed)
    result = TrainResult(learner, config, augmentation=augmentation)
    start = time.perf_counter()
    result.setup_seconds = start - setup_start
    bar = tqdm(range(config.epochs), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        lr = lr_at(epoch, config.epochs, config.lr, config.warmup_epochs, config.warmup_lr)
        order = torch.randperm(n, generator=generator)
        step.start_epoch(order.to(device), views[epoch % len(views)], lr)
        if run_step is None:
            run_step = graphed_or_eager(step) if use_graph else step
        good_ctx = learner.ctx.detach().clone()
        epoch_start = time.perf_counter()
        for _ in range(steps):
            run_step()
        mean_loss = step.loss_sum.item() / steps
        if not math.isfinite(mean_loss) or not torch.isfinite(learner.ctx).all():  # the last update can overflow
            with torch.no_grad():
                learner.ctx.copy_(good_ctx)
            raise NonFiniteLoss(epoch, result)
        seconds = time.perf_counter() - epoch_start
        record = {"epoch": epoch + 1, "lr": lr, "loss": mean_loss,
                  "train_acc": step.correct.item() / (steps * batch_size), "steps": steps, "seconds": seconds}
        result.history.append(record)
        bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{record['train_acc']:.1%}", steps_s=f"{steps / seconds:.0f}")
        if on_epoch:
            on_epoch(result)
    result.seconds = time.perf_counter() - start
    return result


class NonFiniteLoss(FastCoopError):
    """The loss became NaN or infinite; `result.learner` holds the context of the last good epoch."""

    def __init__(self, epoch: int, result: TrainResult):
        super().__init__(f"the loss became non-finite in epoch {epoch + 1}; the last good context "
                         f"(after epoch {epoch}) is kept — try a lower --lr or --precision fp32")
        self.result = result
