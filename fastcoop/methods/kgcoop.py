"""KgCoOp (Yao et al., "Visual-Language Prompt Tuning with Knowledge-guided Context Optimization", CVPR 2023):
CoOp's learner and loss plus a penalty that keeps the learned prompts' class text features near those of the
dataset's hand-written prompt: loss = CE + λ · (1 − mean over classes of cos(w_k, w_clip,k)), λ = 8 as its scripts
run it (htyao89/KgCoOp, trainers/kgcoop.py and scripts/base2new_train.sh).

The hand-written prompt is KgCoOp's per dataset (presets/kgcoop_templates.json, from its CUSTOM_TEMPLATES); a
cache of another dataset uses "a photo of a {}.", the template KgCoOp gives ImageNet and Caltech101.
"""

import json
from dataclasses import replace
from importlib import resources

import torch
import torch.nn.functional as F

from fastcoop.classnames import spoken
from fastcoop.kernels import cosine_ce_runs
from fastcoop.methods import Option
from fastcoop.methods.coop import CoOp, CoOpLoss
from fastcoop.models import LoadedModel
from fastcoop.text_tower import TextTower
from fastcoop.zeroshot import zeroshot_classifier

DEFAULT_TEMPLATE = "a photo of a {}."


class KgCoOp(CoOp):
    """CoOp's learner, classifier and SGD; its recipe (configs/trainers/KgCoOp/vit_b16_ep100_ctxv1,
    scripts/base2new_train.sh): M = 4 from "a photo of a", batch size 128, 100 epochs, λ = 8."""

    name = "kgcoop"
    title = "KgCoOp"
    paper = "Yao et al., CVPR 2023"
    learns = "CoOp's context ({init}), near a hand-written prompt"
    recipe = {"n_ctx": 4, "init": "a photo of a", "batch_size": 128, "epochs": 100}
    options = {"kg_weight": Option(8.0, "λ, the weight of the distance to the hand-written prompt", min=0),
               "kg_template": Option(None, "the hand-written prompt, {} for the class name (published: KgCoOp's "
                                           "for the dataset)")}

    def published(self, recipe, dataset):
        if recipe.option("kg_template") is not None:
            return recipe
        own = dict(recipe.options) | {"kg_template": hand_written_template(dataset)}
        return replace(recipe, options=tuple(sorted(own.items())))

    def loss(self, parts):
        base = parts.recipes[0]
        anchor = hand_written_features(parts.loaded, parts.classnames, base.option("kg_template"), parts.device)
        return KgCoOpLoss(parts.text_encoder(), parts.logit_scale, parts.autocast_dtype, parts.backends.loss,
                          anchor, base.option("kg_weight"))


class KgCoOpLoss(CoOpLoss):
    """CoOp's loss plus λ · knowledge_gap(the runs' text features, `anchor`: K × D, the hand-written prompts')."""

    def __init__(self, encoder, logit_scale, autocast_dtype, loss_backend: str, anchor: torch.Tensor,
                 weight: float):
        super().__init__(encoder, logit_scale, autocast_dtype, loss_backend)
        self.anchor, self.weight = anchor, weight

    def __call__(self, learners, images, labels, sizes):
        text = self.text_features(learners)
        losses, hits = cosine_ce_runs(images, text, self.logit_scale, labels, sizes, backend=self.loss_backend)
        return losses + self.weight * knowledge_gap(text, self.anchor), hits


def hand_written_template(dataset: str | None) -> str:
    """KgCoOp's hand-written prompt for a CoOp dataset (by fastcoop's dataset name), else DEFAULT_TEMPLATE."""
    table = json.loads(resources.files("fastcoop").joinpath("presets/kgcoop_templates.json").read_text())
    return table.get(dataset or "", DEFAULT_TEMPLATE)


def hand_written_features(loaded: LoadedModel, classnames: list[str], template: str, device) -> torch.Tensor:
    """K × D: the frozen text encoder's normalised features of `template` filled with each class name (underscores
    as spaces, as KgCoOp writes them; computed where the text tower is, then moved to `device`)."""
    where = TextTower.of(loaded.model).positional_embedding.device
    names = [spoken(name) for name in classnames]
    return zeroshot_classifier(loaded, names, [template], device=str(where)).to(device)


def knowledge_gap(text_features: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """1 − the mean over classes of cos(learned, hand-written) (K × D each), as KgCoOp computes it (both
    normalised first, CosineSimilarity with eps 1e-7); fp32. Stacked runs' text features (R × K × D) give each
    run's (R)."""
    learned = F.normalize(text_features.float(), dim=-1)
    return 1.0 - F.cosine_similarity(learned, F.normalize(anchor.float(), dim=-1), dim=-1, eps=1e-7).mean(-1)
