"""KgCoOp (Yao et al., "Visual-Language Prompt Tuning with Knowledge-guided Context Optimization", CVPR 2023):
CoOp's learner and loss plus a penalty that keeps the learned prompts' class text features near those of the
dataset's hand-written prompt: loss = CE + λ · (1 − mean over classes of cos(w_k, w_clip,k)), λ = 8 as its scripts
run it (htyao89/KgCoOp, trainers/kgcoop.py and scripts/base2new_train.sh).

The hand-written prompt is KgCoOp's per dataset (presets/kgcoop_templates.json, from its CUSTOM_TEMPLATES); a
cache of another dataset uses "a photo of a {}.", the template KgCoOp gives ImageNet and Caltech101.
"""

import json
from importlib import resources

import torch
import torch.nn.functional as F

from fastcoop.classnames import spoken
from fastcoop.models import LoadedModel
from fastcoop.text_tower import TextTower
from fastcoop.zeroshot import zeroshot_classifier

DEFAULT_TEMPLATE = "a photo of a {}."


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
