"""TrainConfig: every option of a CoOp, CoCoOp or KgCoOp run, defaulting to the method's published recipe. Kept
apart from the training loop so that reading a run (evaluation, prediction, reports) does not import it."""

from dataclasses import dataclass

from fastcoop.errors import FastCoopError

METHODS = ("coop", "cocoop", "kgcoop")
METHOD_NAMES = {"coop": "CoOp", "cocoop": "CoCoOp", "kgcoop": "KgCoOp"}  # as the papers and tables write them
# CoCoOp's published recipe where it differs from CoOp's (configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1):
# M = 4 from "a photo of a", batch size 1, 10 epochs whatever the shot count
COCOOP_RECIPE = {"n_ctx": 4, "init": "a photo of a", "batch_size": 1, "epochs": 10}
COOP_RECIPE = {"n_ctx": 16, "init": None, "batch_size": 32, "epochs": None}  # epochs None: by shot count
# KgCoOp's (configs/trainers/KgCoOp/vit_b16_ep100_ctxv1, scripts/base2new_train.sh): M = 4 from "a photo of a",
# batch size 128, 100 epochs, λ = 8; CoOp's SGD and schedule
KGCOOP_RECIPE = {"n_ctx": 4, "init": "a photo of a", "batch_size": 128, "epochs": 100, "kg_weight": 8.0}
RECIPES = {"coop": COOP_RECIPE, "cocoop": COCOOP_RECIPE, "kgcoop": KGCOOP_RECIPE}
# How a run is computed rather than what it computes: implementations of the same math (equal up to float rounding,
# graph or not bit for bit). An interrupted run goes on with other values of these; the device stays part of the
# recipe, since it decides the default precision.
RUNTIME_FIELDS = ("text_path", "graph", "fused", "fused_mlp", "attention")


def recipe(options: dict) -> dict:
    """What defines a run — its identity for resuming it, what its results are grouped by — from its options (a
    TrainConfig as a dict): all but the runtime ones."""
    return {key: value for key, value in options.items() if key not in RUNTIME_FIELDS}


@dataclass
class TrainConfig:
    """Every option of a run; what is left None is the method's published recipe (__post_init__ fills it in)."""

    method: str = "coop"  # or "cocoop": the context shifted per image by a Meta-Net
    shots: int | None = 16  # None: the whole cached train split
    seed: int = 1
    classes: str = "all"  # or base / new: the base-to-new protocol's halves (sampled first, then kept, relabelled)
    n_ctx: int | None = None
    csc: bool = False
    position: str = "end"
    init: str | None = None  # words the context starts from (they set M)
    epochs: int | None = None  # None: the published count (CoOp's by shot count)
    batch_size: int | None = None
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
    kg_weight: float | None = None  # KgCoOp's λ (None: the published 8)
    kg_template: str | None = None  # KgCoOp's hand-written prompt (None: the dataset's, fastcoop.kgcoop)
    # which implementation each of these picks: fastcoop.backends.resolve

    def __post_init__(self):
        if self.method not in METHODS:
            raise FastCoopError(f"method must be one of {', '.join(METHODS)}, not '{self.method}'")
        if self.method == "cocoop" and (self.csc or self.position != "end"):
            raise FastCoopError("CoCoOp learns one context shared by all classes, before the class name: "
                                "--csc and --position are CoOp's options")
        if self.method != "kgcoop" and (self.kg_weight is not None or self.kg_template is not None):
            raise FastCoopError("--kg-weight is KgCoOp's option (--method kgcoop)")
        published = RECIPES[self.method]
        if self.n_ctx is None and self.init is None:  # the published context; a given M starts random, as published
            self.n_ctx, self.init = published["n_ctx"], published["init"]
        if self.method == "kgcoop" and self.kg_weight is None:
            self.kg_weight = published["kg_weight"]
        for name in ("batch_size", "epochs"):  # (given words set M: n_ctx stays None, the learner counts them)
            if getattr(self, name) is None:
                setattr(self, name, published[name])
