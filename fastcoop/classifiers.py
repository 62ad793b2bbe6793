"""Classifiers of image features: predictions (and logits) against fixed K × D text features — learned prompts',
zero-shot CLIP's —, the building block of the methods' classifiers (fastcoop.methods)."""

import torch
import torch.nn.functional as F

from fastcoop.backends import Backends, resolve
from fastcoop.kernels import cosine_ce
from fastcoop.kernels.cosine_ce_reference import cosine_logits
from fastcoop.text_encoder import text_encoder
from fastcoop.text_tower import TextTower


def evaluation_backends(model, learner) -> Backends:
    """The implementations for evaluating a learned prompt where its learner is (the resolver's fast choice)."""
    return resolve(learner.ctx.device, tower=TextTower.of(model))


def prompt_text_features(model, learner, backends: Backends | None = None) -> torch.Tensor:
    """K × D text features of learned prompts, fp32, no autograd graph. `backends`: the training run's, or None
    for evaluation_backends."""
    with torch.no_grad():
        return text_encoder(model, learner, backends or evaluation_backends(model, learner))().float()


def text_classifier(text_features: torch.Tensor, chunk: int = 65536):
    """Predictions against fixed K × D text features (the highest cosine), computed in chunks of images by the
    fused kernel, which never writes the logits."""
    dummy_scale = torch.ones((), device=text_features.device)

    def predict(image_features: torch.Tensor) -> torch.Tensor:
        chunks = [image_features[i:i + chunk].to(text_features.device) for i in range(0, len(image_features), chunk)]
        return torch.cat([torch.empty(0, dtype=torch.long)] + [
            cosine_ce(c, text_features, dummy_scale, torch.zeros(len(c), dtype=torch.long, device=c.device),
                      return_argmax=True)[1].cpu() for c in chunks])
    return predict


class TextClassifier:
    """A classifier of fixed K × D text features: logit_scale · cosine logits, predictions by text_classifier."""

    def __init__(self, text_features: torch.Tensor, logit_scale: torch.Tensor):
        self.text_features, self.logit_scale = text_features, logit_scale
        self.predict = text_classifier(text_features)

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(image_features.to(self.text_features.device), self.text_features, self.logit_scale)


def normalized_mean(features: torch.Tensor) -> torch.Tensor:
    """CLIP's ensembling: mean of L2-normalised features (renormalised later by the cosine)."""
    return F.normalize(features.float(), dim=-1).mean(dim=0)
