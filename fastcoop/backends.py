"""Which implementation runs each op: decided once, here, from the device, what is installed and the user's options.

Every op has a plain-PyTorch reference and a fused Triton kernel, which runs on a CUDA GPU, or on the CPU under
TRITON_INTERPRET=1 (how the tests run it):
    loss        cosine_ce: "triton" | "reference"
    attention   the packed prefix attention of the fast text path: "triton" | "grid" (the reference) | "flex"
    add_norm    each residual add with the layer norm after it: "triton" | "reference"
    activation  QuickGELU (OpenAI's weights): "triton" | "reference" (exact-GELU towers run PyTorch's)
    mlp         the MLP with its activation inside the matrix products: "triton" | "reference"
    text        the text computation: "fast" (packed, exact) | "reference" (the published 77-token one), which a
                tower the fast path cannot run exactly gets whatever was asked
    step        the training step: "graph" (captured once, replayed; CUDA only) | "eager"
A Backends record is frozen; a run stores it in config.json and `fastcoop train --verbose` prints it; a step whose
capture fails runs eagerly and its record says so.
"""

from dataclasses import dataclass

import torch

from fastcoop.errors import FastCoopError
from fastcoop.kernels import triton_runs_on


@dataclass(frozen=True)
class Backends:
    loss: str = "reference"
    attention: str = "grid"
    add_norm: str = "reference"
    activation: str = "reference"
    mlp: str = "reference"
    text: str = "fast"
    step: str = "eager"

    def describe(self) -> str:
        return ", ".join(f"{op} {choice}" for op, choice in vars(self).items())


def loss_backend(device: str | torch.device) -> str:
    """cosine_ce's implementation for tensors on `device`: the kernel wherever Triton runs."""
    return "triton" if triton_runs_on(device) else "reference"


def resolve(device: str | torch.device, attention: str = "auto", fused: bool = True,
            fused_mlp: bool = False, text_path: str = "fast", graph: bool = True, tower=None) -> Backends:
    """The implementations for a run on `device`.

    attention: auto (the Triton kernel on a GPU, the grid reference elsewhere), grid, triton or flex (GPU only:
    FlexAttention has no CPU backward). fused: the fused add + norm and activation kernels on a GPU (on the CPU
    the interpreter would only be slow); False: PyTorch's ops. fused_mlp: the MLP kernel (opt-in). text_path:
    fast or reference; `tower` (a TextTower), when given, is checked for what the fast path cannot run. graph:
    capture the step where CUDA graphs exist."""
    on_gpu = torch.device(device).type == "cuda"
    triton = triton_runs_on(device)
    if attention == "auto":
        attention = "triton" if on_gpu and triton else "grid"
    elif attention == "triton" and not triton:
        raise FastCoopError("--attention triton needs a GPU with Triton; use grid")
    elif attention == "flex" and not on_gpu:
        raise FastCoopError("--attention flex trains on GPU only (FlexAttention has no CPU backward); use grid")
    elif attention not in ("grid", "triton", "flex"):
        raise FastCoopError(f"unknown attention '{attention}': use auto, grid, triton or flex")
    if fused_mlp and not triton:
        raise FastCoopError("--fused-mlp needs a GPU with Triton")
    elementwise = "triton" if fused and on_gpu and triton else "reference"
    text = "reference" if text_path == "reference" or (tower is not None and tower.fast_path_problem()) else "fast"
    return Backends(loss=loss_backend(device), attention=attention, add_norm=elementwise, activation=elementwise,
                    mlp="triton" if fused_mlp else "reference", text=text,
                    step="graph" if graph and on_gpu else "eager")
