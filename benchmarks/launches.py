"""What a step asks the device to do, counted from the calls themselves: every PyTorch operator that computes or
writes (each launches one GPU kernel or more) and every Triton kernel launch. It needs no GPU: on the CPU the
step's Triton kernels run under TRITON_INTERPRET=1 and the same calls are made in the same order, so the count
tracks the graphed step's kernel count where torch.profiler cannot run. Views and uninitialised allocations
launch nothing and are not counted; an operator that launches several kernels on a GPU counts once (the GPU
profile, benchmarks/profile.py, counts kernels).

    python -m benchmarks.launches --model ViT-B-16 --classes 100   (on the CPU: with TRITON_INTERPRET=1)
    python -m benchmarks.launches --model ViT-B-16 --classes 10 --runs 15   (a protocol's stacked step)
"""

import argparse
import json
import logging
import os
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import real_classnames
from fastcoop.backends import Backends, resolve
from fastcoop.kernels import INTERPRET
from fastcoop.models import load_model
from fastcoop.prompts import PromptLearner
from fastcoop.methods.coop import CoOpLoss
from fastcoop.step import SGD, TrainStep
from fastcoop.text_encoder import FastTextEncoder
from fastcoop.text_tower import TextTower

# allocations without a fill: no kernel
_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}


def _is_view(func) -> bool:
    """An operator whose every result aliases an input without writing it (view, select, expand, ...)."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class _DeviceOps(TorchDispatchMode):
    def __init__(self, counts: Counter, inside_triton: list):
        super().__init__()
        self.counts, self.inside_triton = counts, inside_triton

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.inside_triton[0] and name not in _ALLOCATIONS and not _is_view(func):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _triton_launches(on_launch, inside_triton: list, compiles: bool = False):
    """Calls on_launch(kernel, args, kwargs) at each Triton launch (compiled or interpreted), or with compiles at
    each compile-only call (warmup=True) instead; what the interpreter does with torch while it runs a kernel is
    the kernel's own work, not more launches."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:  # no Triton: nothing of it to see
        yield
        return
    originals = {cls: cls.run for cls in (InterpretedFunction, JITFunction)}

    def seen(run):
        def launch(self, *args, **kwargs):
            if bool(kwargs.get("warmup")) != compiles:
                return run(self, *args, **kwargs)
            on_launch(self, args, kwargs)
            inside_triton[0] += 1
            try:
                return run(self, *args, **kwargs)
            finally:
                inside_triton[0] -= 1
        return launch
    for cls, run in originals.items():
        cls.run = seen(run)
    try:
        yield
    finally:
        for cls, run in originals.items():
            cls.run = run


def device_ops(fn) -> Counter:
    """Operator name → calls made by one call of fn (Triton kernels as 'triton <name>')."""
    counts, inside_triton = Counter(), [0]

    def count(kernel, args, kwargs):
        counts[f"triton {kernel.fn.__name__}"] += 1
    with _triton_launches(count, inside_triton), _DeviceOps(counts, inside_triton):
        fn()
    return counts


def compile_requests(fn) -> Counter:
    """Kernel name → compile-only calls (launches with warmup=True, as inside compiling_in_parallel) fn makes."""
    requests = Counter()

    def count(kernel, args, kwargs):
        requests[kernel.fn.__name__] += 1
    with _triton_launches(count, [0], compiles=True):
        fn()
    return requests


def triton_variants(fn) -> set:
    """The compiled kernels fn's Triton launches need on a Hopper GPU: each launch's key in Triton's kernel cache
    (the kernel, its arguments' types and specialisations, its options), computed without a GPU and whether or not
    the launch is interpreted. Pointers' alignment is left out: the GPU's allocator aligns every tensor to more
    than the 16 bytes Triton specialises on, the CPU's need not."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend, binders, variants = make_backend(GPUTarget("cuda", 90, 32)), {}, set()

    def key(kernel, args, kwargs):
        if kernel.fn not in binders:  # an interpreted kernel keeps triton.jit's arguments: the GPU's kernel from them
            jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)
            binders[kernel.fn] = create_function_from_signature(jit.signature, jit.params, backend)
        launch_options = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        _, specialization, options = binders[kernel.fn](*args, **launch_options)
        kinds = tuple(s[:1] if str(s[0]).startswith("*") else s for s in specialization)
        variants.add((kernel.fn.__name__, kinds, str(options)))
    with _triton_launches(key, [0]):
        fn()
    return variants


def gpu_backends(model) -> Backends:
    """What a GPU step runs for `model`'s tower (choosing needs no GPU)."""
    return resolve("cuda", tower=TextTower.of(model))


def step_device_ops(model_name: str, classes: int, device: str, n_ctx: int = 16) -> Counter:
    """The device operations of one eager training step as a GPU runs it (bf16 weights under autocast, the Triton
    kernels), with real class names; on the CPU the kernels are interpreted (TRITON_INTERPRET=1). The step is
    called as the GPU profile calls it, after the benchmark's reset of its step counter (one fill)."""
    from benchmarks.step import step_variants

    torch.manual_seed(0)
    loaded = load_model(model_name, "none", device)
    step = step_variants(loaded, real_classnames(classes), device, n_ctx=n_ctx, precision=torch.bfloat16,
                         graph=False, backends=gpu_backends(loaded.model))["fastcoop_eager"]
    step()  # the first call may do one-off work (casts, compiles)
    return device_ops(step)


def stacked_step_device_ops(model_name: str, classes: int, runs: int, device: str, n_ctx: int = 16) -> Counter:
    """step_device_ops for `runs` runs of one prompt layout stacked in one step (the protocol's shape: each its own
    batch of 32, loss, metrics and update)."""
    torch.manual_seed(0)
    loaded = load_model(model_name, "none", device)
    model, backends = loaded.model, gpu_backends(loaded.model)
    learners = [PromptLearner(model, loaded.tokenizer, real_classnames(classes), n_ctx=n_ctx).to(device)
                for _ in range(runs)]
    encoder = FastTextEncoder(model, learners, backends, weight_dtype=torch.bfloat16)
    loss = CoOpLoss(encoder, model.logit_scale.exp().detach().to(device), torch.bfloat16, backends.loss)
    # one epoch of two steps: the first call (which may do one-off work: casts, compiles) takes the first
    step = TrainStep(learners, loss, torch.randn(runs, 64, model.visual.output_dim, device=device),
                     torch.randint(classes, (runs, 64), device=device),
                     [torch.arange(64, device=device).view(1, 2, 32)] * runs, [torch.full((1,), 0.002)] * runs,
                     SGD(0.9, 5e-4))
    step()
    return device_ops(step)


def interpreted_step_device_ops(model_name: str, classes: int) -> dict:
    """step_device_ops on the CPU, in a process of its own: Triton reads TRITON_INTERPRET when it is imported."""
    command = [sys.executable, "-m", "benchmarks.launches", "--model", model_name, "--classes", str(classes)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"TRITON_INTERPRET": "1"},
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description="Device operations of one GPU-path training step, counted.")
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--runs", type=int, default=1, help="runs stacked in the step (the protocol's: 15)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not INTERPRET:
        parser.error("without a GPU the step's Triton kernels must run interpreted: set TRITON_INTERPRET=1")
    logging.disable(logging.WARNING)
    ops = step_device_ops(args.model, args.classes, device) if args.runs == 1 else \
        stacked_step_device_ops(args.model, args.classes, args.runs, device)
    print(json.dumps({"model": args.model, "classes": args.classes, "runs": args.runs,
                      "device_ops_per_step": sum(ops.values()),
                      "ops": dict(ops.most_common())}))


if __name__ == "__main__":
    main()
