"""ProGrad (Zhu et al., "Prompt-aligned Gradient for Prompt Tuning", ICCV 2023; BeierZhu/Prompt-align,
ProGrad.public/trainers/prograd.py and Dassl.ProGrad.pytorch's prograd_backward_and_update): CoOp's prompt, whose
cross-entropy gradient g is projected where it conflicts with the gradient d of a distillation loss towards
zero-shot CLIP's predictions: if cos(g, d) < 0, g ← g − λ (g · d̂) d̂, for each learned tensor.

As the published code runs it (scripts/prograd.sh with configs/trainers/ProGrad/rn50{_ep50,_ep100,}.yaml):
the teacher is zero-shot CLIP with ProGrad's hand-written prompt of the dataset (its own CUSTOM_TEMPLATES, the
class names' underscores as spaces), normalised; the distillation loss is the cross-entropy of the student's
softmax(logits / T) against the teacher's, times T² (T = 1), averaged over the batch; λ = 1 (0.8 for 8 and 16 shots
on Flowers102, DTD and EuroSAT, as its README says). The context: M = 16 vectors, the last of them the prompt's
words less " {}." — as many as the words split at spaces count, taken from the words' token embeddings in order —,
the others zero; one context before the class name. CoOp's SGD, batch 32 and epochs by shots (50, 100, 200).
"""

import json
from dataclasses import replace
from importlib import resources

import torch
import torch.nn.functional as F

from fastcoop.errors import FastCoopError
from fastcoop.kernels import cosine_ce_runs
from fastcoop.methods import Option
from fastcoop.methods.coop import CoOp, CoOpLoss
from fastcoop.prompts import PromptLearner
from fastcoop.text_tower import TextTower
from fastcoop.zeroshot import zeroshot_classifier

N_CTX = 16  # scripts/prograd.sh's CONTEXT_TOKENS_NUMBER in every published command
SMALLER_WEIGHT = ({"oxford_flowers", "dtd", "eurosat"}, (8, 16), 0.8)  # the README's λ for those datasets and shots


def prograd_template(dataset: str | None) -> str:
    """ProGrad's hand-written prompt for a dataset (by fastcoop's name; other caches: "a photo of a {}.")."""
    table = json.loads(resources.files("fastcoop").joinpath("presets/prograd_templates.json").read_text())
    return table.get(dataset or "", table["default"])


class ProGradLearner(PromptLearner):
    """CoOp's learner with ProGrad's start: M vectors, the words' token embeddings in the last of them (as many as
    the words split at spaces), zeros before; the prompt's text the placeholders and the words."""

    def context_length(self, tokenizer, n_ctx, init):
        words = len(init.split(" "))
        if n_ctx < words:
            raise FastCoopError(f"ProGrad puts its {words} starting words in the context: --n-ctx must be at least "
                                f"{words}, not {n_ctx}")
        return n_ctx

    def placeholder(self, n_ctx, init):
        return " ".join(["X"] * (n_ctx - len(init.split(" "))) + [init])

    def context_from_words(self, embedded, n_ctx, init):
        words = len(init.split(" "))
        ctx = torch.zeros(n_ctx, embedded.shape[-1], device=embedded.device)
        ctx[n_ctx - words:] = embedded[1:1 + words]
        return ctx


class ProGrad(CoOp):
    name = "prograd"
    title = "ProGrad"
    paper = "Zhu et al., ICCV 2023"
    learns = "CoOp's context, its gradient aligned to zero-shot CLIP's"
    fixed = {"csc": False, "position": "end"}
    options = {"prograd_lambda": Option(None, "λ, how much of the conflicting gradient is projected out (published: "
                                              "1, Flowers102, DTD and EuroSAT at 8 and 16 shots 0.8)", min=0),
               "temperature": Option(1.0, "T of the distillation towards zero-shot CLIP", min=1e-6),
               "template": Option(None, "the teacher's hand-written prompt, {} for the class name (published: "
                                        "ProGrad's for the dataset)")}

    def published(self, recipe, dataset):
        if recipe.init is None and recipe.n_ctx is None:
            recipe = replace(recipe, n_ctx=N_CTX, init=prograd_template(dataset).replace(" {}.", ""))
        if recipe.option("prograd_lambda") is None:
            datasets, shots, weight = SMALLER_WEIGHT
            own = dict(recipe.options) | {"prograd_lambda": weight if dataset in datasets and recipe.shots in shots
                                          else 1.0}
            recipe = replace(recipe, options=tuple(sorted(own.items())))
        if recipe.option("template") is None:
            own = dict(recipe.options) | {"template": prograd_template(dataset)}
            recipe = replace(recipe, options=tuple(sorted(own.items())))
        return recipe

    def learner(self, model, tokenizer, classnames, recipe):
        if recipe.init is None:
            return super().learner(model, tokenizer, classnames, recipe)  # a given M alone starts random, as CoOp
        return ProGradLearner(model, tokenizer, classnames, recipe.n_ctx or N_CTX, False, "end", recipe.init)

    def loss(self, parts):
        recipe = parts.recipes[0]
        teacher = teacher_features(parts.loaded, parts.classnames, recipe.option("template"), parts.device)
        return ProGradLoss(parts.text_encoder(), parts.logit_scale, parts.autocast_dtype, parts.backends.loss,
                           teacher, recipe.option("temperature"), recipe.option("prograd_lambda"))


def teacher_features(loaded, classnames: list[str], template: str, device) -> torch.Tensor:
    """K × D: zero-shot CLIP's normalised text features of `template` with each class name (underscores as spaces,
    as ProGrad's CLIP writes them), computed where the text tower is."""
    where = TextTower.of(loaded.model).positional_embedding.device
    names = [name.replace("_", " ") for name in classnames]
    return zeroshot_classifier(loaded, names, [template], device=str(where)).to(device)


class ProGradLoss(CoOpLoss):
    """CoOp's loss (the runs' losses, R) and, kept for `gradients`, each run's distillation loss towards the
    teacher's predictions."""

    def __init__(self, encoder, logit_scale, autocast_dtype, loss_backend: str, teacher: torch.Tensor,
                 temperature: float, weight: float):
        super().__init__(encoder, logit_scale, autocast_dtype, loss_backend)
        self.teacher, self.temperature, self.weight = teacher, temperature, weight
        self.distillation = None

    def __call__(self, learners, images, labels, sizes):
        text = self.text_features(learners)
        losses, hits = cosine_ce_runs(images, text, self.logit_scale, labels, sizes, backend=self.loss_backend)
        image = F.normalize(images.float(), dim=-1)
        student = self.logit_scale * image @ F.normalize(text.float(), dim=-1).transpose(1, 2)  # R × B × K
        teacher = self.logit_scale * image @ F.normalize(self.teacher.float(), dim=-1).t()
        t = self.temperature
        soft = -F.softmax(teacher / t, dim=-1) * F.log_softmax(student / t, dim=-1) * t * t
        self.distillation = torch.stack([soft[run, :size].sum(-1).mean() for run, size in enumerate(sizes)])
        return losses, hits

    def gradients(self, losses, params, seed):
        """Each tensor's cross-entropy gradient, less λ times its part along the distillation gradient where the
        two point apart (prograd_backward_and_update)."""
        own = torch.autograd.grad(losses, params, grad_outputs=seed, retain_graph=True)
        towards = torch.autograd.grad(self.distillation, params, grad_outputs=seed)
        projected = []
        for g, d in zip(own, towards):
            d_unit = d / torch.linalg.norm(d)
            conflict = torch.dot((g / torch.linalg.norm(g)).flatten(), d_unit.flatten()) < 0
            projected.append(torch.where(conflict, g - self.weight * torch.dot(g.flatten(), d_unit.flatten()) * d_unit,
                                         g))
        return projected
