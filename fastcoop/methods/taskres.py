"""TaskRes (Yu et al., "Task Residual for Tuning Vision-Language Models", CVPR 2023; geekyutao/TaskRes,
trainers/taskres.py): the zero-shot classifier T kept, a learned residual x added to it, t' = T + α·x, logits =
logit_scale · cos(f, t'_k).

As the published code runs it (train_regular.sh, configs/trainers/TaskRes/adam_lr2e-3_B256_ep{100,200}.yaml):
T is each class's prompts' text features averaged without normalising (its dataset's CUSTOM_TEMPLATES prompt;
ImageNet's CoOp's seven selected templates and that prompt), x starts at zero; α = 0.5 (Flowers102 1.0); Adam (Dassl's:
betas 0.9 and 0.999, weight decay 5e-4 added to the gradient) at lr 2e-3 (ImageNet 2e-4), batches of 256 of the
few-shot images with a fresh augmentation every epoch (Dassl's TrainerX), 100 epochs for 1, 2 and 4 shots and 200
for 8 and 16, CoOp's constant warm-up epoch and cosine schedule. The "enhanced base" (`-o enhanced_base=FILE`, the
authors' released text projection, `{"state_dict": {"weight": D × width}}`): T from the text encoder with that
projection in place of CLIP's, as _get_enhanced_base_text_features loads it.
"""

import pickle
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from fastcoop.classifiers import TextClassifier
from fastcoop.errors import FastCoopError
from fastcoop.kernels import cosine_ce_runs
from fastcoop.methods import Method, Option
from fastcoop.step import Adam
from fastcoop.text_tower import TextTower
from fastcoop.zeroshot import OnZeroShot, adapter_templates

IMAGENET_LR = 2e-4  # adam_lr2e-4_B256_ep*.yaml, which train_regular.sh runs for ImageNet
SCALES = {"oxford_flowers": 1.0}  # train_regular.sh's α where it is not 0.5


class TaskResidual(OnZeroShot):
    """The zero-shot classifier (`base`, K × D) and the learned residual, by the published name."""

    def __init__(self, model, tokenizer, classnames: list[str], templates: list[str], scale: float,
                 projection: torch.Tensor | None = None):
        super().__init__(model, tokenizer, classnames, templates)
        if projection is not None:  # the enhanced base: the same prompts through the trained projection
            tower = replace(TextTower.of(model), text_projection=projection.to(self.base.device))
            self.base = torch.stack([tower.encode_tokens(tokenizer([t.format(name) for t in templates]).to(
                self.base.device)).float().mean(0) for name in classnames])
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
                                            "(published: the cache's dataset's)"),
               "enhanced_base": Option(None, "the authors' trained text projection (a .pth file of theirs): the "
                                             "enhanced base; none: the regular base")}
    fixed = {"n_ctx": None, "init": None, "csc": False, "position": "end"}

    def published(self, recipe, dataset):
        if recipe.option("enhanced_base") is not None:
            enhanced_projection(recipe.option("enhanced_base"))  # a file that is none is refused here
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
        enhanced = recipe.option("enhanced_base")
        return TaskResidual(model, tokenizer, classnames, adapter_templates(recipe.option("zs_templates")),
                            recipe.option("residual_scale"), enhanced and enhanced_projection(enhanced))

    def loss(self, parts):
        return ResidualLoss(parts.logit_scale, parts.backends.loss)

    def classifier(self, model, learner, backends):
        return TextClassifier(learner.weights().detach().float(), model.logit_scale.exp().detach())

    def per_class(self, recipe):
        return ("text_feature_residuals",)


def enhanced_projection(path: str) -> torch.Tensor:
    """width × D: the text projection in the authors' enhanced-base file (its state_dict's weight, transposed, as
    _get_enhanced_base_text_features puts it in place of CLIP's)."""
    try:
        weight = torch.load(Path(path), map_location="cpu", weights_only=True)["state_dict"]["weight"]
    except (OSError, KeyError, TypeError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise FastCoopError(f"-o enhanced_base={path}: not a file of TaskRes's enhanced base, a state_dict with the "
                            f"projection's weight ({type(exc).__name__})") from None
    return weight.float().t()


class ResidualLoss:
    """Each run's t' against its batch with the fused cosine cross-entropy (logit_scale · cos, mean over the
    batch)."""

    def __init__(self, logit_scale, loss_backend: str):
        self.logit_scale, self.loss_backend = logit_scale, loss_backend

    def __call__(self, learners, images, labels, sizes):
        weights = torch.stack([learner.weights() for learner in learners])
        return cosine_ce_runs(images, weights, self.logit_scale, labels, sizes, backend=self.loss_backend)
