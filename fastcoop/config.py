"""TrainConfig: every option of a CoOp run, defaulting to the published recipe. Kept apart from the training loop
so that reading a run (evaluation, prediction, reports) does not import it."""

from dataclasses import dataclass


@dataclass
class TrainConfig:
    """Every option of a run; the defaults are the published recipe."""

    shots: int | None = 16  # None: the whole cached train split
    seed: int = 1
    classes: str = "all"  # or base / new: the base-to-new protocol's halves (sampled first, then kept, relabelled)
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
    fused_mlp: bool = False  # the MLP with its activation inside Triton matrix products (opt-in)
    attention: str = "auto"  # fast path attention: grid, triton, flex; auto: triton on GPU, grid on CPU
    # which implementation each of these picks: fastcoop.backends.resolve
