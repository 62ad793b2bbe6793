"""Accuracy of classifiers (a run's method's, or zero-shot prompts': fastcoop.classifiers) on cached image features,
on a run's own classes, the other half of base-to-new, or another dataset's."""

import torch

from fastcoop.cache import FeatureCache
from fastcoop.classnames import spoken
from fastcoop.errors import FastCoopError
from fastcoop.fewshot import class_subset, relabel
from fastcoop.run import Run, with_classnames


def run_on_classes(run: Run, cache: FeatureCache, classes: str | None) -> tuple[Run, str]:
    """The run (and the class subset) to test on `cache`: by default the classes it was trained on; a run trained
    on the base half of the base-to-new protocol can also be tested on the new half, its context carried over. On a
    cache with other class names — another dataset (cross-dataset transfer), or a named subset of the run's classes
    (ImageNet-A and -R) — the run is tested on the cache's classes: a context shared by all classes carries over
    to any; a class-specific one only to the classes it has a context for."""
    trained_on = run.config["train"].get("classes", "all")
    names = {which: [spoken(cache.classnames[k]) for k in class_subset(len(cache.classnames), which)]
             for which in ("all", "base", "new")}
    if run.learner.classnames != names[trained_on]:
        if classes not in (None, "all"):
            raise FastCoopError(f"--classes {classes} names a half of the run's own dataset; {cache.path} has "
                                "other class names: test the run on all of them")
        return with_classnames(run, names["all"], cache.class_ids), "all"
    classes = classes or trained_on
    if classes == trained_on:
        return run, classes
    if (trained_on, classes) != ("base", "new"):
        raise FastCoopError(f"the run was trained on {trained_on} classes: test it on those"
                            + (", or, trained on base classes, on the new ones" if trained_on == "base" else ""))
    return with_classnames(run, names["new"]), classes


def score_run(run: Run, cache: FeatureCache, split: str = "test",
              classes: str | None = None) -> tuple[dict, str]:
    """A run's scores on a cache's split (run_on_classes: its own classes by default, or the cache's), and the
    class subset they are of."""
    run, classes = run_on_classes(run, cache, classes)
    return evaluate_split(cache, run.classifier().predict, split, classes), classes


def check_same_model(cache: FeatureCache, model: str, pretrained: str) -> None:
    if (cache.model, cache.pretrained) != (model, pretrained):
        raise FastCoopError(f"{cache.path} was made with {cache.model} '{cache.pretrained}', the prompt with "
                            f"{model} '{pretrained}': image and text features would not match")


def scores(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Top-1 accuracy and mean per-class accuracy (balanced accuracy)."""
    correct = (predicted == labels).float()
    per_class = torch.zeros(num_classes).index_add_(0, labels, correct)
    counts = torch.bincount(labels, minlength=num_classes).float()
    present = counts > 0
    return {"top1": correct.mean().item(), "mean_per_class": (per_class[present] / counts[present]).mean().item(),
            "images": len(labels)}


def evaluate_split(cache: FeatureCache, classify, split: str = "test", classes: str = "all") -> dict:
    """Accuracy on a split's images of a class subset (all, or the base-to-new protocol's base or new half),
    among that subset's classes; `classify` (a classifier's predict) predicts among those classes."""
    kept = class_subset(len(cache.classnames), classes)
    in_subset, labels = relabel(cache.labels(split), kept)
    return scores(classify(cache.features(split, view=0).float()[in_subset]), labels, len(kept))
