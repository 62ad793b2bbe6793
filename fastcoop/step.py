"""The CoOp training step as device work only, so that a whole step can be captured once in a CUDA graph.

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
    """One step on static device tensors: gather batch → text features → fused loss → gradient → SGD update.

    `orders`: epochs × steps × batch rows of `labels` (and of `features`, the static n × D buffer that holds the
    current epoch's view); `lrs`: the learning rate of each epoch. `step` counts steps from the run's start."""

    def __init__(self, learner, encode_text, features, labels, logit_scale, orders, lrs, momentum: float,
                 weight_decay: float, autocast_dtype=None, loss_backend: str | None = None):
        self.learner, self.encode_text = learner, encode_text
        self.features, self.labels, self.logit_scale = features, labels, logit_scale  # n × D, n, scalar
        epochs, self.steps, self.batch_size = orders.shape
        self.orders, self.lrs = orders.reshape(epochs * self.steps, self.batch_size), lrs
        self.momentum, self.weight_decay, self.autocast_dtype = momentum, weight_decay, autocast_dtype
        self.loss_backend = loss_backend  # None: fastcoop.backends' choice for the device
        device = labels.device
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.momentum_buffer = torch.zeros_like(learner.ctx)
        self.loss_sums = torch.zeros(epochs, device=device)  # per epoch
        self.correct = torch.zeros(epochs, dtype=torch.long, device=device)
        self.epoch_finite = torch.ones(epochs, dtype=torch.bool, device=device)
        self.all_finite = torch.ones((), dtype=torch.bool, device=device)
        self.good_ctx = learner.ctx.detach().clone()  # the context after the last epoch of a finite run so far

    def load_view(self, features: torch.Tensor) -> None:
        """The epoch's view of the features (n × D, on the host or the device, any float dtype) into the static
        buffer; from pinned host memory the transfer does not wait for the host."""
        self.features.copy_(features.to(self.features.device, non_blocking=True))

    def __call__(self) -> None:
        epoch = torch.div(self.step, self.steps, rounding_mode="floor")
        rows = self.orders.index_select(0, self.step).view(-1)
        labels = self.labels[rows]
        device_type = self.labels.device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None, cache_enabled=False):
            text = self.encode_text()
        loss, predicted = cosine_ce(self.features[rows], text, self.logit_scale, labels, return_argmax=True,
                                    backend=self.loss_backend)
        grad, = torch.autograd.grad(loss, self.learner.ctx)
        with torch.no_grad():
            sgd_update_(self.learner.ctx, grad, self.momentum_buffer, self.lrs.index_select(0, epoch),
                        self.momentum, self.weight_decay)
            self.loss_sums.index_add_(0, epoch, loss.detach().view(1))
            self.correct.index_add_(0, epoch, (predicted == labels).sum().view(1))
            self.step.add_(1)

    def end_epoch(self, epoch: int) -> None:
        """After an epoch's steps, on the device: the epoch is good if its loss and the context after it are finite
        (the last update can overflow); while every epoch has been good, its context is the last good one."""
        with torch.no_grad():
            finite = torch.isfinite(self.loss_sums[epoch]) & torch.isfinite(self.learner.ctx).all()
            self.epoch_finite[epoch] = finite
            self.all_finite &= finite
            self.good_ctx.copy_(torch.where(self.all_finite, self.learner.ctx, self.good_ctx))

    def state(self) -> list[torch.Tensor]:
        """Every tensor a step writes (to undo the warm-up steps run before capture)."""
        return [self.learner.ctx.data, self.momentum_buffer, self.loss_sums, self.correct, self.step]


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
