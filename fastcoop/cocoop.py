"""CoCoOp (Zhou et al., "Conditional Prompt Learning for Vision-Language Models", CVPR 2022): CoOp's context plus
a shift π(x) that a small Meta-Net computes from each image's normalised feature, so that every image has its own
K prompts: [SOS][v1+π(x)]…[vM+π(x)][CLASS].[EOS].

`reference` is the published computation (trainers/cocoop.py): per image, its K prompts × 77 tokens through the
text encoder. `fast` gives the same numbers with one pass for the whole batch: each image's context is one of the
fast encoder's stacked contexts (its own shared prefix, the K classes' few tokens attending to it).
"""

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from fastcoop.backends import Backends
from fastcoop.errors import FastCoopError
from fastcoop.prompts import PromptLearner
from fastcoop.text_encoder import text_encoder


class CoCoOpLearner(PromptLearner):
    """A unified context before the class name (M = 4 from "a photo of a" by default, as published) and the
    Meta-Net, Linear(vis_dim → vis_dim/16) → ReLU → Linear(→ ctx_dim), with the published layer names, so that a
    published prompt learner's state dict loads."""

    method = "cocoop"

    def __init__(self, model, tokenizer, classnames, n_ctx: int = 4, init: str | None = "a photo of a"):
        super().__init__(model, tokenizer, classnames, n_ctx, csc=False, position="end", init=init)
        vis_dim, ctx_dim = model.visual.output_dim, self.ctx.shape[-1]
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(vis_dim, vis_dim // 16)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(vis_dim // 16, ctx_dim)),
        ])).to(self.ctx.device)

    def trainable(self) -> dict[str, torch.Tensor]:
        return {"ctx": self.ctx, **{f"meta_net.{name}": p for name, p in self.meta_net.named_parameters()}}

    def contexts(self, image_features: torch.Tensor) -> torch.Tensor:
        """Each image's context, B × M × D: the learned context shifted by the Meta-Net's output for the image's
        L2-normalised feature."""
        shift = self.meta_net(F.normalize(image_features.float(), dim=-1))
        return self.ctx[None] + shift[:, None, :]


def new_learner(model, tokenizer, classnames, config, params: dict[str, torch.Tensor] | None = None
                ) -> PromptLearner:
    """The learner a run's options ask for (a Recipe): CoOp's, or CoCoOp's with its Meta-Net; holding the
    learned `params` (a trained run's, on these class names) when given."""
    if config.method == "cocoop":
        learner = CoCoOpLearner(model, tokenizer, classnames, config.n_ctx, config.init)
    else:
        learner = PromptLearner(model, tokenizer, classnames, config.n_ctx, config.csc, config.position, config.init)
    if config.init is not None and config.n_ctx is not None and config.n_ctx != learner.n_ctx:
        raise FastCoopError(f"--init '{learner.init}' is {learner.n_ctx} token(s), which set M = {learner.n_ctx}; "
                            f"--n-ctx {config.n_ctx} contradicts it: give one of them")
    if params is not None:
        learner.load_trainable(params)
    return learner


def cosine_logits_per_image(image_features: torch.Tensor, text: torch.Tensor, logit_scale) -> torch.Tensor:
    """… × K logits: logit_scale · cos(image, each of that image's own K text features); fp32."""
    image = F.normalize(image_features.float(), dim=-1)
    return logit_scale * torch.einsum("...d,...kd->...k", image, F.normalize(text.float(), dim=-1))


def cocoop_logits(model, learner: CoCoOpLearner, image_features: torch.Tensor, mode: str = "fast",
                  encoder=None) -> torch.Tensor:
    """B × K logits: logit_scale · cos(image b, the K text features of image b's own prompts). `encoder`: one built
    once for `learner` (fastcoop.text_encoder.text_encoder) instead of one per call; else `mode`'s."""
    if encoder is None:
        encoder = text_encoder(model, learner, Backends(text=mode))
    text = encoder(learner.contexts(image_features))
    return cosine_logits_per_image(image_features, text, model.logit_scale.exp())


class CoCoOpLoss:
    """The CoCoOp training loss of stacked runs for TrainStep: each run's batch of images (its first B_r rows of
    R × B × D) gets its own contexts from its learner; all of them go through `encoder` (→ ΣB_r × K × D text
    features) in one call; each image's logits against its own prompts, cross-entropy averaged over each run's
    batch as published. Returns the runs' losses (R) and hits (R)."""

    def __init__(self, encoder, logit_scale, autocast_dtype=None):
        self.encoder, self.logit_scale, self.autocast_dtype = encoder, logit_scale, autocast_dtype

    def __call__(self, learners, images: torch.Tensor, labels: torch.Tensor, sizes: list[int]):
        images = [run_images[:size] for run_images, size in zip(images, sizes)]
        labels = torch.cat([run_labels[:size] for run_labels, size in zip(labels, sizes)])
        with torch.autocast(labels.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None, cache_enabled=False):
            contexts = torch.cat([learner.contexts(run_images) for learner, run_images in zip(learners, images)])
            text = self.encoder(contexts)
        logits = cosine_logits_per_image(torch.cat(images), text, self.logit_scale)
        loss = F.cross_entropy(logits, labels, reduction="none")
        hits = logits.argmax(dim=-1) == labels
        return (torch.stack([run_loss.mean() for run_loss in loss.split(sizes)]),
                torch.stack([run_hits.sum() for run_hits in hits.split(sizes)]))
