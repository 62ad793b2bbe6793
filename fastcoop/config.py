"""A run's Recipe — what it learns: its identity for resuming it, what its results are grouped by — and its
Runtime — where and by which implementations it is computed, which changes nothing beyond float rounding (the
CUDA graph not even that), so an interrupted run may go on under another runtime. Both are frozen; each field's
metadata is its command-line option (help text, choices), declared once here for `train` and `sweep`. Kept apart
from the training loop so that reading a run (evaluation, prediction, reports) does not import it."""

import warnings
from dataclasses import dataclass, field, fields

from fastcoop.errors import FastCoopError

IMPLS = ("fast", "reference")
RUN_FIELDS = ("seed", "shots", "epochs")  # what runs trained together (one stack) may differ in
PROMPT_FIELDS = ("n_ctx", "init", "csc", "position")  # and, where their method stacks prompts, in their prompts
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
    """What a run learns; what is left None is the method's published recipe (fastcoop.methods.publish fills it
    in).
    `options`: the method's own options (fastcoop.methods.Option), as (name, value) pairs."""

    method: str = field(default="coop", metadata=option(
        "A registered method (coop, cocoop, kgcoop, ...: the README's table) or your own, FILE.py:ClassName; each "
        "with its published recipe."))
    shots: int | None = field(default=16, metadata=option("Few-shot subset to train on, or 'all'.", kind="shots"))
    seed: int = field(default=1, metadata=option(
        "Which cached few-shot subset (and the context's initialisation and batch order)."))
    classes: str = field(default="all", metadata=option(
        "Train on a class subset of the base-to-new protocol (labels in order; the first half is base; few-shot "
        "sampled first, then kept and relabelled, as published).", choices=("all", "base", "new")))
    n_ctx: int | None = field(default=None, metadata=option(
        "Context vectors M  [default: the method's published M and words: the README's table]", min=1))
    csc: bool = field(default=False, metadata=option("Class-specific context (one context per class).",
                                                     is_flag=True))
    position: str = field(default="end", metadata=option("Where the class name goes.",
                                                         choices=("end", "middle", "front")))
    init: str | None = field(default=None, metadata=option(
        "Initialise the context from words, e.g. 'a photo of a' (sets M)."))
    epochs: int | None = field(default=None, metadata=option(
        "[default: the method's published count; CoOp's by shots]", min=1))
    batch_size: int | None = field(default=None, metadata=option("[default: the method's published batch]", min=1))
    lr: float | None = field(default=None, metadata=option(
        "SGD's learning rate after the warm-up epoch (cosine decay)  [default: the method's published lr]", min=0,
        min_open=True))
    momentum: float = 0.9
    weight_decay: float | None = None  # the method's (CoOp's: 5e-4)
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    precision: str = field(default="auto", metadata=option(
        "Autocast (auto: bf16 on a GPU, fp32 on CPU; bf16 on a CPU with bf16 units trains ~1.7× faster).",
        choices=("auto", "fp32", "bf16", "fp16")))
    options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        if self.n_ctx is not None and self.n_ctx < 1:
            raise FastCoopError(f"--n-ctx must be at least 1, not {self.n_ctx}")
        if self.batch_size is not None and self.batch_size < 1:
            raise FastCoopError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.lr is not None and self.lr <= 0:
            raise FastCoopError(f"--lr must be above 0, not {self.lr}")

    def option(self, name: str):
        """The value of one of the method's own options (None when not set)."""
        return dict(self.options).get(name)

    def record(self) -> dict:
        """The recipe as run records and requests hold it: its fields, the method's options among them."""
        fields_ = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        return {**fields_, **dict(self.options)}

    @classmethod
    def from_record(cls, record: dict) -> "Recipe":
        names = {f.name for f in fields(cls)} - {"options"}
        own = tuple(sorted((k, v) for k, v in record.items() if k not in names and v is not None))
        return cls(**{k: v for k, v in record.items() if k in names}, options=own)


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
        "choices: fastcoop/backends.py).", kind="impl_detail"))
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
