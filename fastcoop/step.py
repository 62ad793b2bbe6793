"""The training step as device work only, so that a whole step can be captured once in a CUDA graph; it trains a
stack of runs at once (one run is a stack of one). The loss is a part: CoOp's here (coop_loss), CoCoOp's in
fastcoop.cocoop (cocoop_loss); the step updates every tensor the learners train.

The whole schedule lives on the device: every epoch's batch order (epochs × steps × batch rows) and learning rate
are tables indexed by a step counter, each step adds its loss and hits into its epoch's slot, and SGD (momentum,
weight decay) is written out as tensor ops. Nothing in a step depends on the host: the training loop is `steps`
replays of the graph per epoch, one copy of the epoch's feature view, and a look at the results now and then.
"""

import time
import warnings

import torch
from torch.optim.sgd import sgd

from fastcoop.kernels import compiling_in_parallel, cosine_ce


def sgd_update_(params, grads, momentum_buffers, lr: torch.Tensor, momentum: float, weight_decay: float) -> None:
    """torch.optim.SGD's update (dampening 0, not Nesterov) of every tensor in one launch: PyTorch's fused SGD,
    with lr a one-element device tensor.  d = g + wd·p;  buf = momentum·buf + d;  p −= lr·buf. The buffers start
    at 0, so the first step gives buf = d, as SGD's first step does."""
    sgd(params, grads, momentum_buffers, fused=True, lr=lr, momentum=momentum, weight_decay=weight_decay,
        dampening=0.0, nesterov=False, maximize=False)


def coop_loss(encode_text, logit_scale, autocast_dtype=None, loss_backend: str | None = None):
    """CoOp's training loss of R stacked runs for TrainStep: the runs' K prompts in one encoder call
    (`encode_text()` → R × K × D), then each run's batch against its own text features with the fused cosine
    cross-entropy. `loss_backend` None: fastcoop.backends' choice for the device."""
    def losses(images: torch.Tensor, labels: torch.Tensor) -> tuple[list, list]:
        with torch.autocast(labels.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None, cache_enabled=False):
            text = encode_text()
        per_run = [cosine_ce(images[run], run_text, logit_scale, labels[run], return_argmax=True,
                             backend=loss_backend) for run, run_text in enumerate(text.unbind())]
        return [loss for loss, _ in per_run], [predicted for _, predicted in per_run]
    return losses


class TrainStep:
    """One step of R stacked runs on static device tensors: gather each run's batch → the runs' losses (`loss`,
    e.g. coop_loss or cocoop_loss: R × B × D images and R × B labels → each run's loss and B predictions) →
    gradients → each run's SGD update of every tensor its learner trains. Runs of a stack share the schedule's
    shape (epochs, steps, batch) and the prompt layout; they differ in data, order, parameters and learning rate.

    `features`: the static R × n × D buffer holding the current epoch's view of each run's images; `labels`:
    R × n; `orders`: R × epochs × steps × batch rows; `lrs`: R × epochs. `step` counts steps from the runs'
    start."""

    def __init__(self, learners, loss, features, labels, orders, lrs, momentum: float, weight_decay: float):
        self.learners, self.loss = list(learners), loss
        self.features, self.labels = features, labels
        runs, epochs, self.steps, self.batch_size = orders.shape
        self.orders, self.lrs = orders.reshape(runs, epochs * self.steps, self.batch_size), lrs
        self.momentum, self.weight_decay = momentum, weight_decay
        device = labels.device
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.loss_seed = torch.ones((), device=device)  # d(loss)/d(loss), made once rather than at every step
        self.params = [list(learner.trainable().values()) for learner in self.learners]
        self.momentum_buffers = [[torch.zeros_like(p) for p in params] for params in self.params]
        self.loss_sums = torch.zeros(runs, epochs, device=device)  # per run and epoch
        self.correct = torch.zeros(runs, epochs, dtype=torch.long, device=device)
        self.epoch_finite = torch.ones(runs, epochs, dtype=torch.bool, device=device)
        self.all_finite = torch.ones(runs, dtype=torch.bool, device=device)
        # each run's parameters after its last epoch of a finite run so far
        self.good_params = [[p.detach().clone() for p in params] for params in self.params]

    def load_view(self, run: int, features: torch.Tensor) -> None:
        """A run's view of its images for this epoch (n × D, on the host or the device, any float dtype) into the
        static buffer; from pinned host memory the transfer does not wait for the host."""
        self.features[run].copy_(features.to(self.features.device, non_blocking=True))

    def __call__(self) -> None:
        epoch = torch.div(self.step, self.steps, rounding_mode="floor")
        rows = self.orders.index_select(1, self.step)[:, 0]  # runs × batch
        images = self.features.gather(1, rows[..., None].expand(-1, -1, self.features.shape[-1]))
        labels = self.labels.gather(1, rows)
        losses, predicted = self.loss(images, labels)
        # the runs' losses together: each reaches only its own run's parameters
        grads = iter(torch.autograd.grad(losses, [p for params in self.params for p in params],
                                         grad_outputs=[self.loss_seed] * len(losses)))
        with torch.no_grad():
            for run, params in enumerate(self.params):
                sgd_update_(params, [next(grads) for _ in params], self.momentum_buffers[run],
                            self.lrs[run].index_select(0, epoch), self.momentum, self.weight_decay)
                self.loss_sums[run].index_add_(0, epoch, losses[run].detach().view(1))
                self.correct[run].index_add_(0, epoch, (predicted[run] == labels[run]).sum().view(1))
            self.step.add_(1)

    def end_epoch(self, epoch: int) -> None:
        """After an epoch's steps, on the device: a run's epoch is good if its loss and its parameters after it
        are finite (the last update can overflow); while all its epochs have been good, its parameters are the
        last good ones."""
        with torch.no_grad():
            for run, params in enumerate(self.params):
                finite = torch.isfinite(self.loss_sums[run, epoch])
                for param in params:
                    finite = finite & torch.isfinite(param).all()
                self.epoch_finite[run, epoch] = finite
                self.all_finite[run] &= finite
                for param, good in zip(params, self.good_params[run]):
                    good.copy_(torch.where(self.all_finite[run], param, good))

    def state(self) -> list[torch.Tensor]:
        """Every tensor a step writes (to undo the warm-up steps run before capture)."""
        return [*(p.data for params in self.params for p in params),
                *(b for buffers in self.momentum_buffers for b in buffers), self.loss_sums, self.correct, self.step]


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
    """Captures a TrainStep once (after its kernels are compiled side by side and a warm-up, then undone) and
    replays it. `kernels_seconds`: compiling the step's Triton kernels (finding them, when Triton's cache holds
    them); `capture_seconds`: the warm-up steps and the capture, the kernels' loading onto the GPU included."""

    def __init__(self, step: TrainStep, warmup: int = 3):
        self.step = step
        saved = [t.clone() for t in step.state()]
        first_step = step.step.clone()
        start = time.perf_counter()
        try:
            with compiling_in_parallel(step.labels.device):  # the step's launches only compile, in parallel
                step()
            torch.cuda.synchronize()
            compiled = time.perf_counter()
            # every warm-up run and the capture start at the same batch
            self.graph = capture_graph(step, warmup, reset=lambda: step.step.copy_(first_step))
        finally:  # capture records without running; undo the warm-up steps (also when capture fails)
            for tensor, value in zip(step.state(), saved):
                tensor.copy_(value)
        torch.cuda.synchronize()
        self.kernels_seconds, self.capture_seconds = compiled - start, time.perf_counter() - compiled

    def __call__(self) -> None:
        self.graph.replay()


def graphed_or_eager(step: TrainStep):
    """The step captured in a CUDA graph, or, where capture fails, the eager step with a warning."""
    try:
        return CudaGraphStep(step)
    except RuntimeError as exc:
        warnings.warn(f"CUDA graph capture failed ({str(exc).splitlines()[0]}); running the step eagerly")
        return step
