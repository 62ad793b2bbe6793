"""ZS-LP and CLAP (Silva-Rodríguez et al., "A Closer Look at the Few-Shot Adaptation of Large Vision-Language
Models", CVPR 2024; jusiro/CLAP, trainers/adapters.py): a linear probe on CLIP's image features whose class
prototypes W start at the zero-shot classifier T, logits = logit_scale · cos(f, W_k). ZS-LP trains W with
cross-entropy; CLAP adds its class-adaptive constraint, mean_k α_k · ‖W_k − T_k‖², α_k the zero-shot
classifier's mean probability of class k over that class's training features. No validation split: the paper's
point.

As the published code runs it (configs/trainers/SGD_lr1e-1_B256_ep300.yaml, scripts/adapt.sh with INIT ZS and
CONSTRAINT none or l2): T is each class's prompts' text features averaged without normalising (its dataset's
CUSTOM_TEMPLATES prompt; ImageNet's CoOp's seven selected templates and that prompt), the class names as the
dataset gives them; the training features are 20 augmented passes over the few-shot images, pooled; every epoch
shuffles the pool and takes as many batches of 256 as the few-shot images alone make (the loader's length); SGD lr
0.1, momentum 0.9, no weight decay, 300 epochs, CoOp's constant warm-up epoch and cosine schedule.
"""

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from fastcoop.classifiers import TextClassifier
from fastcoop.kernels import cosine_ce_runs
from fastcoop.methods import Method, Option
from fastcoop.zeroshot import OnZeroShot, adapter_templates

POOLED_VIEWS = 20  # the published code's augmented passes over the training images (epochs_aumentation)
PROBABILITIES_PER_CALL = 1 << 24  # the α's zero-shot softmax over pool rows × classes, a chunk at a time


class ZeroShotProbe(OnZeroShot):
    """The probe's prototypes (K × D, learned) and the zero-shot classifier they start from (`base`)."""

    def __init__(self, model, tokenizer, classnames: list[str], templates: list[str]):
        super().__init__(model, tokenizer, classnames, templates)
        self.prototypes = nn.Parameter(self.base.clone())

    def trainable(self) -> dict[str, torch.Tensor]:
        return {"prototypes": self.prototypes}


class ZSLP(Method):
    name = "zs-lp"
    title = "ZS-LP"
    paper = "Silva-Rodríguez et al., CVPR 2024"
    learns = "a linear probe from the zero-shot classifier"
    recipe = {"n_ctx": None, "init": None, "batch_size": 256, "epochs": 300, "lr": 0.1, "weight_decay": 0.0}
    options = {"zs_templates": Option(None, "whose prompts make the zero-shot classifier, a dataset's name "
                                            "(published: the cache's dataset's)")}
    fixed = {"n_ctx": None, "init": None, "csc": False, "position": "end"}
    pooled_views = POOLED_VIEWS

    def published(self, recipe, dataset):
        if recipe.option("zs_templates") is not None:
            adapter_templates(recipe.option("zs_templates"))
            return recipe
        key = dataset if dataset in adapter_templates() else "default"
        return replace(recipe, options=tuple(sorted((dict(recipe.options) | {"zs_templates": key}).items())))

    def learner(self, model, tokenizer, classnames, recipe):
        return ZeroShotProbe(model, tokenizer, classnames, adapter_templates(recipe.option("zs_templates")))

    def loss(self, parts):
        return ProbeLoss(parts.logit_scale, parts.backends.loss)

    def classifier(self, model, learner, backends):
        return TextClassifier(learner.prototypes.detach().float(), model.logit_scale.exp().detach())

    def per_class(self, recipe):
        return ("prototypes",)


class CLAP(ZSLP):
    name = "clap"
    title = "CLAP"
    learns = "ZS-LP, held near the zero-shot classifier"

    def prepare(self, parts):
        for learner, views, labels in zip(parts.learners, parts.train_views, parts.train_labels):
            # each run's α, from its own pool, kept with its probe (a stack trains fewer runs as they end)
            learner.register_buffer("multipliers", class_multipliers(
                learner.base, views[0].to(parts.device), labels.to(parts.device), parts.logit_scale), persistent=False)

    def loss(self, parts):
        return ProbeLoss(parts.logit_scale, parts.backends.loss, constrained=True)


def class_multipliers(base: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, logit_scale) -> torch.Tensor:
    """α (K): per class, the zero-shot classifier's softmax probability of the true class averaged over that class's
    training features (init_lagrangian_multipliers: diag(softmaxᵀ · one-hot) / class counts)."""
    num_classes = len(base)
    total = torch.zeros(num_classes, device=base.device)
    per_call = max(1, PROBABILITIES_PER_CALL // num_classes)
    for start in range(0, len(features), per_call):
        chunk, chunk_labels = features[start:start + per_call].float(), labels[start:start + per_call]
        logits = F.normalize(chunk, dim=-1) @ F.normalize(base.float(), dim=-1).t() * logit_scale
        total.index_add_(0, chunk_labels, logits.softmax(-1).gather(1, chunk_labels[:, None])[:, 0])
    return total / torch.bincount(labels, minlength=num_classes).float()


class ProbeLoss:
    """Each run's prototypes against its batch: the fused cosine cross-entropy (logit_scale · cos), plus when
    `constrained` CLAP's constraint mean_k α_k · ‖W_k − T_k‖² (α: each probe's `multipliers`)."""

    def __init__(self, logit_scale, loss_backend: str, constrained: bool = False):
        self.logit_scale, self.loss_backend, self.constrained = logit_scale, loss_backend, constrained

    def __call__(self, learners, images, labels, sizes):
        prototypes = learners[0].prototypes[None] if len(learners) == 1 else \
            torch.stack([learner.prototypes for learner in learners])
        losses, hits = cosine_ce_runs(images, prototypes, self.logit_scale, labels, sizes, backend=self.loss_backend)
        if self.constrained:
            base = torch.stack([learner.base for learner in learners])
            multipliers = torch.stack([learner.multipliers for learner in learners])
            losses = losses + (multipliers * (prototypes - base).pow(2).sum(-1)).mean(-1)
        return losses, hits
