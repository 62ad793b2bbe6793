"""LP++ (Huang et al., "LP++: A Surprisingly Strong Linear Probe for Few-Shot CLIP", CVPR 2024;
FereshteShakeri/FewShot-CLIP-Strong-Baseline, methods/linear_probe_p2.py): a linear probe on the normalised image
features blended, class by class, with CLIP's text classifier T: logits = W f + b + α_k (f · T_k), its step sizes
and start derived from the data, with no hyper-parameter to search.

As the published code runs it (configs/base.yaml: 300 epochs): the training features are one augmented view of
each few-shot image, normalised; T is Tip-Adapter's classifier (its templates for the dataset, each normalised,
averaged, normalised again); W starts at each class's sum of features, b as nn.Linear starts it, α at 250 · the
mean of the per-class mean text scores (× shots, ÷ shots); every epoch is one full-batch step: W and b by SGD
(momentum 0.9) at lr_w = 4N / the largest eigenvalue of FᵀF, α by gradient descent every 10th epoch with the
gradient summed over every epoch so far (its .grad is never zeroed) at lr_α = N / (4 · the largest class's
Σ (F T)²).

Where this differs from the published code, on purpose: the run keeps its last epoch, where the published code
keeps the epoch of the best accuracy on a few-shot val split (which makes LP++ need val); the augmented view is
the cache's (by default CoOp's crop scale 0.08–1, where the published code crops at 0.5–1: `fastcoop cache
--crop-scale 0.5,1` gives its own); the step sizes are computed in float64 (the published code: in CLIP's fp16).
"""

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from fastcoop.classnames import spoken
from fastcoop.methods import WHOLE_SET, Method, Option
from fastcoop.errors import FastCoopError
from fastcoop.methods.tip_adapter import tip_datasets, tip_recipe
from fastcoop.text_tower import TextTower
from fastcoop.zeroshot import ensemble_features

ALPHA_EVERY = 10  # α moves every 10th epoch
ALPHA_START = 250  # alpha_init = 250 / shots · (shots · the mean text scores)


class BlendedProbe(nn.Module):
    """W (K × D), b (K), α (K) by the published names' parts, and CLIP's text classifier T (`text_weights`); its
    step sizes (`lr_w`, `lr_alpha`) once prepare has seen its training features."""

    def __init__(self, model, tokenizer, classnames: list[str], templates: list[str]):
        super().__init__()
        self.classnames = list(classnames)
        where = TextTower.of(model).positional_embedding.device
        texts = [[t.format(spoken(name)) for t in templates] for name in classnames]
        self.register_buffer("text_weights", F.normalize(ensemble_features(model, tokenizer, texts, str(where)),
                                                         dim=-1))
        linear = nn.Linear(self.text_weights.shape[1], len(classnames))  # the published start of b (and W, replaced)
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = nn.Parameter(linear.bias.detach().clone())
        self.alpha = nn.Parameter(torch.zeros(len(classnames)))

    def trainable(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias, "alpha": self.alpha}

    def load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in self.trainable().items():
                tensor.copy_(tensors[name])

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """n × K: W f + b + α (f · T), f normalised."""
        f = F.normalize(image_features.float(), dim=-1)
        return f @ self.weight.t() + self.bias + self.alpha * (f @ self.text_weights.t())

    def start_from(self, features: torch.Tensor, labels: torch.Tensor, shots: int) -> None:
        """W, α and the step sizes from the run's training features (n × D, normalised here) and labels."""
        f = F.normalize(features.float(), dim=-1)
        one_hot = F.one_hot(labels, len(self.classnames)).float()
        scores = f @ self.text_weights.t()  # F T, n × K
        alpha_tilde = (one_hot.t() @ scores) / one_hot.sum(0)[:, None]  # each class's mean scores, K × K
        alpha = (ALPHA_START / shots * (alpha_tilde.double() * shots)).mean()
        largest = torch.linalg.eigvalsh(f.double().t() @ f.double()).max()
        with torch.no_grad():
            self.weight.copy_(one_hot.t() @ f)  # each class's sum of features
            self.alpha.fill_(alpha.item())
        self.register_buffer("lr_w", (4 * len(f) / largest).float(), persistent=False)
        self.register_buffer("lr_alpha", (len(f) / (scores.double().pow(2).sum(0).max() * 4)).float(),
                             persistent=False)


class LPPlusPlus(Method):
    name = "lp++"
    title = "LP++"
    paper = "Huang et al., CVPR 2024"
    learns = "a probe blended class-wise with the text classifier"
    recipe = {"n_ctx": None, "init": None, "batch_size": WHOLE_SET, "epochs": 300, "lr": 1.0, "weight_decay": 0.0}
    options = {"templates": Option(None, "whose Tip-Adapter templates make the text classifier, a dataset's name "
                                         "(published: the cache's dataset's)")}
    fixed = {"n_ctx": None, "init": None, "csc": False, "position": "end"}
    pooled_views = 1  # one augmented view of each image, every epoch

    def published(self, recipe, dataset):
        if recipe.option("templates") is not None:
            if recipe.option("templates") not in tip_datasets():
                raise FastCoopError(f"-o templates takes a dataset's name ({', '.join(tip_datasets())}), not "
                                    f"'{recipe.option('templates')}'")
            return recipe
        return replace(recipe, options=tuple(sorted((dict(recipe.options) | {"templates": dataset or ""}).items())))

    def learner(self, model, tokenizer, classnames, recipe):
        return BlendedProbe(model, tokenizer, classnames, tip_recipe(recipe.option("templates") or None).templates)

    def prepare(self, parts):
        for learner, views, labels, recipe in zip(parts.learners, parts.train_views, parts.train_labels,
                                                  parts.recipes):
            learner.start_from(views[0].to(parts.device), labels.to(parts.device), recipe.shots or 1)

    def lr_at(self, epoch, recipe):
        return recipe.lr  # a constant multiplier of the run's own step sizes

    def optimizer(self, recipe):
        return BlendedProbeUpdate()

    def loss(self, parts):
        return BlendedProbeLoss()

    def classifier(self, model, learner, backends):
        return BlendedClassifier(learner)

    def per_class(self, recipe):
        return ("weight", "bias", "alpha")


class BlendedProbeLoss:
    """Each run's cross-entropy over its (whole) batch, its hits."""

    def __call__(self, learners, images, labels, sizes):
        losses, hits = [], []
        for learner, run_images, run_labels, size in zip(learners, images, labels, sizes):
            logits = learner.logits(run_images[:size])
            losses.append(F.cross_entropy(logits, run_labels[:size]))
            hits.append((logits.argmax(-1) == run_labels[:size]).sum())
        return torch.stack(losses), torch.stack(hits)


class BlendedProbeUpdate:
    """LP++'s update of (W, b, α): W and b as torch.optim.SGD with momentum 0.9 at lr · lr_w; α's gradient summed
    into `grad_sum` every step and, every ALPHA_EVERY-th step, α −= lr · lr_α · that sum."""

    state_names = ("momentum", "grad_sum", "steps")

    def describe(self, lr: float) -> str:
        return "SGD and GD, steps from the data"

    def new_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"momentum": torch.zeros_like(param), "grad_sum": torch.zeros_like(param),
                "steps": torch.zeros((), device=param.device)}

    def update_(self, params, grads, state, lr, learner) -> None:
        (weight, bias, alpha), (g_weight, g_bias, g_alpha) = params, grads
        for param, grad, buffer in zip((weight, bias), (g_weight, g_bias), state["momentum"]):
            buffer.mul_(0.9).add_(grad)
            param.sub_(lr * learner.lr_w * buffer)
        steps, grad_sum = state["steps"][2], state["grad_sum"][2]
        steps.add_(1)
        grad_sum.add_(g_alpha)
        alpha.sub_(torch.where(torch.remainder(steps, ALPHA_EVERY) == 0, lr * learner.lr_alpha, 0.0) * grad_sum)


class BlendedClassifier:
    def __init__(self, learner: BlendedProbe):
        self.learner = learner

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.learner.logits(image_features.to(self.learner.weight.device)).cpu()

    def predict(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.logits(image_features).argmax(-1)
