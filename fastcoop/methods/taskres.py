"""TaskRes (Yu et al., "Task Residual for Tuning Vision-Language Models", CVPR 2023; geekyutao/TaskRes,
trainers/taskres.py): the zero-shot classifier T kept, a learned residual x added to it, t' = T + α·x, logits =
logit_scale · cos(f, t'_k).

As the published code runs it (train_regular.sh, configs/trainers/TaskRes/adam_lr2e-3_B256_ep{100,200}.yaml):
T is each class's prompts' text features averaged without normalising (its dataset's CUSTOM_TEMPLATES prompt;
ImageNet's CoOp's seven selected templates and that prompt), x starts at zero; α = 0.5 (Flowers102 1.0); Adam (Dassl's:
betas 0.9 and 0.999, weight decay 5e-4 added to the gradient) at lr 2e-3 (ImageNet 2e-4), batches of 256 of the
few-shot images with a fresh augmentation every epoch (Dassl's TrainerX), 100 epochs for 1, 2 and 4 shots and 200
for 8 and 16, CoOp's constant warm-up epoch and cosine schedule. The "enhanced base" (T from a text projection the
authors trained) needs their released weights and is not run.
"""

from dataclasses import replace

import torch
from torch import nn

from fastcoop.classifiers import TextClassifier
from fastcoop.kernels import cosine_ce_runs
from fastcoop.methods import Method, Option
from fastcoop.step import Adam
from fastcoop.zeroshot import OnZeroShot, adapter_templates

IMAGENET_LR = 2e-4  # adam_lr2e-4_B256_ep*.yaml, which train_regular.sh runs for ImageNet
SCALES = {"oxford_flowers": 1.0}  # train_regular.sh's α where it is not 0.5


class TaskResidual(OnZeroShot):
    """The zero-shot classifier (`base`, K × D) and the learned residual, by the published name."""

    def __init__(self, model, tokenizer, classnames: list[str], templates: list[str], scale: float):
        super().__init__(model, tokenizer, classnames, templates)
        self.scale = scale
        self.text_feature_residuals = nn.Parameter(torch.zeros_like(self.base))

    def weights(self) -> torch.Tensor:
        """t' = T + α·x (K × D)."""
        return self.base + self.scale * self.text_feature_residuals

    def trainable(self) -> dict[str, torch.Tensor]:
        return {"text_feature_residuals": self.text_feature_residuals}


class TaskRes(Method):
    name = "taskres"
    title = "TaskRes"
    paper = "Yu et al., CVPR 2023"
    learns = "a residual on the zero-shot classifier"
    recipe = {"n_ctx": None, "init": None, "batch_size": 256, "epochs": None, "lr": 2e-3, "weight_decay": 5e-4}
    options = {"residual_scale": Option(None, "α, the residual's scale (published: 0.5; Flowers102 1.0)", min=0),
               "zs_templates": Option(None, "whose prompts make the zero-shot classifier, a dataset's name "
                                            "(published: the cache's dataset's)")}
    fixed = {"n_ctx": None, "init": None, "csc": False, "position": "end"}

    def published(self, recipe, dataset):
        own = dict(recipe.options)
        own.setdefault("residual_scale", SCALES.get(dataset, 0.5))
        own.setdefault("zs_templates", dataset if dataset in adapter_templates() else "default")
        adapter_templates(own["zs_templates"])  # a name no table has is refused here
        lr = IMAGENET_LR if recipe.lr is None and dataset == "imagenet" else recipe.lr
        return replace(recipe, lr=lr, options=tuple(sorted(own.items())))

    def published_epochs(self, shots, num_classes):
        return 100 if shots is not None and shots <= 4 else 200

    def optimizer(self, recipe):
        return Adam(recipe.weight_decay)

    def learner(self, model, tokenizer, classnames, recipe):
        return TaskResidual(model, tokenizer, classnames, adapter_templates(recipe.option("zs_templates")),
                            recipe.option("residual_scale"))

    def loss(self, parts):
        return ResidualLoss(parts.logit_scale, parts.backends.loss)

    def classifier(self, model, learner, backends):
        return TextClassifier(learner.weights().detach().float(), model.logit_scale.exp().detach())

    def per_class(self, recipe):
        return ("text_feature_residuals",)


class ResidualLoss:
    """Each run's t' against its batch with the fused cosine cross-entropy (logit_scale · cos, mean over the
    batch)."""

    def __init__(self, logit_scale, loss_backend: str):
        self.logit_scale, self.loss_backend = logit_scale, loss_backend

    def __call__(self, learners, images, labels, sizes):
        weights = torch.stack([learner.weights() for learner in learners])
        return cosine_ce_runs(images, weights, self.logit_scale, labels, sizes, backend=self.loss_backend)
