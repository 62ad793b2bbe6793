"""Training any method (fastcoop.methods) on cached image features: only what its learner trains learns (CoOp's
context vectors, CoCoOp's Meta-Net too), every CLIP weight stays frozen.

The published loop, per epoch: a permutation of the few-shot rows, batches (the last partial batch dropped), the
method's loss on each (CoOp's: the K prompts through the text encoder, cosine cross-entropy), SGD. Here every
epoch's permutation and
learning rate are drawn up front into device tables (the same draws, in the same order, as a per-epoch loop), so
the host only enqueues steps and reads the results back now and then. Epoch e trains on the
cache's augmented view e of every image: each view is an independent draw of the published augmentation, so with
a view per epoch cached this is the published loader's fresh random crop of every image in every epoch.
"""

import signal
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from tqdm import tqdm

from fastcoop import methods
from fastcoop.backends import Backends, resolve
from fastcoop.cache import FeatureCache
from fastcoop.config import Recipe, Runtime
from fastcoop.devices import autocast_dtype, resolve_device
from fastcoop.errors import FastCoopError
from fastcoop.fewshot import check_classes, class_subset, relabel
from fastcoop.models import LoadedModel, move_text_tower
from fastcoop.step import CudaGraphStep, TrainStep, graphed_or_eager
from fastcoop.text_encoder import text_encoder
from fastcoop.text_tower import TextTower


REPORT_SECONDS = 0.5  # how often the host waits for the device to read the results back
PROFILE_STEPS = 20  # steps in a --profile trace


@dataclass(frozen=True)
class Plan:
    """What a command decides once and passes down: the runs' method, their recipes as run (published values
    filled in), the runtime on its device, and the implementation of each op."""

    method: methods.Method
    recipes: tuple[Recipe, ...]
    runtime: Runtime
    backends: Backends


def plan_runs(cache: FeatureCache, loaded: LoadedModel, recipes: list[Recipe], runtime: Runtime = Runtime()) -> Plan:
    """The plan of runs to train together: one method, recipes that differ only in what a run may have of its own
    (methods.stack_key)."""
    device = resolve_device(runtime.device)
    method = methods.get(recipes[0].method)
    published = tuple(methods.publish(recipe, len(cache.classnames), device, cache.dataset) for recipe in recipes)
    if len({methods.stack_key(recipe, method) for recipe in published}) > 1:
        own = ("seed, shots, epochs" + (" and prompts" if method.stacks_prompts else ""))
        raise ValueError(f"runs trained together may differ only in their {own}")
    backends = resolve(device, runtime.impl, runtime.impl_detail, TextTower.of(loaded.model))
    return Plan(method, published, replace(runtime, device=device), backends)


@dataclass
class LossParts:
    """What a method's loss is made from (fastcoop.methods' guide): the model, the runs' learners, class names and
    recipes, the implementations and device, CLIP's logit scale and the autocast dtype."""

    loaded: LoadedModel
    learners: list
    classnames: list[str]
    recipes: list[Recipe]
    backends: Backends
    device: str
    logit_scale: torch.Tensor
    autocast_dtype: torch.dtype | None
    train_views: list[torch.Tensor]  # each run's views it trains on (views × rows × D, on the host)
    train_labels: list[torch.Tensor]  # each run's labels of those rows

    def text_encoder(self):
        """The text encoder the backends name, built for the learners' prompt layouts."""
        return text_encoder(self.loaded.model, self.learners, self.backends, weight_dtype=self.autocast_dtype)


@dataclass
class TrainResult:
    learner: torch.nn.Module
    recipe: Recipe  # as run: every default resolved
    backends: Backends  # the implementation of each op
    history: list[dict] = field(default_factory=list)
    augmentation: dict = field(default_factory=dict)  # the cache's views and how many distinct ones each image saw
    seconds: float = 0.0  # the epochs' loop (graph capture and kernel compilation included)
    setup_seconds: float = 0.0  # features to the device, learner, text encoder: what runs before the loop
    first_epoch_seconds: float = 0.0  # the loop's first epoch, graph capture and kernel compilation included
    kernels_seconds: float = 0.0  # of the first epoch: compiling (or finding) the graphed step's Triton kernels
    capture_seconds: float = 0.0  # of the first epoch: the graphed step's warm-up and capture
    checkpoint: "Checkpoint | None" = None  # the state at the host's last look (inside an epoch, or at its end)
    lrs: list[float] = field(default_factory=list)  # each epoch's learning rate (the method's schedule)


@dataclass
class Checkpoint:
    """A run after `epochs_done` epochs and `steps_into_epoch` steps of the next: with the same options and cache,
    training goes on from it exactly as if it had not stopped (the batch orders are drawn again from the seed; the
    learned tensors by the learner's names and the optimizer's state of each — state name → tensor name → tensor,
    SGD's momentum, Adam's moments and steps — are here). Inside an epoch it also holds
    that epoch's loss and hits so far, and the tensors at the end of the last epoch (the context kept should the
    loss turn non-finite)."""

    epochs_done: int
    params: dict[str, torch.Tensor]
    optimizer: dict[str, dict[str, torch.Tensor]]
    history: list[dict]
    steps_into_epoch: int = 0
    epoch_params: dict[str, torch.Tensor] | None = None
    partial_loss: float = 0.0
    partial_correct: int = 0

    @classmethod
    def of(cls, step, run: int, history: list[dict], steps_into_epoch: int = 0) -> "Checkpoint":
        """The run as the step holds it now, `steps_into_epoch` steps after the end of its last epoch."""
        state = step.state_dict(run)
        if not steps_into_epoch:
            return cls(len(history), state["epoch_params"], state["epoch_optimizer"], list(history))
        epoch = len(history)
        return cls(epoch, state["params"], state["optimizer"], list(history), steps_into_epoch,
                   state["epoch_params"], state["loss_sums"][epoch].item(), int(state["correct"][epoch].item()))

    def restore(self, step, run: int) -> None:
        """Load into a fresh TrainStep's run, which then trains from step `steps_into_epoch` of epoch
        `epochs_done`."""
        loss_sums, correct = torch.zeros_like(step.loss_sums[run]), torch.zeros_like(step.correct[run])
        if self.steps_into_epoch:
            loss_sums[self.epochs_done], correct[self.epochs_done] = self.partial_loss, self.partial_correct
        step.load_state_dict(run, {"params": self.params, "optimizer": self.optimizer,
                                   "epoch_params": self.epoch_params or self.params, "epoch_optimizer": self.optimizer,
                                   "loss_sums": loss_sums, "correct": correct})
        step.start_at_epoch(run, self.epochs_done, self.steps_into_epoch)


def epoch_views(cached_views: int, epochs: int) -> tuple[slice, dict]:
    """The views the epochs train on (epoch e on the e-th of them, cycling when they are fewer than the epochs)
    as a slice of the cache's views, and what that means for the run; warns when they are fewer, since the
    published recipe draws a fresh crop of every image in every epoch. `cached_views`: the cache's views per
    train image, the eval view (view 0) included."""
    augmented = cached_views - 1
    record = {"cached_views": augmented, "distinct_views_per_image": min(augmented, epochs),
              "fresh_view_every_epoch": augmented >= epochs}
    if augmented == 0:
        warnings.warn(f"the cache holds no augmented views: all {epochs} epochs train on each image's un-augmented "
                      "view, where the published recipe draws a fresh random crop every epoch; recache with "
                      "--views auto for a faithful run")
        return slice(0, 1), record
    if augmented < epochs:
        warnings.warn(f"the cache holds {augmented} augmented views per image for {epochs} epochs: each image's "
                      f"views repeat every {augmented} epochs, where the published recipe draws a fresh random "
                      f"crop every epoch; recache with --views auto (or ≥ {epochs}) for a faithful run")
    return slice(1, 1 + min(augmented, epochs)), record


def pool_of_views(cached_views: int, wanted: int, method: str) -> tuple[slice, dict]:
    """The views a method that pools them trains on (the cache's first `wanted` augmented views), and what that
    means for the run; warns when the cache holds fewer."""
    augmented = cached_views - 1
    record = {"cached_views": augmented, "pooled_views": min(augmented, wanted) or 1, "published_pool": wanted}
    if augmented < wanted:
        warnings.warn(f"{method} pools {wanted} augmented views of every image; the cache holds {augmented}, so its "
                      f"runs draw from {'the un-augmented view' if not augmented else f'{augmented}'}: recache with "
                      f"--views {wanted} or more for a faithful run")
    return (slice(1, 1 + min(augmented, wanted)) if augmented else slice(0, 1)), record


def batches_per_epoch(n: int, batch_size: int) -> int:
    """The published loader drops the last partial batch, unless the data is smaller than one batch."""
    return n // batch_size if n >= batch_size else 1


def train(cache: FeatureCache, loaded: LoadedModel, recipe: Recipe, runtime: Runtime = Runtime(),
          progress: bool = True, on_report=None, resume: Checkpoint | None = None) -> TrainResult:
    """Learn the context on `cache`'s (shots, seed) subset, from the start or from `resume` (a stack of one)."""
    report = on_report and (lambda results: on_report(results[0]))
    return train_stack(cache, loaded, [recipe], runtime, progress, report, [resume])[0]


def train_stack(cache: FeatureCache, loaded: LoadedModel, runs: Plan | list[Recipe], runtime: Runtime = Runtime(),
                progress: bool = True, on_report=None, resumes: list[Checkpoint | None] | None = None,
                profile: str | None = None) -> list[TrainResult]:
    """Train runs that differ only in their seed, shot count and epochs (so in their images, order, schedule and
    initial context) and, where their method stacks prompts, in their prompts (context length and words, class
    position, class-specific context) together: every step runs all their prompts in one text-encoder pass; each
    run keeps its own loss, momentum, step counter and schedule, and ends exactly where it would alone. A run whose
    schedule is over leaves the stack. `runs`: the caller's Plan, or the recipes (planned here, on `runtime`).
    `resumes`: each run's checkpoint, or None.

    The host enqueues steps without waiting for them and looks at the results after the first span of steps,
    then every REPORT_SECONDS (inside an epoch if need be) and at the end; `on_report(results)` is called then,
    each `result.checkpoint` the run's state at that look. `profile`: a file for a PyTorch profiler trace
    (Chrome's format) of up to PROFILE_STEPS steps after the first look (the graph captured, the kernels
    compiled); training is otherwise the same."""
    setup_start = time.perf_counter()
    plan = runs if isinstance(runs, Plan) else plan_runs(cache, loaded, runs, runtime)
    stack = prepare_stack(cache, loaded, plan, resumes)
    start = time.perf_counter()
    for result in stack.results:
        result.setup_seconds = start - setup_start
    run_epochs(stack, progress, on_report, profile)
    for result in stack.results:
        result.seconds = time.perf_counter() - start
    return stack.results


@dataclass
class Stack:
    """Runs ready to train together: their step, each run's epoch views (host tensors), their results so far."""

    step: TrainStep
    views: list[torch.Tensor]
    results: list[TrainResult]
    device: str
    in_step: list[int | None] = field(default_factory=list)  # which of its views each run's step holds now


def prepare_stack(cache: FeatureCache, loaded: LoadedModel, plan: Plan,
                  resumes: list[Checkpoint | None] | None = None) -> Stack:
    """Everything the runs' loop needs, in reading order: the runs' images, their learners and the method's loss,
    their epoch views and schedules in one step, each resumed run's state."""
    recipes, backends, device = list(plan.recipes), plan.backends, plan.runtime.device
    base = recipes[0]
    check_classes(len(cache.classnames), base.classes)
    kept = class_subset(len(cache.classnames), base.classes)  # few-shot sampled first, then kept (published)
    classnames = [cache.classnames[k] for k in kept]
    rows, labels = zip(*(_subset(cache, recipe, kept) for recipe in recipes))
    if backends.text == "reference":
        move_text_tower(loaded.model, device)  # the published text path runs the model's own tower
    # else the model stays where it is: the fast encoder runs a copy of the tower's blocks on the device
    learners = []
    for recipe in recipes:
        torch.manual_seed(recipe.seed)
        learners.append(plan.method.learner(loaded.model, loaded.tokenizer, classnames, recipe).to(device))
    # M as the context's words set it
    recipes = [replace(r, n_ctx=getattr(learner, "n_ctx", r.n_ctx)) for r, learner in zip(recipes, learners)]
    pooled = plan.method.pooled_views
    used = [pool_of_views(cache.num_views("train"), pooled, plan.method.title) if pooled else
            epoch_views(cache.num_views("train"), recipe.epochs) for recipe in recipes]
    views = _read_views(cache, rows, [view_slice for view_slice, _ in used], device)
    if pooled:  # one "view" of every pooled view's rows (view-major), the labels repeated to match
        labels = [run_labels.repeat(len(run_views)) for run_labels, run_views in zip(labels, views)]
        views = [run_views.reshape(1, -1, run_views.shape[-1]) for run_views in views]
    dtype = autocast_dtype(base.precision)
    parts = LossParts(loaded, learners, classnames, recipes, backends, device,
                      loaded.model.logit_scale.exp().detach().to(device), dtype, views, labels)
    plan.method.prepare(parts)  # what the method derives from the runs' training data
    loss = plan.method.loss(parts)
    most = max(len(run_labels) for run_labels in labels)
    features = torch.zeros(len(recipes), most, views[0].shape[-1], device=device)  # each run's epoch view
    padded_labels = torch.zeros(len(recipes), most, dtype=torch.long)
    for run, run_labels in enumerate(labels):
        padded_labels[run, :len(run_labels)] = run_labels
    orders, lrs = zip(*(schedule_tables(len(run_labels), len(subset), recipe, plan.method.lr_at)
                        for run_labels, subset, recipe in zip(labels, rows, recipes)))
    step = TrainStep(learners, loss, features, padded_labels.to(device), orders, lrs, plan.method.optimizer(base))
    results = [TrainResult(learner, recipe, backends, augmentation=record, lrs=run_lrs.tolist())
               for learner, recipe, (_, record), run_lrs in zip(learners, recipes, used, lrs)]
    for run, resume in enumerate(resumes or [None] * len(recipes)):
        if resume is not None:
            resume.restore(step, run)
            results[run].history = list(resume.history)
            results[run].checkpoint = resume
    return Stack(step, views, results, device)


def _subset(cache: FeatureCache, recipe: Recipe, kept: list[int]) -> tuple[np.ndarray, torch.Tensor]:
    """A run's train rows (its few-shot subset's images of the kept classes) and their labels among those."""
    subset = cache.rows("train", recipe.shots, recipe.seed if recipe.shots else None)
    in_subset, labels = relabel(cache.labels("train", subset), kept)
    return subset[in_subset.numpy()], labels


def _read_views(cache: FeatureCache, rows: list[np.ndarray], used: list[slice], device: str) -> list[torch.Tensor]:
    """Each run's epoch views (views × its images × D, float16 on the host; pinned for a GPU): only the views the
    epochs use, of the images the runs use, in one read (a chunk shared by runs is read once)."""
    read = cache.features("train", np.concatenate(rows), max(used, key=lambda s: s.stop))
    views = [run_views[:run_slice.stop - run_slice.start].contiguous()
             for run_views, run_slice in zip(read.split([len(subset) for subset in rows], dim=1), used)]
    if device.startswith("cuda"):
        views = [run_views.pin_memory() for run_views in views]  # then copied to the device asynchronously
    return views


def run_epochs(stack: Stack, progress: bool = True, on_report=None, profile: str | None = None) -> None:
    """Run the stack's steps to the end of every run's schedule: the steps up to the next end of some run's epoch
    (fewer when a look is due first: a long epoch is looked at, and checkpointed, inside it), then that run's
    epoch end (and its next view) on the device; a look at the results as train_stack says. The step is captured
    (graphed) when first run, and again each time the stack shrinks."""
    step, results = stack.step, stack.results
    steps = step.steps_per_epoch
    done = [len(result.history) * s + (result.checkpoint.steps_into_epoch if result.checkpoint else 0)
            for result, s in zip(results, steps)]  # each run's steps, as the host counts them
    total = [result.recipe.epochs * s for result, s in zip(results, steps)]
    for run in range(len(results)):
        if done[run] < total[run]:
            _load_epoch_view(stack, run, done[run] // steps[run])
    looks = _Looks(results, progress, PROFILE_STEPS if profile else 0)
    active, run_step = [], None
    try:
        with _stop_at_next_look() as stop_requested:
            while any(d < t for d, t in zip(done, total)):
                unfinished = [run for run in range(len(results)) if done[run] < total[run]]
                if active != unfinished:
                    active = unfinished
                    step.set_active(active)  # the stack shrinks when runs finish: capture it again
                    run_step = _captured(step, results) if results[0].backends.step == "graph" else step
                span = min(steps[run] - done[run] % steps[run] for run in active)  # to the next end of an epoch
                ran = _run_span(run_step, span, looks, profile, stack.device,
                                all(done[run] + span == total[run] for run in active))
                for run in active:
                    done[run] += ran
                    if done[run] % steps[run] == 0:
                        step.end_epoch(run, done[run] // steps[run] - 1)
                        if done[run] < total[run]:
                            _load_epoch_view(stack, run, done[run] // steps[run])
                if looks.due(ran, all(d == t for d, t in zip(done, total)) or stop_requested):
                    looks.look(step, done)
                    if stop_requested:
                        raise KeyboardInterrupt
                    if on_report:
                        on_report(results)
    except KeyboardInterrupt:  # the caller saves each result.checkpoint, the state at the last look
        raise TrainingInterrupted(results) from None
    finally:
        looks.bar.close()


def _run_span(run_step, span: int, looks: "_Looks", profile: str | None, device: str, last_span: bool) -> int:
    """Up to `span` steps (the first few traced by the profiler when it is their turn), stopping early when a look
    is overdue; the steps run."""
    traced = looks.steps_to_trace(span, last_span)
    if traced:
        with _profiled(profile, device):
            for _ in range(traced):
                run_step()
    for ran in range(traced + 1, span + 1):
        run_step()
        if ran < span and looks.overdue():
            return ran
    return span


def _load_epoch_view(stack: Stack, run: int, epoch: int) -> None:
    """The view a run's epoch trains on (cycling when the cache holds fewer than its epochs), unless the step
    holds it already (a single view, or a pool of views: loaded once)."""
    if not stack.in_step:
        stack.in_step.extend([None] * len(stack.views))
    view = epoch % len(stack.views[run])
    if stack.in_step[run] != view:
        stack.step.load_view(run, stack.views[run][view])
        stack.in_step[run] = view


class _Looks:
    """When the loop looks at the results (after the first span, then every REPORT_SECONDS, inside an epoch if
    need be, and at the end), what it does then (reads them back, checkpoints, moves the progress bar), and when
    the profiler traces."""

    def __init__(self, results: list[TrainResult], progress: bool, to_trace: int):
        self.results, self.to_trace = results, to_trace
        self.seen = [len(result.history) for result in results]
        self.first_epochs = sum(self.seen) + 1  # the loop's first epoch has ended when the runs have done these
        self.start = self.seen_at = time.perf_counter()
        self.steps_since = 0  # the stack's steps since the last look
        self.bar = tqdm(total=sum(r.recipe.epochs for r in results), initial=sum(self.seen), unit="epoch",
                        disable=not progress, desc="train" if len(results) == 1 else f"train ×{len(results)}")

    def steps_to_trace(self, span: int, last_span: bool) -> int:
        """How many of the next `span` steps to trace: once, after the first look (compiled, captured), or in the
        last span when there is no later one."""
        traced = min(self.to_trace, span) if self.seen_at > self.start or last_span else 0
        if traced:
            self.to_trace = 0
        return traced

    def overdue(self) -> bool:
        return time.perf_counter() - self.seen_at >= REPORT_SECONDS

    def due(self, span: int, now_anyway: bool) -> bool:
        self.steps_since += span
        return self.seen_at == self.start or now_anyway or self.overdue()

    def look(self, step: TrainStep, done: list[int]) -> None:
        now = time.perf_counter()
        epochs_now = [d // s for d, s in zip(done, step.steps_per_epoch)]
        into = [d % s for d, s in zip(done, step.steps_per_epoch)]
        _read_back(step, self.results, self.seen, epochs_now, into, now - self.seen_at)  # waits for the device
        self.bar.update(sum(epochs_now) - sum(self.seen))
        if self.first_epochs and sum(epochs_now) >= self.first_epochs:
            for result in self.results:
                result.first_epoch_seconds = time.perf_counter() - self.start
            self.first_epochs = 0
        training = [r for r in self.results if r.history and len(r.history) < r.recipe.epochs]
        if training or any(r.history for r in self.results):
            last = (training or [r for r in self.results if r.history])[0].history[-1]  # a run still training
            self.bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['train_acc']:.1%}",
                                 steps_s=f"{self.steps_since / (now - self.seen_at):.0f}")
        self.seen, self.seen_at, self.steps_since = epochs_now, time.perf_counter(), 0


def _captured(step: TrainStep, results: list[TrainResult]):
    """The step in a CUDA graph, or eager where capture fails (the results' records then say so); the first
    capture's costs go into the results."""
    run_step = graphed_or_eager(step)
    for result in results:
        if not isinstance(run_step, CudaGraphStep):
            result.backends = replace(result.backends, step="eager")
        elif not result.capture_seconds:
            result.kernels_seconds = run_step.kernels_seconds
            result.capture_seconds = run_step.capture_seconds
    return run_step


@contextmanager
def _profiled(path: str, device: str):
    """A PyTorch profiler around the steps inside, its trace (Chrome's format) written to `path` at the end."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as profiler:
        yield
    profiler.export_chrome_trace(str(path))


@contextmanager
def _stop_at_next_look():
    """While training, Ctrl-C and SIGTERM ask the loop to stop at its next look (within REPORT_SECONDS; each run is
    saved as it is then, inside an epoch or at its end); a second one stops at once."""
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


def schedule_tables(n: int, images: int, recipe: Recipe, lr_of) -> tuple[torch.Tensor, torch.Tensor]:
    """Every epoch's batch order (epochs × steps × batch, the last partial batch dropped) from one generator
    seeded with the run's seed, a permutation of the epoch's `n` rows per epoch in epoch order, as many batches
    as the `images` make (n = images, but for a pool of views); and every epoch's learning rate (`lr_of(epoch,
    recipe)`: the method's)."""
    batch_size, steps = min(recipe.batch_size, n), batches_per_epoch(images, recipe.batch_size)
    generator = torch.Generator().manual_seed(recipe.seed)
    orders = torch.stack([torch.randperm(n, generator=generator)[:steps * batch_size] for _ in range(recipe.epochs)])
    lrs = torch.tensor([lr_of(e, recipe) for e in range(recipe.epochs)], dtype=torch.float64)
    return orders.view(recipe.epochs, steps, batch_size), lrs


def _read_back(step: TrainStep, results: list[TrainResult], first: list[int], end: list[int], into: list[int],
               seconds: float) -> None:
    """Each run's epochs first[run]..end[run]-1 into its history (the time shared evenly among its epochs read),
    and a checkpoint of its state now, into[run] steps into its next epoch; when a run had a non-finite epoch, its
    last good context is restored and NonFiniteLoss raised (the others keep their state now)."""
    loss_sums, correct, finite = (t.tolist() for t in (step.loss_sums, step.correct, step.epoch_finite))
    failed = {}
    for run, result in enumerate(results):
        steps, batch = step.steps_per_epoch[run], step.batch_sizes[run]
        for epoch in range(first[run], end[run]):
            if not finite[run][epoch]:
                failed[run] = epoch
                with torch.no_grad():
                    for param, good in zip(step.params[run], step.good_params[run]):
                        param.copy_(good)
                break
            result.history.append({"epoch": epoch + 1, "lr": result.lrs[epoch], "loss": loss_sums[run][epoch] / steps,
                                   "train_acc": correct[run][epoch] / (steps * batch), "steps": steps,
                                   "seconds": seconds / (end[run] - first[run])})
        mid = 0 if run in failed else into[run]
        if result.history or mid:
            result.checkpoint = Checkpoint.of(step, run, result.history, mid)
    if failed:
        raise NonFiniteLoss(failed, results)


class TrainingInterrupted(Exception):
    """Ctrl-C (or SIGTERM) during training; each `results[i].checkpoint` is that run's state at the last look."""

    def __init__(self, results: list[TrainResult]):
        super().__init__("training interrupted")
        self.results = results


class NonFiniteLoss(FastCoopError):
    """The loss became NaN or infinite in the runs `failed` names (run → 0-based epoch); their learners hold the
    context of their last good epoch, the other runs' the state after the epochs seen."""

    def __init__(self, failed: dict[int, int], results: list[TrainResult]):
        run, epoch = next(iter(failed.items()))
        which = "" if len(results) == 1 else f" of the run with seed {results[run].recipe.seed}"
        super().__init__(f"the loss{which} became non-finite in epoch {epoch + 1}; the last good context "
                         f"(after epoch {epoch}) is kept — try a lower --lr or --precision fp32")
        self.failed, self.results = failed, results
