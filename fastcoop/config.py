"""A run's Recipe — what it learns: its identity for resuming it, what its results are grouped by — and its
Runtime — where and by which implementations it is computed, which changes nothing beyond float rounding (the
CUDA graph not even that), so an interrupted run may go on under another runtime. Both are frozen; each field's
metadata is its command-line option (help text, choices), declared once here for `train` and `sweep`. Kept apart
from the training loop so that reading a run (evaluation, prediction, reports) does not import it."""

import warnings
from dataclasses import dataclass, field, fields, replace

from fastcoop.errors import FastCoopError
from fastcoop.schedule import published_epochs

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
IMPLS = ("fast", "reference")
RUN_FIELDS = ("seed", "shots", "epochs")  # what runs trained together (one stack) may differ in
PROMPT_FIELDS = ("n_ctx", "init", "csc", "position")  # and CoOp's and KgCoOp's runs in their prompts
BASELINES = ("linear-probe", "tip-adapter", "tip-adapter-f")  # what a sweep may run beside its prompt learners
# each op's implementations (fastcoop.backends says what each is), the first its reference
IMPL_CHOICES = {"loss": ("reference", "triton"), "attention": ("grid", "triton", "flex"),
                "add_norm": ("reference", "triton"), "activation": ("reference", "triton"),
                "mlp": ("reference", "triton"), "text": ("reference", "fast"), "step": ("eager", "graph"),
                "eval_dtype": ("fp32", "bf16")}


def resolve_precision(precision: str, device: str, gpu_default: str) -> str:
    """'auto' → `gpu_default` on a GPU and fp32 on CPU: the CPU keeps the published fp32 math unless bf16 is asked
    for (faster on CPUs with bf16 units, e.g. AVX512-BF16 or AMX; slower on the others)."""
    if precision == "auto":
        return gpu_default if device.startswith("cuda") else "fp32"
    if precision == "fp16" and not device.startswith("cuda"):
        warnings.warn("--precision fp16 on a CPU has no fast kernels: it runs about 14× slower than fp32 there (fp32, "
                      "or bf16 on CPUs with bf16 units, are the fast choices)")
    return precision


def option(help: str, **click_settings) -> dict:
    """A field's command-line option: its help, and choices, is_flag, min/max (a range) or kind (a value the
    command line parses itself: "shots", "impl_detail")."""
    return {"help": help, **click_settings}


@dataclass(frozen=True)
class Recipe:
    """What a run learns; what is left None is the method's published recipe (`published` fills it in)."""

    method: str = field(default="coop", metadata=option(
        "cocoop: each image shifts the context through a Meta-Net (CoCoOp); kgcoop: CoOp kept near the hand-written "
        "prompt (KgCoOp). Each with its own published recipe.", choices=METHODS))
    shots: int | None = field(default=16, metadata=option("Few-shot subset to train on, or 'all'.", kind="shots"))
    seed: int = field(default=1, metadata=option(
        "Which cached few-shot subset (and the context's initialisation and batch order)."))
    classes: str = field(default="all", metadata=option(
        "Train on a class subset of the base-to-new protocol (labels in order; the first half is base; few-shot "
        "sampled first, then kept and relabelled, as published).", choices=("all", "base", "new")))
    n_ctx: int | None = field(default=None, metadata=option(
        "Context vectors M (published: CoOp 16, random; CoCoOp and KgCoOp 4, from 'a photo of a').", min=1))
    csc: bool = field(default=False, metadata=option("Class-specific context (one context per class).",
                                                     is_flag=True))
    position: str = field(default="end", metadata=option("Where the class name goes.",
                                                         choices=("end", "middle", "front")))
    init: str | None = field(default=None, metadata=option(
        "Initialise the context from words, e.g. 'a photo of a' (sets M)."))
    epochs: int | None = field(default=None, metadata=option(
        "Default: the published count (CoOp: by shots; CoCoOp 10; KgCoOp 100).", min=1))
    batch_size: int | None = field(default=None, metadata=option("Default: CoOp 32, CoCoOp 1, KgCoOp 128.", min=1))
    lr: float = field(default=0.002, metadata=option(
        "SGD's learning rate after the warm-up epoch (cosine decay; published: 0.002).", min=0, min_open=True))
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    precision: str = field(default="auto", metadata=option(
        "Autocast (auto: bf16 on a GPU, fp32 on CPU; bf16 on a CPU with bf16 units trains ~1.7× faster).",
        choices=("auto", "fp32", "bf16", "fp16")))
    kg_weight: float | None = field(default=None, metadata=option(
        "KgCoOp's λ, the weight of the distance to the hand-written prompt (published: 8).", min=0))
    kg_template: str | None = None  # KgCoOp's hand-written prompt (None: the dataset's, fastcoop.kgcoop)

    def __post_init__(self):
        if self.method not in METHODS:
            raise FastCoopError(f"method must be one of {', '.join(METHODS)}, not '{self.method}'")
        if self.method == "cocoop" and (self.csc or self.position != "end"):
            raise FastCoopError("CoCoOp learns one context shared by all classes, before the class name: "
                                "--csc and --position are CoOp's options")
        if self.method != "kgcoop" and (self.kg_weight is not None or self.kg_template is not None):
            raise FastCoopError("--kg-weight is KgCoOp's option (--method kgcoop)")
        if self.n_ctx is not None and self.n_ctx < 1:
            raise FastCoopError(f"--n-ctx must be at least 1, not {self.n_ctx}")
        if self.batch_size is not None and self.batch_size < 1:
            raise FastCoopError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.lr <= 0:
            raise FastCoopError(f"--lr must be above 0, not {self.lr}")

    def published(self, num_classes: int, device: str) -> "Recipe":
        """This recipe with the published values where it leaves them None (the context's M and words, batch size,
        epochs — CoOp's by shot count and class count —, KgCoOp's λ) and its precision for `device` (auto: bf16
        on a GPU, fp32 elsewhere). Given words set M: n_ctx stays None, the learner counts them."""
        recipe = RECIPES[self.method]
        filled = {name: recipe[name] for name in ("batch_size", "epochs") if getattr(self, name) is None}
        if filled.get("epochs", self.epochs) is None:  # CoOp's: by shot count
            filled["epochs"] = published_epochs(self.shots, num_classes)
        if self.method == "kgcoop" and self.kg_weight is None:
            filled["kg_weight"] = recipe["kg_weight"]
        filled["precision"] = resolve_precision(self.precision, device, "bf16")
        return replace(self.with_published_context(), **filled)

    @property
    def own_fields(self) -> tuple[str, ...]:
        """What a run may have of its own among runs trained together (one stack): its seed, shots and epochs, and
        CoOp's and KgCoOp's runs their prompts (CoCoOp's Meta-Net stacks runs of one prompt only)."""
        return RUN_FIELDS + (PROMPT_FIELDS if self.method != "cocoop" else ())

    def stack_key(self) -> "Recipe":
        """What runs trained together share: this recipe less what each run may have of its own."""
        return replace(self, **{f.name: f.default for f in fields(Recipe) if f.name in self.own_fields})

    def with_published_context(self) -> "Recipe":
        """The published context (M and the words it starts from) when neither is given; a given M starts random,
        as published."""
        if self.n_ctx is not None or self.init is not None:
            return self
        return replace(self, n_ctx=RECIPES[self.method]["n_ctx"], init=RECIPES[self.method]["init"])


@dataclass(frozen=True)
class Runtime:
    """Where and how a run is computed. `impl_detail`: single ops' implementations over what `impl` picks, as
    (op, choice) pairs; fastcoop.backends.resolve decides from these what runs. `threads`: torch's CPU threads
    (None: chosen from the machine, fastcoop.machine.cpu_threads; a run records the number it used)."""

    device: str = field(default="auto", metadata=option("auto, cpu or cuda[:N]."))
    impl: str = field(default="fast", metadata=option(
        "fast: every op's fastest exact implementation on the device (fused Triton kernels and a CUDA graph on a "
        "GPU); reference: the published 77-token text computation in plain PyTorch, eager (slow; for "
        "comparison).", choices=IMPLS))
    impl_detail: tuple[tuple[str, str], ...] = field(default=(), metadata=option(
        "Expert: single ops' implementations over --impl, e.g. attention=flex,mlp=triton,step=eager (ops and "
        "choices: the README's implementation table).", kind="impl_detail"))
    threads: int | None = field(default=None, metadata=option(
        "torch's CPU threads  [default: one per core this process may use, less one per other busy thread on "
        "the machine]", min=1))


def parse_impl_detail(text: str) -> tuple[tuple[str, str], ...]:
    """--impl-detail 'op=choice,...' as (op, choice) pairs, each checked against IMPL_CHOICES."""
    pairs = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        op, _, choice = item.partition("=")
        if op not in IMPL_CHOICES:
            raise FastCoopError(f"--impl-detail: unknown op '{op}'; the ops are {', '.join(IMPL_CHOICES)}")
        if choice not in IMPL_CHOICES[op]:
            raise FastCoopError(f"--impl-detail: {op} takes {' or '.join(IMPL_CHOICES[op])}, not '{choice}'")
        pairs.append((op, choice))
    return tuple(pairs)


def option_fields(cls, names: tuple[str, ...]) -> list:
    """The dataclass fields of `cls` named `names`, in that order (for building command-line options)."""
    by_name = {f.name: f for f in fields(cls)}
    return [by_name[name] for name in names]
