"""Accuracy of text classifiers (learned prompts or zero-shot prompts) on cached image features."""

import torch
import torch.nn.functional as F

from fastcoop.backends import Backends
from fastcoop.cache import FeatureCache
from fastcoop.errors import FastCoopError
from fastcoop.fewshot import class_subset, relabel
from fastcoop.kernels import cosine_ce
from fastcoop.run import Run, with_classnames
from fastcoop.text_encoder import FastTextEncoder


def prompt_text_features(model, learner, backends: Backends | None = None) -> torch.Tensor:
    """K × D text features of learned prompts, fp32, no autograd graph."""
    with torch.no_grad():
        return FastTextEncoder(model, learner, backends)().float()


def run_text_features(run: Run) -> torch.Tensor:
    return prompt_text_features(run.loaded.model, run.learner)


def run_on_classes(run: Run, cache: FeatureCache, classes: str | None) -> tuple[Run, str]:
    """The run (and the class subset) to test on `cache`: by default the classes it was trained on; a run trained
    on the base half of the base-to-new protocol can also be tested on the new half, its context carried over."""
    trained_on = run.config["train"].get("classes", "all")
    names = {which: [cache.classnames[k] for k in class_subset(len(cache.classnames), which)]
             for which in ("all", "base", "new")}
    if run.learner.classnames != names[trained_on]:
        raise FastCoopError(f"{cache.path} has other class names than the prompt it is asked to test")
    classes = classes or trained_on
    if classes == trained_on:
        return run, classes
    if (trained_on, classes) != ("base", "new"):
        raise FastCoopError(f"the run was trained on {trained_on} classes: test it on those"
                            + (", or, trained on base classes, on the new ones" if trained_on == "base" else ""))
    return with_classnames(run, names["new"]), classes


def check_same_model(cache: FeatureCache, model: str, pretrained: str) -> None:
    if (cache.model, cache.pretrained) != (model, pretrained):
        raise FastCoopError(f"{cache.path} was made with {cache.model} '{cache.pretrained}', the prompt with "
                            f"{model} '{pretrained}': image and text features would not match")


def accuracy(image_features: torch.Tensor, labels: torch.Tensor, text_features: torch.Tensor,
             chunk: int = 65536) -> dict:
    """Top-1 accuracy and mean per-class accuracy (balanced accuracy), computed in chunks of images."""
    dummy_scale = torch.ones((), device=text_features.device)
    predicted = torch.cat([
        cosine_ce(image_features[i:i + chunk].to(text_features.device), text_features, dummy_scale,
                  labels[i:i + chunk].to(text_features.device), return_argmax=True)[1].cpu()
        for i in range(0, len(labels), chunk)])
    correct = (predicted == labels).float()
    num_classes = text_features.shape[0]
    per_class = torch.zeros(num_classes).index_add_(0, labels, correct)
    counts = torch.bincount(labels, minlength=num_classes).float()
    present = counts > 0
    return {"top1": correct.mean().item(), "mean_per_class": (per_class[present] / counts[present]).mean().item(),
            "images": len(labels)}


def evaluate_split(cache: FeatureCache, text_features: torch.Tensor, split: str = "test",
                   classes: str = "all") -> dict:
    """Accuracy on a split's images of a class subset (all, or the base-to-new protocol's base or new half),
    among that subset's classes; `text_features` holds one row per class of the subset."""
    kept = class_subset(len(cache.classnames), classes)
    if len(text_features) != len(kept):
        raise FastCoopError(f"the prompt has {len(text_features)} classes, {cache.path} has {len(kept)}"
                            + ("" if classes == "all" else f" {classes} classes"))
    in_subset, labels = relabel(cache.labels(split), kept)
    return accuracy(cache.features(split, view=0).float()[in_subset], labels, text_features)


def normalized_mean(features: torch.Tensor) -> torch.Tensor:
    """CLIP's ensembling: mean of L2-normalised features (renormalised later by the cosine)."""
    return F.normalize(features.float(), dim=-1).mean(dim=0)
