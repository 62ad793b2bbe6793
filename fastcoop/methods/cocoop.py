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
from fastcoop.devices import autocast_dtype
from fastcoop.classifiers import evaluation_backends
from fastcoop.methods.coop import CoOp, check_context
from fastcoop.prompts import PromptLearner
from fastcoop.text_encoder import text_encoder

# evaluation: images per text-encoder call × classes stays about this many prompts, so that memory does not grow
# with the test set (50,000 images × 1,000 classes would be 50 M prompts)
PROMPTS_PER_CALL = 16384


class CoCoOp(CoOp):
    """Its recipe where it differs from CoOp's (configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1): M = 4 from
    "a photo of a", batch size 1, 10 epochs whatever the shot count; one context shared by all classes, before
    the class name. Its runs stack when their prompts are alike (the Meta-Net shifts one layout)."""

    name = "cocoop"
    title = "CoCoOp"
    paper = "Zhou et al., CVPR 2022"
    learns = "M = {n_ctx} vectors ({init}), a Meta-Net"
    recipe = {"n_ctx": 4, "init": "a photo of a", "batch_size": 1, "epochs": 10}
    fixed = {"csc": False, "position": "end"}
    stacks_prompts = False

    def learner(self, model, tokenizer, classnames, recipe):
        learner = CoCoOpLearner(model, tokenizer, classnames, recipe.n_ctx, recipe.init)
        check_context(recipe, learner)
        return learner

    def loss(self, parts):
        return CoCoOpLoss(parts.text_encoder(), parts.logit_scale, parts.autocast_dtype)

    def classifier(self, model, learner, backends):
        return CoCoOpClassifier(model, learner, backends)


class CoCoOpLearner(PromptLearner):
    """A unified context before the class name (M = 4 from "a photo of a" by default, as published) and the
    Meta-Net, Linear(vis_dim → vis_dim/16) → ReLU → Linear(→ ctx_dim), with the published layer names, so that a
    published prompt learner's state dict loads."""

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


class CoCoOpClassifier:
    """Each image's logits against its own K prompts, the images through the text encoder a chunk at a time
    (PROMPTS_PER_CALL prompts per call); on a GPU in bf16, as training runs (`backends.eval_dtype`; the published
    evaluation runs fp16): its work grows with the images."""

    def __init__(self, model, learner: CoCoOpLearner, backends: Backends | None):
        backends = backends or evaluation_backends(model, learner)
        self.model, self.learner = model, learner
        self.dtype = autocast_dtype(backends.eval_dtype)
        self.encoder = text_encoder(model, learner, backends, weight_dtype=self.dtype)

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        per_call = max(1, PROMPTS_PER_CALL // self.learner.num_classes)
        device = self.learner.ctx.device
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.dtype is not None):
            return torch.cat([cocoop_logits(self.model, self.learner, image_features[i:i + per_call].to(device),
                                            encoder=self.encoder).float().cpu()
                              for i in range(0, len(image_features), per_call)])

    def predict(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.logits(image_features).argmax(dim=-1)
