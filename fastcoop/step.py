"""The CoOp training step as device work only, so that a whole step can be captured once in a CUDA graph.

The batch is gathered on the device from a per-epoch permutation, a step counter and the epoch's view of every
image's features (copied into one static buffer at the epoch's start), the learning rate is read
from a device tensor, and SGD (momentum, weight decay) is written out as three tensor ops: nothing in a step
depends on the host, and replaying the graph `steps` times per epoch is the whole training loop.
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
    """One step on static device tensors: gather batch → text features → fused loss → gradient → SGD update."""

    def __init__(self, learner, encode_text, features, labels, logit_scale, batch_size: int, steps: int,
                 momentum: float, weight_decay: float, autocast_dtype=None):
        self.learner, self.encode_text = learner, encode_text
        self.features, self.labels, self.logit_scale = features, labels, logit_scale  # n × D, n, scalar
        self.batch_size, self.steps = batch_size, steps
        self.momentum, self.weight_decay, self.autocast_dtype = momentum, weight_decay, autocast_dtype
        device = labels.device
        self.order = torch.zeros(steps, batch_size, dtype=torch.long, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.lr = torch.zeros((), device=device)
        self.momentum_buffer = torch.zeros_like(learner.ctx)
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)

    def start_epoch(self, order: torch.Tensor, features: torch.Tensor, lr: float) -> None:
        """Load an epoch's permutation (cut to whole batches), its view of the features (n × D, any device or
        dtype) and learning rate into the static tensors."""
        self.order.copy_(order[:self.steps * self.batch_size].view(self.steps, self.batch_size))
        self.features.copy_(features, non_blocking=True)
        self.lr.fill_(lr)
        self.step.zero_()
        self.loss_sum.zero_()
        self.correct.zero_()

    def __call__(self) -> None:
        rows = self.order.index_select(0, self.step).view(-1)
        labels = self.labels[rows]
        device_type = self.labels.device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None, cache_enabled=False):
            text = self.encode_text()
        loss, predicted = cosine_ce(self.features[rows], text, self.logit_scale, labels,
                                    return_argmax=True)
        grad, = torch.autograd.grad(loss, self.learner.ctx)
        with torch.no_grad():
            sgd_update_(self.learner.ctx, grad, self.momentum_buffer, self.lr, self.momentum, self.weight_decay)
            self.loss_sum.add_(loss.detach())
            self.correct.add_((predicted == labels).sum())
            self.step.add_(1)

    def state(self) -> list[torch.Tensor]:
        """Every tensor a step writes (to undo the warm-up steps run before capture)."""
        return [self.learner.ctx.data, self.momentum_buffer, self.loss_sum, self.correct, self.step]


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
        try:  # every warm-up run and the capture start at the epoch's first batch
            self.graph = capture_graph(step, warmup, reset=step.step.zero_)
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
