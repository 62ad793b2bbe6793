"""Accuracy of text classifiers (learned prompts or zero-shot prompts) on cached image features. A classifier is a
function from image features (n × D) to predicted labels: fixed text features (CoOp, zero-shot) or per-image
prompts (CoCoOp)."""

import torch
import torch.nn.functional as F

from fastcoop.backends import Backends, resolve
from fastcoop.cache import FeatureCache
from fastcoop.cocoop import cocoop_logits
from fastcoop.devices import autocast_dtype
from fastcoop.classnames import spoken
from fastcoop.errors import FastCoopError
from fastcoop.fewshot import class_subset, relabel
from fastcoop.kernels import cosine_ce
from fastcoop.run import Run, with_classnames
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


def run_text_features(run: Run) -> torch.Tensor:
    return prompt_text_features(run.loaded.model, run.learner)


# CoCoOp evaluation: images per text-encoder call × classes stays about this many prompts, so that memory does not
# grow with the test set (50,000 images × 1,000 classes would be 50 M prompts)
PROMPTS_PER_CALL = 16384


def text_classifier(text_features: torch.Tensor, chunk: int = 65536):
    """Predictions against fixed K × D text features (the highest cosine), computed in chunks of images."""
    dummy_scale = torch.ones((), device=text_features.device)

    def predict(image_features: torch.Tensor) -> torch.Tensor:
        chunks = [image_features[i:i + chunk].to(text_features.device) for i in range(0, len(image_features), chunk)]
        return torch.cat([torch.empty(0, dtype=torch.long)] + [
            cosine_ce(c, text_features, dummy_scale, torch.zeros(len(c), dtype=torch.long, device=c.device),
                      return_argmax=True)[1].cpu() for c in chunks])
    return predict


def prompt_classifier(model, learner, backends: Backends | None = None):
    """A learned prompt's predictions: CoOp's K text features are computed once; CoCoOp's prompts depend on each
    image, so images go through the text encoder a chunk at a time (PROMPTS_PER_CALL prompts per call)."""
    backends = backends or evaluation_backends(model, learner)
    if learner.method != "cocoop":
        return text_classifier(prompt_text_features(model, learner, backends))
    # backends.eval_dtype: on GPU bf16, as training runs (the published evaluation runs fp16): its work grows with
    # the images
    dtype = autocast_dtype(backends.eval_dtype)
    encoder = text_encoder(model, learner, backends, weight_dtype=dtype)
    per_call = max(1, PROMPTS_PER_CALL // learner.num_classes)

    def predict(image_features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype is not None):
            return torch.cat([torch.empty(0, dtype=torch.long)] + [
                cocoop_logits(model, learner, image_features[i:i + per_call].to(learner.ctx.device),
                              encoder=encoder).argmax(dim=-1).cpu() for i in range(0, len(image_features), per_call)])
    return predict


def run_classifier(run: Run):
    return prompt_classifier(run.loaded.model, run.learner)


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
    return evaluate_split(cache, run_classifier(run), split, classes), classes


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
    among that subset's classes; `classify` (text_classifier, prompt_classifier) predicts among those classes."""
    kept = class_subset(len(cache.classnames), classes)
    in_subset, labels = relabel(cache.labels(split), kept)
    return scores(classify(cache.features(split, view=0).float()[in_subset]), labels, len(kept))


def normalized_mean(features: torch.Tensor) -> torch.Tensor:
    """CLIP's ensembling: mean of L2-normalised features (renormalised later by the cosine)."""
    return F.normalize(features.float(), dim=-1).mean(dim=0)
