"""Which implementation runs each op: decided once per run, here, from the device, the model, what is installed
and the user's request (--impl, --impl-detail).

Every op has a plain-PyTorch reference and a faster implementation; the Triton kernels run on a CUDA GPU, or on
the CPU under TRITON_INTERPRET=1 (how the tests run them):
    loss        cosine_ce: "triton" | "reference"
    attention   the packed prefix attention of the fast text path: "triton" | "grid" (the reference) | "flex"
    add_norm    each residual add with the layer norm after it: "triton" | "reference"
    activation  QuickGELU (OpenAI's weights): "triton" | "reference" (exact-GELU towers run PyTorch's)
    mlp         the MLP with its activation inside the matrix products: "triton" | "reference" (opt-in)
    text        the text computation: "fast" (packed, exact) | "reference" (the published 77-token one; its ops
                are the tower's own modules, recorded as the references)
    step        the training step: "graph" (captured once, replayed; CUDA only) | "eager"
    eval_dtype  CoCoOp's evaluation, whose text work grows with the test set: "bf16" (GPU) | "fp32"
A Backends record is frozen; a run stores it in config.json and `fastcoop train --verbose` prints it. What it
names is what runs: a kernel that cannot serve this model's modules is decided against here, never per call, and
a step whose capture fails is recorded as eager.
"""

import warnings
from dataclasses import dataclass, fields, replace

import torch
from open_clip.transformer import QuickGELU

from fastcoop.config import IMPL_CHOICES
from fastcoop.errors import FastCoopError
from fastcoop.kernels import triton_runs_on

try:
    from fastcoop.kernels import add_layer_norm_kernel, mlp_kernel
except ImportError:  # no Triton on this platform: no kernel is chosen
    add_layer_norm_kernel = mlp_kernel = None

ENCODER_OPS = ("attention", "add_norm", "activation", "mlp")  # the fast text path's own ops


@dataclass(frozen=True)
class Backends:
    loss: str = "reference"
    attention: str = "grid"
    add_norm: str = "reference"
    activation: str = "reference"
    mlp: str = "reference"
    text: str = "fast"
    step: str = "eager"
    eval_dtype: str = "fp32"

    def describe(self) -> str:
        return ", ".join(f"{op} {choice}" for op, choice in vars(self).items())


REFERENCE = Backends(**{f.name: IMPL_CHOICES[f.name][0] for f in fields(Backends)})


def resolve(device: str | torch.device, impl: str = "fast", detail: tuple[tuple[str, str], ...] = (),
            tower=None) -> Backends:
    """The implementations for a run on `device`: `impl` "reference" runs every op's reference (the published text
    computation, eagerly); "fast" each op's fastest exact implementation there — on a GPU every kernel but the
    opt-in MLP, the fast text path and a CUDA graph; on the CPU the references but the loss kernel under the
    Triton interpreter (elsewhere it would only be slow). `detail`: (op, choice) pairs over that; a choice that
    cannot run here is an error naming it. `tower` (a TextTower): checked for what the fast path and the kernels
    cannot run exactly, which then run their references."""
    on_gpu = torch.device(device).type == "cuda"
    triton = triton_runs_on(device)
    if impl == "reference":
        chosen = REFERENCE
    elif impl == "fast":
        kernel = "triton" if on_gpu and triton else "reference"
        chosen = Backends(loss="triton" if triton else "reference", attention="triton" if on_gpu and triton else "grid",
                          add_norm=kernel, activation=kernel, step="graph" if on_gpu else "eager",
                          eval_dtype="bf16" if on_gpu else "fp32")
    else:
        raise FastCoopError(f"--impl takes fast or reference, not '{impl}'")
    asked = dict(detail)
    for op, choice in asked.items():
        _check_runs(op, choice, on_gpu, triton)
    chosen = replace(chosen, **asked)
    unfit = unfit_for(tower, chosen) if tower is not None else {}
    for op, why in unfit.items():
        if op in asked:
            raise FastCoopError(f"--impl-detail {op}={asked[op]} cannot run this model: {why}")
    if "text" in unfit:
        warnings.warn(f"{unfit['text']}: using the reference path")
    chosen = replace(chosen, **{op: IMPL_CHOICES[op][0] for op in unfit})
    if chosen.text == "reference":  # the tower's own modules run: the fast path's ops are not used
        kernels = [op for op in ENCODER_OPS if op in asked and asked[op] != IMPL_CHOICES[op][0]]
        if kernels:
            raise FastCoopError(f"--impl-detail {kernels[0]}={asked[kernels[0]]} runs on the fast text path only; "
                                "the reference text path runs the model's own modules")
        chosen = replace(chosen, **{op: IMPL_CHOICES[op][0] for op in ENCODER_OPS})
    return chosen


def _check_runs(op: str, choice: str, on_gpu: bool, triton: bool) -> None:
    if choice == "triton" and not triton:
        raise FastCoopError(f"--impl-detail {op}=triton needs a GPU with Triton")
    if choice == "flex" and not on_gpu:
        raise FastCoopError("--impl-detail attention=flex trains on GPU only (FlexAttention has no CPU backward)")
    if choice in ("graph", "bf16") and not on_gpu:
        raise FastCoopError(f"--impl-detail {op}={choice} needs a CUDA GPU")


def unfit_for(tower, chosen: Backends) -> dict[str, str]:
    """The ops `chosen` names a faster implementation for that cannot run `tower` exactly, and why (resolve decides
    against them; FastTextEncoder refuses a record that names them)."""
    problem = tower.fast_path_problem()
    if chosen.text == "fast" and problem:
        return {"text": f"the fast text path is not exact for it ({problem})"}
    unfit = {}
    blocks = list(tower.blocks)
    norms = [norm for block in blocks for norm in (block.ln_1, block.ln_2)] + [tower.ln_final]
    if chosen.add_norm == "triton" and not all(add_layer_norm_kernel.supports(norm) for norm in norms):
        unfit["add_norm"] = "its layer norms are not plain frozen ones with a bias"
    if chosen.mlp == "triton" and not all(mlp_kernel.supports(block.mlp) for block in blocks):
        unfit["mlp"] = "its MLPs are not open_clip's plain GELU/QuickGELU MLP with frozen weights of one dtype"
    if chosen.activation == "triton" and not all(type(block.mlp.gelu) is QuickGELU for block in blocks):
        unfit["activation"] = "its activation is not QuickGELU (PyTorch's GELU runs as it is)"
    return unfit
