"""The training step as device work only, so that a whole step can be captured once in a CUDA graph; it trains a
stack of runs at once (one run is a stack of one). The loss is the method's part (fastcoop.methods); the step
updates every tensor the learners train.

The whole schedule lives on the device: every run's batch orders (its steps × batch rows) and learning rates are
tables indexed by the run's own step counter, each step adds each run's loss and hits into the slot of that run's
epoch, and the method's optimizer (SGD, Adam) is PyTorch's fused update. Nothing in a step depends on the host: the
training loop is replays of the graph, a copy of a run's feature view when its epoch begins, and a look at the
results now and then.
"""

import time
import warnings

import torch
from torch.optim.adam import adam
from torch.optim.sgd import sgd

from fastcoop.kernels import compiling_in_parallel


def sgd_update_(params, grads, momentum_buffers, lr: torch.Tensor, momentum: float, weight_decay: float) -> None:
    """torch.optim.SGD's update (dampening 0, not Nesterov) of every tensor in one launch: PyTorch's fused SGD,
    with lr a one-element device tensor.  d = g + wd·p;  buf = momentum·buf + d;  p −= lr·buf. The buffers start
    at 0, so the first step gives buf = d, as SGD's first step does."""
    sgd(params, grads, momentum_buffers, fused=True, lr=lr, momentum=momentum, weight_decay=weight_decay,
        dampening=0.0, nesterov=False, maximize=False)


class SGD:
    """A method's optimizer for TrainStep: torch.optim.SGD's update (sgd_update_), its state each tensor's
    momentum buffer."""

    state_names = ("momentum",)

    def __init__(self, momentum: float, weight_decay: float):
        self.momentum, self.weight_decay = momentum, weight_decay

    def new_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"momentum": torch.zeros_like(param)}

    def describe(self, lr: float) -> str:
        return f"SGD {lr:g}"

    def update_(self, params, grads, state: dict[str, list[torch.Tensor]], lr: torch.Tensor, learner=None) -> None:
        sgd_update_(params, grads, state["momentum"], lr, self.momentum, self.weight_decay)


class Adam:
    """torch.optim.Adam's update (weight decay added to the gradient, as Dassl builds it; no AMSGrad) of every
    tensor in one launch: PyTorch's fused Adam, with lr a one-element device tensor and each tensor's step count
    a device tensor, so that it runs inside a CUDA graph."""

    state_names = ("exp_avg", "exp_avg_sq", "step")

    def __init__(self, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.weight_decay, self.betas, self.eps = weight_decay, betas, eps

    def new_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param),
                "step": torch.zeros((), device=param.device)}

    def describe(self, lr: float) -> str:
        return f"Adam {lr:g}"

    def update_(self, params, grads, state: dict[str, list[torch.Tensor]], lr: torch.Tensor, learner=None) -> None:
        adam(params, grads, state["exp_avg"], state["exp_avg_sq"], [], state["step"], fused=True, amsgrad=False,
             beta1=self.betas[0], beta2=self.betas[1], lr=lr, weight_decay=self.weight_decay, eps=self.eps,
             maximize=False)


class TrainStep:
    """One step of stacked runs on static device tensors: gather each run's batch → the runs' losses (`loss`,
    the method's: the runs' learners, their R × B × D images, R × B labels and batch sizes (run r's
    first B_r rows; the rest padding) → each run's loss and hits, R each) → gradients → each run's SGD update of
    every tensor its learner trains.

    Each run of a stack has its own images, schedule (epochs, steps per epoch, batch size), order, parameters
    (CoOp's may differ in their prompt layout: context length, class position, class-specific) and learning rates,
    and its own step counter, so runs of different shot counts or variants, or resumed after different epochs,
    train side by side and each ends exactly where it would alone. The step
    trains the `active` runs (set_active; all at first): a run whose schedule is over leaves the stack, and the
    caller captures the step again.

    `features`: the static R × n × D buffer holding the current epoch's view of each run's images (n: the most
    images of any run); `labels`: R × n; `orders`: each run's epochs × steps × batch rows (a list, or one
    R × epochs × steps × batch tensor when they share a shape); `lrs`: each run's per-epoch learning rates;
    `optimizer`: the method's (SGD, Adam), its state per learned tensor."""

    def __init__(self, learners, loss, features, labels, orders, lrs, optimizer):
        self.learners, self.loss = list(learners), loss
        self.features, self.labels = features, labels
        self.optimizer = optimizer
        # the gradients the update takes: a method's own (ProGrad's projected ones), else the losses'
        self.gradients = getattr(loss, "gradients", None) or self.loss_gradients
        device = labels.device
        runs, n = labels.shape
        self.epochs = [len(order) for order in orders]
        self.steps_per_epoch = [order.shape[1] for order in orders]
        self.batch_sizes = [order.shape[2] for order in orders]
        # Per-step tables of every run, flattened: run r's step t is entry r·longest + t. Each holds the step's rows
        # of the flattened R·n features, its (run, epoch) slot in the R × epochs metrics, and its learning rate.
        longest = max(e * s for e, s in zip(self.epochs, self.steps_per_epoch))
        self.step_rows = torch.zeros(runs, longest, max(self.batch_sizes), dtype=torch.long)
        self.step_slot = torch.zeros(runs, longest, dtype=torch.long)
        self.step_lr = torch.zeros(runs, longest)
        for run, (order, run_lrs) in enumerate(zip(orders, lrs)):
            steps = len(order) * order.shape[1]
            self.step_rows[run, :steps, :order.shape[2]] = order.reshape(steps, -1).cpu() + run * n
            epoch = torch.arange(steps) // order.shape[1]
            self.step_slot[run, :steps] = run * max(self.epochs) + epoch
            self.step_lr[run, :steps] = torch.as_tensor(run_lrs).cpu().float()[epoch]
        self.step_rows, self.step_slot, self.step_lr = (table.flatten(0, 1).to(device) for table in
                                                        (self.step_rows, self.step_slot, self.step_lr))
        self.position = torch.arange(runs, device=device) * longest  # each run's next entry in the tables
        self.loss_seed = torch.ones(runs, device=device)  # d(loss)/d(loss) of each run, made once
        self.params = [list(learner.trainable().values()) for learner in self.learners]
        self.optimizer_state = [self._new_state(params) for params in self.params]  # per run: name → per tensor
        self.loss_sums = torch.zeros(runs, max(self.epochs), device=device)  # per run and epoch
        self.correct = torch.zeros(runs, max(self.epochs), dtype=torch.long, device=device)
        self.epoch_finite = torch.ones(runs, max(self.epochs), dtype=torch.bool, device=device)
        self.all_finite = torch.ones(runs, dtype=torch.bool, device=device)
        # each run at the end of its last epoch: its parameters (while all its epochs were finite) and optimizer state
        self.good_params = [[p.detach().clone() for p in params] for params in self.params]
        self.epoch_end_state = [self._new_state(params) for params in self.params]
        self.active = []
        self.set_active(range(runs))

    def _new_state(self, params) -> dict[str, list[torch.Tensor]]:
        states = [self.optimizer.new_state(p) for p in params]
        return {name: [state[name] for state in states] for name in self.optimizer.state_names}

    def set_active(self, runs) -> None:
        """Train only `runs` (indices into the stack) from now on; their positions are the step's own tensor."""
        if self.active:
            self.position.index_copy_(0, self.active_index, self.active_position)
        self.active = list(runs)
        self.active_index = torch.tensor(self.active, dtype=torch.long, device=self.labels.device)
        self.active_position = self.position.index_select(0, self.active_index)

    def start_at_epoch(self, run: int, epoch: int, steps_into_epoch: int = 0) -> None:
        """Make `run` (active) train from step `steps_into_epoch` of `epoch` (a resumed run)."""
        longest = len(self.step_rows) // len(self.labels)
        self.active_position[self.active.index(run)] = (run * longest + epoch * self.steps_per_epoch[run]
                                                        + steps_into_epoch)

    def load_view(self, run: int, features: torch.Tensor) -> None:
        """A run's view of its images for this epoch (n_run × D, on the host or the device, any float dtype) into
        the static buffer; from pinned host memory the transfer does not wait for the host."""
        self.features[run, :len(features)].copy_(features.to(self.features.device, non_blocking=True))

    def __call__(self) -> None:
        rows = self.step_rows.index_select(0, self.active_position)  # active runs × largest batch
        images = self.features.flatten(0, 1).index_select(0, rows.flatten()).view(*rows.shape, -1)
        labels = self.labels.flatten().index_select(0, rows.flatten()).view(rows.shape)
        sizes = [self.batch_sizes[run] for run in self.active]  # each run's batch: its first rows
        losses, hits = self.loss([self.learners[run] for run in self.active], images, labels, sizes)
        params = [p for run in self.active for p in self.params[run]]
        grads = iter(self.gradients(losses, params, self.loss_seed[:len(self.active)]))
        with torch.no_grad():
            lrs = self.step_lr.index_select(0, self.active_position)
            for i, run in enumerate(self.active):
                self.optimizer.update_(self.params[run], [next(grads) for _ in self.params[run]],
                                       self.optimizer_state[run], lrs[i:i + 1], self.learners[run])
            slots = self.step_slot.index_select(0, self.active_position)
            self.loss_sums.view(-1).index_add_(0, slots, losses.detach())
            self.correct.view(-1).index_add_(0, slots, hits)
            self.active_position.add_(1)

    @staticmethod
    def loss_gradients(losses, params, seed) -> tuple[torch.Tensor, ...]:
        """The runs' losses' gradients, in one pass: each run's loss reaches only its own run's parameters."""
        return torch.autograd.grad(losses, params, grad_outputs=seed)

    def end_epoch(self, run: int, epoch: int) -> None:
        """After a run's epoch, on the device: the epoch is good if its loss and the parameters after it are
        finite (the last update can overflow); while all its epochs have been good, its parameters are the last
        good ones. The optimizer's state is kept as it is here, for a checkpoint at this epoch's end."""
        with torch.no_grad():
            finite = torch.isfinite(self.loss_sums[run, epoch])
            for param in self.params[run]:
                finite = finite & torch.isfinite(param).all()
            self.epoch_finite[run, epoch] = finite
            self.all_finite[run] &= finite
            for param, good in zip(self.params[run], self.good_params[run]):
                good.copy_(torch.where(self.all_finite[run], param, good))
            for name in self.optimizer.state_names:
                for now, kept in zip(self.optimizer_state[run][name], self.epoch_end_state[run][name]):
                    kept.copy_(now)

    def state_dict(self, run: int) -> dict:
        """A run's state (copies): its learned tensors and the optimizer's state of each now, both as they were at
        the end of its last epoch (the tensors: the last good ones), by the learner's names (the optimizer's state:
        its name → tensor name → tensor); its loss sums and hits per epoch."""
        names = list(self.learners[run].trainable())

        def named(tensors):
            return {name: tensor.detach().clone() for name, tensor in zip(names, tensors)}

        return {"params": named(self.params[run]), "epoch_params": named(self.good_params[run]),
                "optimizer": {key: named(tensors) for key, tensors in self.optimizer_state[run].items()},
                "epoch_optimizer": {key: named(tensors) for key, tensors in self.epoch_end_state[run].items()},
                "loss_sums": self.loss_sums[run].clone(), "correct": self.correct[run].clone()}

    def load_state_dict(self, run: int, state: dict) -> None:
        """Load what `state` holds of a run's state (state_dict's parts) into the run."""
        names = list(self.learners[run].trainable())
        parts = [(state["params"], self.params[run]), (state["epoch_params"], self.good_params[run])]
        for key in self.optimizer.state_names:
            parts += [(state["optimizer"][key], self.optimizer_state[run][key]),
                      (state["epoch_optimizer"][key], self.epoch_end_state[run][key])]
        with torch.no_grad():
            for values, tensors in parts:
                for name, tensor in zip(names, tensors):
                    tensor.copy_(values[name])
            self.loss_sums[run].copy_(state["loss_sums"])
            self.correct[run].copy_(state["correct"])

    def state(self) -> list[torch.Tensor]:
        """Every tensor a step writes (to undo the warm-up steps run before capture)."""
        return [*(p.data for run in self.active for p in self.params[run]),
                *(t for run in self.active for tensors in self.optimizer_state[run].values() for t in tensors),
                self.loss_sums, self.correct, self.active_position]


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
        first_position = step.active_position.clone()
        start = time.perf_counter()
        try:
            with compiling_in_parallel(step.labels.device):  # the step's launches only compile, in parallel
                step()
            torch.cuda.synchronize()
            compiled = time.perf_counter()
            # every warm-up run and the capture start at the same batch
            self.graph = capture_graph(step, warmup, reset=lambda: step.active_position.copy_(first_position))
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
