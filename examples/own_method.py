"""CoOp with a learned temperature: CoOp's context, and the logit scale 1/τ learned beside it, from 1/τ₀. A whole
fastcoop method in one file; every command runs it as it runs the built-in ones:

    fastcoop train CACHE --out run --method examples/own_method.py:LearnedTemperature -o temperature_init=0.02
    fastcoop sweep CACHE --out sweep --method coop,examples/own_method.py:LearnedTemperature
"""

import math

import torch
import torch.nn.functional as F

from fastcoop.classifiers import TextClassifier, prompt_text_features
from fastcoop.methods import Option
from fastcoop.methods.coop import CoOp, CoOpLoss
from fastcoop.prompts import PromptLearner


class LearnedTemperature(CoOp):
    name = "coop-temperature"
    title = "CoOp + learned temperature"
    paper = "fastcoop's example of a method of your own"
    learns = "CoOp's context and the temperature"
    options = {"temperature_init": Option(0.01, "τ₀, the temperature at the start (CLIP's: 0.01)", min=1e-4)}

    def learner(self, model, tokenizer, classnames, recipe):
        return TemperatureLearner(model, tokenizer, classnames, recipe.n_ctx, recipe.csc, recipe.position,
                                  recipe.init, temperature_init=recipe.option("temperature_init"))

    def loss(self, parts):
        return TemperatureLoss(parts.text_encoder(), parts.logit_scale, parts.autocast_dtype)

    def classifier(self, model, learner, backends):
        return TextClassifier(prompt_text_features(model, learner, backends), learner.log_scale.exp().detach())


class TemperatureLearner(PromptLearner):
    """CoOp's context and log(1/τ); trainable() names what runs learn, save and load."""

    def __init__(self, *layout, temperature_init: float):
        super().__init__(*layout)
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / temperature_init), device=self.ctx.device))

    def trainable(self):
        return {"ctx": self.ctx, "log_scale": self.log_scale}


class TemperatureLoss(CoOpLoss):
    """Each run's cosine logits × its own learned scale, cross-entropy over its batch (its first sizes[r] rows)."""

    def __call__(self, learners, images, labels, sizes):
        text = F.normalize(self.text_features(learners).float(), dim=-1)  # R × K × D
        scales = torch.stack([learner.log_scale.exp() for learner in learners])
        logits = scales[:, None, None] * F.normalize(images.float(), dim=-1) @ text.transpose(1, 2)  # R × B × K
        losses = [F.cross_entropy(logits[r, :n], labels[r, :n]) for r, n in enumerate(sizes)]
        hits = [(logits[r, :n].argmax(-1) == labels[r, :n]).sum() for r, n in enumerate(sizes)]
        return torch.stack(losses), torch.stack(hits)
