"""Methods as plug-ins: what a method is, and where `--method NAME` finds one.

A method is one class in one file. It declares its paper's recipe and its parts; the generic code (the cache's
views per epoch, batching, the schedule, stacking, the CUDA graph, checkpoints and resume, run directories,
`eval`, `predict`, `report`, `sweep` tables and figures, base-to-new and transfer) runs it and knows it only
through these parts. To write one, subclass a built-in (most prompt learners start from CoOp's, in
fastcoop/methods/coop.py) or `Method` itself:

    name      what --method takes and run folders are named by ("coop")
    title     as tables and figures write it ("CoOp"); paper: its citation; learns: what it learns, in a few words
    recipe    the published values of the recipe's fields it sets: n_ctx and init (the context), batch_size,
              epochs (None: CoOp's by shot count), lr; what it leaves out is CoOp's (Method.recipe)
    options   its own options, {name: Option(published default, help)}: given with `-o name=value`, refused
              for a method that does not declare them
    fixed     recipe fields it does not let vary, {field: the only value} (CoCoOp: csc False)
    stacks_prompts  whether runs of different prompt layouts train in one stack (their text in one pass)
    pooled_views  None: epoch e trains on the cache's augmented view e of every image (CoOp's fresh crop per
              epoch); N: every epoch draws its batches from a pool of N views of every image (CLAP's 20 passes
              of augmented features), as many batches as the images alone make
    learner(model, tokenizer, classnames, recipe) → an nn.Module whose trainable() names the tensors it learns
              (a run saves and loads them by these names), whose load_trainable(tensors) loads them, and whose
              classnames are the names it was made for
    loss(parts) → a function (learners, images R × B × D, labels R × B, sizes) → each run's loss and hits (R
              each), run r's batch its first sizes[r] rows; `parts` (LossParts) hands it the text encoder
              built for the learners, CLIP's logit scale, the autocast dtype, the model, the class names and
              each run's train features and labels.
              It runs inside the CUDA graph: device work only, no host reads. A loss may also define
              gradients(losses, params, seed) → each parameter's gradient (ProGrad's projection); by default
              the gradients of the losses
    classifier(model, learner, backends) → an object with logits(image_features) (n × K) and
              predict(image_features) (n labels), for eval, predict, base-to-new and transfer
    published(recipe, dataset) → the recipe with what the method takes from the dataset where the recipe
              leaves it None (KgCoOp's hand-written prompt, TaskRes's ImageNet lr); the default: nothing
    published_epochs(shots, num_classes) → the epochs by shot count when `recipe` declares None (CoOp's)
    per_class(recipe) → names of the learned tensors with a row per class (they carry over only to the run's
              own classes; base-to-new's new half is then not tested); the default: CoOp's context with --csc

    optimizer(recipe) → what updates the learned tensors: fastcoop.step's SGD (the default: the recipe's
              momentum and weight decay) or Adam, or one's own with the same parts (state_names, new_state,
              update_(params, grads, state, lr, learner), device work only; describe(lr) for the tables)
    prepare(parts) → what it derives from the runs' training data before their first step (kept with each
              learner: CLAP's multipliers, LP++'s start and step sizes); nothing by default
    lr_at(epoch, recipe) → each epoch's learning rate: CoOp's constant warm-up epoch and cosine by default
 A researcher's own method
loads from a file, `--method path/to/file.py:ClassName`, or from an installed package's entry point in the group
"fastcoop.methods" (name = "module:ClassName"); examples/own_method.py is a complete one. Nothing outside this
package names a method.
"""

import importlib
import importlib.util
import sys
import textwrap
from dataclasses import dataclass, fields, replace
from importlib.metadata import entry_points
from pathlib import Path

from fastcoop.config import PROMPT_FIELDS, RUN_FIELDS, Recipe, resolve_precision
from fastcoop.errors import FastCoopError
from fastcoop.schedule import lr_at as published_lr
from fastcoop.schedule import published_epochs

BUILT_IN = {"coop": "fastcoop.methods.coop:CoOp", "cocoop": "fastcoop.methods.cocoop:CoCoOp",
            "kgcoop": "fastcoop.methods.kgcoop:KgCoOp", "prograd": "fastcoop.methods.prograd:ProGrad",
            "clip-adapter": "fastcoop.methods.clip_adapter:CLIPAdapter", "taskres": "fastcoop.methods.taskres:TaskRes",
            "lp++": "fastcoop.methods.lp_plus_plus:LPPlusPlus",
            "zs-lp": "fastcoop.methods.clap:ZSLP", "clap": "fastcoop.methods.clap:CLAP"}
# what a sweep may run beside its trained methods, on the same few-shot images: name → module:object
BASELINES = {"linear-probe": "fastcoop.methods.linear_probe:LINEAR_PROBE",
             "tip-adapter": "fastcoop.methods.tip_adapter:TIP_ADAPTER",
             "tip-adapter-f": "fastcoop.methods.tip_adapter:TIP_ADAPTER_F"}
ENTRY_POINT_GROUP = "fastcoop.methods"
REQUIRED = ("learner", "loss", "classifier")  # the parts every method defines
WHOLE_SET = 1 << 30  # a batch size larger than any few-shot set: each epoch is one step over every image


@dataclass(frozen=True)
class Option:
    """A method's own option: its published default (None: filled in by the method's `published`), the help
    `fastcoop methods NAME` shows, and its lowest value."""

    default: object
    help: str
    min: float | None = None

    def parse(self, name: str, text: str, method: str):
        """The option's value from the command line's text, typed as its default."""
        kind = type(self.default) if self.default is not None else str
        try:
            value = kind(text)
        except ValueError:
            raise FastCoopError(f"-o {name}: {method}'s {name} takes a {kind.__name__}, not '{text}'") from None
        self.check(name, value, method)
        return value

    def check(self, name: str, value, method: str) -> None:
        if self.min is not None and value is not None and value < self.min:
            raise FastCoopError(f"-o {name}: {method}'s {name} must be at least {self.min:g}, not {value}")


class Method:
    """The parts of a method (the module docstring is the guide); a subclass defines learner, loss and
    classifier, and declares what differs from CoOp's recipe."""

    name: str = ""
    title: str = ""
    paper: str = ""
    learns: str = ""  # for the README's table; {n_ctx} and {init}: the published context's
    # CoOp's recipe, the protocol every method follows where its own declares nothing else
    recipe: dict = {"n_ctx": 16, "init": None, "batch_size": 32, "epochs": None, "lr": 0.002, "weight_decay": 5e-4}
    options: dict[str, Option] = {}
    fixed: dict[str, object] = {}
    stacks_prompts: bool = True
    pooled_views: int | None = None

    def learner(self, model, tokenizer, classnames: list[str], recipe):
        raise NotImplementedError

    def loss(self, parts):
        raise NotImplementedError

    def classifier(self, model, learner, backends):
        raise NotImplementedError

    def published(self, recipe, dataset: str | None):
        return recipe

    def published_epochs(self, shots: int | None, num_classes: int) -> int:
        """The epochs by shot count when the recipe declares none: CoOp's (50, 100, 200; ImageNet's 50)."""
        return published_epochs(shots, num_classes)

    def prepare(self, parts) -> None:
        """What the method derives from the runs' training data before their first step (CLAP's multipliers,
        LP++'s initialisation and step sizes), kept with each run's learner; nothing by default."""

    def lr_at(self, epoch: int, recipe) -> float:
        """The learning rate of a 0-based epoch: CoOp's constant warm-up epoch, then cosine decay."""
        return published_lr(epoch, recipe.epochs, recipe.lr, recipe.warmup_epochs, recipe.warmup_lr)

    def optimizer(self, recipe):
        """What updates the learned tensors (fastcoop.step: SGD, Adam); CoOp's SGD by default."""
        from fastcoop.step import SGD

        return SGD(recipe.momentum, recipe.weight_decay)

    def per_class(self, recipe) -> tuple[str, ...]:
        """The learned tensors with a row per class (they carry over only to the run's own classes): CoOp's
        context with --csc."""
        return ("ctx",) if recipe.csc else ()


class Baseline:
    """A method a sweep runs beside its trained ones, on the same few-shot images, with no run directory: its
    `run(cache, loaded, subsets, device)` gives one row per (shots, seed) of `subsets`, each with "shots", "seed"
    and "test" (top-1) and what else it chose; `check(cache, subsets)` refuses a cache it cannot run on, before
    any work.
    It needs the splits `needs` (it selects its settings on val: `why_val`)."""

    name: str = ""
    title: str = ""
    paper: str = ""
    needs: tuple[str, ...] = ("val", "test")
    why_val: str = ""

    def check(self, cache, subsets: list[tuple[int, int]]) -> None:
        return None

    def run(self, cache, loaded, subsets: list[tuple[int, int]], device: str) -> list[dict]:
        raise NotImplementedError


def publish(recipe: Recipe, num_classes: int, device: str, dataset: str | None = None) -> Recipe:
    """The recipe with its method's published values where it leaves them None (the context's M and words, batch
    size, epochs — CoOp's by shot count and class count —, lr, the method's options and what the method takes from
    the dataset) and its precision for `device` (auto: bf16 on a GPU, fp32 elsewhere), checked against the
    method's declarations. Given words set M: n_ctx stays None, the learner counts them."""
    method = get(recipe.method)
    check_fields(recipe, method)
    recipe = method.published(recipe, dataset)  # what the method takes from the dataset, first
    declared = {**Method.recipe, **method.recipe}
    filled = {name: declared[name] for name in ("batch_size", "epochs", "lr", "weight_decay")
              if getattr(recipe, name) is None}
    if filled.get("epochs", recipe.epochs) is None:  # by shot count
        filled["epochs"] = method.published_epochs(recipe.shots, num_classes)
    own = {name: option.default for name, option in method.options.items()} | dict(recipe.options)
    filled["options"] = tuple(sorted(own.items()))
    filled["precision"] = resolve_precision(recipe.precision, device, "bf16")
    return replace(published_context(recipe, method), **filled)


def published_context(recipe: Recipe, method: Method) -> Recipe:
    """The method's published context (M and the words it starts from) when the recipe gives neither; a given M
    starts random, as published."""
    if recipe.n_ctx is not None or recipe.init is not None:
        return recipe
    declared = {**Method.recipe, **method.recipe}
    return replace(recipe, n_ctx=declared["n_ctx"], init=declared["init"])


def check_fields(recipe: Recipe, method: Method) -> None:
    """Refuse, by name, what the method does not have: an option it does not declare, a field it keeps fixed."""
    for name, value in recipe.options:
        if name not in method.options:
            have = ", ".join(method.options) or "none"
            raise FastCoopError(f"-o {name} is not an option of {method.title} (its options: {have})")
        method.options[name].check(name, value, method.title)
    for name, value in method.fixed.items():
        if getattr(recipe, name) != value:
            given = "" if isinstance(value, bool) else f" {getattr(recipe, name)}"
            raise FastCoopError(f"{method.title} has no --{name.replace('_', '-')}{given}: its {name} is always "
                                f"{value}")


def stack_key(recipe: Recipe, method: Method) -> Recipe:
    """What runs trained together share: the recipe less what each run may have of its own (its seed, shots and
    epochs, and its prompt where the method stacks prompts of different layouts)."""
    own = RUN_FIELDS + (PROMPT_FIELDS if method.stacks_prompts else ())
    return replace(recipe, **{f.name: f.default for f in fields(Recipe) if f.name in own})


def names() -> list[str]:
    """The registered methods' names: the built-in ones, then those installed packages add."""
    return list(BUILT_IN) + sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)
                                   if ep.name not in BUILT_IN)


def check_spec(spec: str) -> str:
    """A --method value as runs record it, checked without importing the method: a registered name, or
    'FILE.py:Class' with FILE made absolute (a run is read again from elsewhere)."""
    path, colon, cls = spec.rpartition(":")
    if colon and path.endswith(".py"):
        if not Path(path).is_file():
            raise FastCoopError(f"--method {spec}: no file {path}")
        if not cls.isidentifier():
            raise FastCoopError(f"--method {spec}: '{cls}' is not a class name (FILE.py:ClassName)")
        return f"{Path(path).resolve()}:{cls}"
    if spec not in names():
        raise FastCoopError(f"--method: no method '{spec}'; the registered ones are {', '.join(names())}, or give "
                            "your own as FILE.py:ClassName")
    return spec


def get(spec: str) -> Method:
    """The method a --method value (a registered name, or FILE.py:Class) names, its parts checked."""
    spec = check_spec(spec)
    path, _, cls_name = spec.rpartition(":")
    if path.endswith(".py"):
        cls = getattr(_module_from_file(Path(path)), cls_name, None)
        if cls is None:
            raise FastCoopError(f"--method {spec}: {path} defines no class {cls_name}")
    elif spec in BUILT_IN:
        cls = _load(BUILT_IN[spec])
    else:
        cls = next(ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == spec).load()
    return _checked(cls, spec)


def baseline(name: str):
    """A baseline a sweep runs beside its methods (BASELINES)."""
    return _load(BASELINES[name])


def method_table() -> str:
    """The README's table of the built-in methods and baselines, from their declarations."""
    lines = ["| `--method` | paper | learns | batch | epochs | optimizer, lr | own options (`-o`) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in BUILT_IN:
        method = get(name)
        recipe = {**Method.recipe, **method.recipe}
        learns = method.learns.format(n_ctx=recipe["n_ctx"], init=f"'{recipe['init']}'" if recipe["init"] else
                                      "random")
        fewest, most = (method.published_epochs(shots, 100) for shots in (1, 16))
        epochs = recipe["epochs"] or f"{fewest}–{most} by shots"
        batch = "all" if recipe["batch_size"] >= WHOLE_SET else recipe["batch_size"]
        optimizer = method.optimizer(publish(Recipe(method=name), 100, "cpu")).describe(recipe["lr"])
        own = ", ".join(f"`{option}`" for option in method.options) or "–"
        lines.append(f"| `{name}` | {method.paper} | {learns} | {batch} | {epochs} | {optimizer} | {own} |")
    baselines = "; ".join(f"`{found.name}` ({found.paper})" for found in map(baseline, BASELINES))
    return "\n".join(lines) + "\n\n" + textwrap.fill(f"Beside them, `--baselines`: {baselines}.", 115)


def describe(spec: str) -> str:
    """A method's declarations as `fastcoop methods NAME` prints them: its paper, published recipe, what it keeps
    fixed, its own options with their help."""
    method = get(spec)
    recipe = {**Method.recipe, **method.recipe}
    lines = [f"{method.title} ({method.name}): {method.paper}",
             "published recipe: " + ", ".join(f"{k} {v!r}" for k, v in recipe.items() if v is not None)
             + ("" if recipe["epochs"] else ", epochs by shots as CoOp's")]
    if method.fixed:
        lines.append("fixed: " + ", ".join(f"{k} {v!r}" for k, v in method.fixed.items()))
    lines += [f"-o {name}=VALUE  {option.help}" + (f" (published: {option.default})" if option.default is not None
                                                   else "") for name, option in method.options.items()]
    return "\n".join(lines)


def _load(target: str):
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _module_from_file(path: Path):
    """A method's file imported as a module of its own (once per process)."""
    name = f"fastcoop_method_{abs(hash(str(path)))}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise FastCoopError(f"--method: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return sys.modules[name]


def _checked(cls, spec: str) -> Method:
    """An instance of a method class that defines every required part."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise FastCoopError(f"--method {spec}: not a fastcoop.methods.Method subclass")
    missing = [part for part in REQUIRED if getattr(cls, part) is getattr(Method, part)]
    missing += [part for part in ("name", "title") if not getattr(cls, part)]
    if missing:
        raise FastCoopError(f"--method {spec}: {cls.__name__} does not define {', '.join(missing)} (see "
                            "fastcoop.methods' guide)")
    return cls()
