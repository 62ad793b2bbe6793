"""The CoOp training step as device work only, so that a whole step can be captured once in a CUDA graph; it
trains a stack of runs at once (one run is a stack of one).

The whole schedule lives on the device: every epoch's batch order (epochs × steps × batch rows) and learning rate
are tables indexed by a step counter, each step adds its loss and hits into its epoch's slot, and SGD (momentum,
weight decay) is written out as tensor ops. Nothing in a step depends on the host: the training loop is `steps`
replays of the graph per epoch, one copy of the epoch's feature view, and a look at the results now and then.
"""

import warnings

import torch

from fastcoop.kernels import cosine_ce


def sgd_update_(param, grad, momentum_buffer, lr, momentum: float, weight_decay: float) -> None:
    """torch.optim.SGD's update (dampening 0, not Nesterov), with lr a device tensor:
    d = g + wd·p;  buf = momentum·buf + d  (buf starts at 0, so the first step gives buf = d);  p −= lr·buf."""
    d = grad + weight_decay * param
    momentum_buffer.mul_(momentum).add_(d)
    param.sub_(lr * momentum_buffer)


class TrainStep:
    """One step of R stacked runs on static device tensors: gather each run's batch → the runs' text features in one
    encoder call → each run's fused loss → gradients → each run's SGD update. Runs of a stack share the schedule's
    shape (epochs, steps, batch) and the prompt layout; they differ in data, order, context and learning rate.

    `learners`: one per run; `encode_text()` gives R × K × D. `features`: the static R × n × D buffer holding
    the current epoch's view of each run's images; `labels`: R × n; `orders`: R × epochs × steps × batch rows;
    `lrs`: R × epochs. `step` counts steps from the runs' start."""

    def __init__(self, learners, encode_text, features, labels, logit_scale, orders, lrs, momentum: float,
                 weight_decay: float, autocast_dtype=None, loss_backend: str | None = None):
        self.learners, self.encode_text = list(learners), encode_text
        self.features, self.labels, self.logit_scale = features, labels, logit_scale
        runs, epochs, self.steps, self.batch_size = orders.shape
        self.orders, self.lrs = orders.reshape(runs, epochs * self.steps, self.batch_size), lrs
        self.momentum, self.weight_decay, self.autocast_dtype = momentum, weight_decay, autocast_dtype
        self.loss_backend = loss_backend  # None: fastcoop.backends' choice for the device
        device = labels.device
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.momentum_buffers = [torch.zeros_like(learner.ctx) for learner in self.learners]
        self.loss_sums = torch.zeros(runs, epochs, device=device)  # per run and epoch
        self.correct = torch.zeros(runs, epochs, dtype=torch.long, device=device)
        self.epoch_finite = torch.ones(runs, epochs, dtype=torch.bool, device=device)
        self.all_finite = torch.ones(runs, dtype=torch.bool, device=device)
        # each run's context after its last epoch of a finite run so far
        self.good_ctx = [learner.ctx.detach().clone() for learner in self.learners]

    def load_view(self, run: int, features: torch.Tensor) -> None:
        """A run's view of its images for this epoch (n × D, on the host or the device, any float dtype) into the
        static buffer; from pinned host memory the transfer does not wait for the host."""
        self.features[run].copy_(features.to(self.features.device, non_blocking=True))

    def __call__(self) -> None:
        epoch = torch.div(self.step, self.steps, rounding_mode="floor")
        rows = self.orders.index_select(1, self.step)[:, 0]  # runs × batch
        device_type = self.labels.device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None, cache_enabled=False):
            text = self.encode_text()
        losses, hits = [], []
        for run in range(len(self.learners)):
            labels = self.labels[run][rows[run]]
            loss, predicted = cosine_ce(self.features[run][rows[run]], text[run], self.logit_scale, labels,
                                        return_argmax=True, backend=self.loss_backend)
            losses.append(loss)
            hits.append((predicted == labels).sum())
        grads = torch.autograd.grad(losses, [learner.ctx for learner in self.learners])
        with torch.no_grad():
            for run, learner in enumerate(self.learners):
                sgd_update_(learner.ctx, grads[run], self.momentum_buffers[run],
                            self.lrs[run].index_select(0, epoch), self.momentum, self.weight_decay)
                self.loss_sums[run].index_add_(0, epoch, losses[run].detach().view(1))
                self.correct[run].index_add_(0, epoch, hits[run].view(1))
            self.step.add_(1)

    def end_epoch(self, epoch: int) -> None:
        """After an epoch's steps, on the device: a run's epoch is good if its loss and its context after it are
        finite (the last update can overflow); while all its epochs have been good, its context is the last good
        one."""
        with torch.no_grad():
            for run, learner in enumerate(self.learners):
                finite = torch.isfinite(self.loss_sums[run, epoch]) & torch.isfinite(learner.ctx).all()
                self.epoch_finite[run, epoch] = finite
                self.all_finite[run] &= finite
                self.good_ctx[run].copy_(torch.where(self.all_finite[run], learner.ctx, self.good_ctx[run]))

    def state(self) -> list[torch.Tensor]:
        """Every tensor a step writes (to undo the warm-up steps run before capture)."""
        return [*(learner.ctx.data for learner in self.learners), *self.momentum_buffers, self.loss_sums,
                self.correct, self.step]


def capture_graph(fn, warmup: int = 3, reset=lambda: None) -> torch.cuda.CUDAGraph:
    """fn run `warmup` times on a side stream (compiles kernels, builds autograd and cuBLAS state), then captured
    once; replaying the graph runs fn's device work with no host launches. reset() runs before each warm-up run
    and before the capture, outside the graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            reset()
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


class CudaGraphStep:
    """Captures a TrainStep once (after warm-up, then undone) and replays it."""

    def __init__(self, step: TrainStep, warmup: int = 3):
        self.step = step
        saved = [t.clone() for t in step.state()]
        first_step = step.step.clone()
        try:  # every warm-up run and the capture start at the same batch
            self.graph = capture_graph(step, warmup, reset=lambda: step.step.copy_(first_step))
        finally:  # capture records without running; undo the warm-up steps (also when capture fails)
            for tensor, value in zip(step.state(), saved):
                tensor.copy_(value)

    def __call__(self) -> None:
        self.graph.replay()


def graphed_or_eager(step: TrainStep):
    """The step captured in a CUDA graph, or, where capture fails, the eager step with a warning."""
    try:
        return CudaGraphStep(step)
    except RuntimeError as exc:
        warnings.warn(f"CUDA graph capture failed ({str(exc).splitlines()[0]}); running the step eagerly")
        return step
