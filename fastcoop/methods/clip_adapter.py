"""CLIP-Adapter (Gao et al., "CLIP-Adapter: Better Vision-Language Models with Feature Adapters", IJCV 2023;
gaopengcuhk/CLIP-Adapter, clip_adapter.py): a bottleneck MLP on the image features, blended with them, x' = r ·
MLP(x) + (1 − r) · x, r = 0.2; logits = logit_scale · cos(x', t_k) against CLIP's text features of the dataset's
hand-written prompt.

As the published code runs it: the adapter is Linear(D → D/4, no bias), ReLU, Linear(→ D, no bias), ReLU
(`Adapter(c_in, reduction=4)`), on the image encoder's output as it is; the text features are the dataset's
CUSTOM_TEMPLATES prompt (ImageNet's too: one prompt) with the class names' underscores as spaces; trained by
Dassl's TrainerX with CoOp's recipe, as its README says to run it ("follow CoOp's command"): SGD lr 0.002
(momentum 0.9, weight decay 5e-4), batch 32, epochs by shots (50, 100, 200), a fresh augmentation every epoch.
Its repository fixes D = 1024 (RN50's features); here D is the model's.
"""

from dataclasses import replace

import torch
from torch import nn

from fastcoop.classifiers import TextClassifier
from fastcoop.classnames import spoken
from fastcoop.kernels import cosine_ce_runs
from fastcoop.methods import Method, Option
from fastcoop.text_tower import TextTower
from fastcoop.zeroshot import adapter_templates


class FeatureAdapter(nn.Module):
    """The adapter (`fc`, the published Adapter's layer names) and the classes' text features (`text`, K × D)."""

    def __init__(self, model, tokenizer, classnames: list[str], template: str, ratio: float, reduction: int):
        super().__init__()
        self.classnames, self.ratio = list(classnames), ratio
        where = TextTower.of(model).positional_embedding.device
        with torch.no_grad():
            text = model.encode_text(tokenizer([template.format(spoken(name)) for name in classnames]).to(where))
        self.register_buffer("text", text.float())
        dim = text.shape[-1]
        self.fc = nn.Sequential(nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(dim // reduction, dim, bias=False), nn.ReLU(inplace=True))

    def adapt(self, image_features: torch.Tensor) -> torch.Tensor:
        """r · MLP(x) + (1 − r) · x (fp32)."""
        x = image_features.float()
        return self.ratio * self.fc(x) + (1 - self.ratio) * x

    def trainable(self) -> dict[str, torch.Tensor]:
        return {f"fc.{name}": p for name, p in self.fc.named_parameters()}

    def load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in self.trainable().items():
                tensor.copy_(tensors[name])


class CLIPAdapter(Method):
    name = "clip-adapter"
    title = "CLIP-Adapter"
    paper = "Gao et al., IJCV 2023"
    learns = "a residual MLP on the image features"
    recipe = {"n_ctx": None, "init": None}  # and CoOp's: batch 32, epochs by shots, SGD lr 0.002
    options = {"ratio": Option(0.2, "r, the adapter's share of the blended features", min=0),
               "reduction": Option(4, "the bottleneck's reduction of the feature width", min=1),
               "template": Option(None, "the hand-written prompt, {} for the class name (published: the dataset's)")}
    fixed = {"n_ctx": None, "init": None, "csc": False, "position": "end"}

    def published(self, recipe, dataset):
        if recipe.option("template") is not None:
            return recipe
        key = dataset if dataset in adapter_templates() else "default"
        own = dict(recipe.options) | {"template": adapter_templates(key)[-1]}  # its CUSTOM_TEMPLATES prompt
        return replace(recipe, options=tuple(sorted(own.items())))

    def learner(self, model, tokenizer, classnames, recipe):
        return FeatureAdapter(model, tokenizer, classnames, recipe.option("template"), recipe.option("ratio"),
                              recipe.option("reduction"))

    def loss(self, parts):
        return AdapterLoss(parts.logit_scale, parts.backends.loss)

    def classifier(self, model, learner, backends):
        return AdaptedClassifier(learner, model.logit_scale.exp().detach())


class AdapterLoss:
    """Each run's adapted batch against its text features, with the fused cosine cross-entropy."""

    def __init__(self, logit_scale, loss_backend: str):
        self.logit_scale, self.loss_backend = logit_scale, loss_backend

    def __call__(self, learners, images, labels, sizes):
        adapted = torch.stack([learner.adapt(run_images) for learner, run_images in zip(learners, images)])
        text = torch.stack([learner.text for learner in learners])
        return cosine_ce_runs(adapted, text, self.logit_scale, labels, sizes, backend=self.loss_backend)


class AdaptedClassifier:
    """The text features' classifier on the adapted image features."""

    def __init__(self, learner: FeatureAdapter, logit_scale):
        self.learner, self.text = learner, TextClassifier(learner.text, logit_scale)

    def _adapted(self, image_features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.learner.adapt(image_features.to(self.learner.text.device))

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.text.logits(self._adapted(image_features))

    def predict(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.text.predict(self._adapted(image_features))
