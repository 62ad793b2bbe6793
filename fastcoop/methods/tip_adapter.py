"""Tip-Adapter and Tip-Adapter-F (Zhang et al., "Tip-Adapter: Training-free Adaption of CLIP for Few-shot
Classification", ECCV 2022) on a feature cache: the few-shot images' features as a second classifier beside
zero-shot CLIP's,

    logits = 100 · f·Wᵀ + α · exp(−(β − β · f·Kᵀ)) · V,

f the test image's normalised feature, W the classes' hand-written prompt features (Tip-Adapter's templates per
dataset, normalised, averaged and normalised again), K the keys (each few-shot image's features averaged over
`augment_epoch` augmented views, then normalised), V their one-hot labels. α and β are searched on the val split
over Tip-Adapter's grid. Tip-Adapter-F also trains the keys (AdamW, eps 1e-4, cosine schedule per batch, batches of
256, a fresh augmented view of every image each epoch), then searches α and β again. The published code is
gaopengcuhk/Tip-Adapter (main.py, utils.py, configs/*.yaml); its recipe per dataset is presets/tip_adapter.json.

Where this differs from the published code, on purpose: the augmented views are the cache's (by default CoOp's
crop scale, 0.08–1, where Tip-Adapter crops at 0.5–1: `fastcoop cache --crop-scale 0.5,1` gives its own, and a
result records the scale); Tip-Adapter-F keeps its last epoch, where the published code keeps the
epoch with the best *test* accuracy (which selects on the test labels); the search runs on the val split for every
dataset (the published ImageNet script searches on test, which for CoOp's ImageNet is the same images).
"""

import json
import math
import warnings
from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F

from fastcoop.cache import FeatureCache
from fastcoop.classnames import spoken
from fastcoop.errors import FastCoopError
from fastcoop.methods import Baseline
from fastcoop.models import LoadedModel
from fastcoop.zeroshot import zeroshot_classifier

BATCH_SIZE = 256  # Tip-Adapter-F's loader (main.py)
TIP_CROP_SCALE = (0.5, 1.0)  # its training views' RandomResizedCrop (main.py)
# the search's logits (α's × images × classes) and affinities held at once: on a GPU as many as memory allows
# comfortably; on the CPU a chunk its caches hold, since the search passes over it once per β
ELEMENTS_PER_CALL = {"cuda": 1 << 25, "cpu": 1 << 22}


@dataclass(frozen=True)
class TipRecipe:
    templates: list[str]
    init_beta: float
    init_alpha: float
    search_scale: list[float]  # β's, α's largest values
    search_step: list[int]  # how many β's, α's
    lr: float
    augment_epoch: int  # augmented views averaged into each key
    train_epoch: int  # Tip-Adapter-F's epochs

    def grid(self) -> tuple[list[float], list[float]]:
        """β and α values searched, as the published search_hp lists them (from 0.1, the largest never reached)."""
        return tuple([i * (scale - 0.1) / steps + 0.1 for i in range(steps)]
                     for scale, steps in zip(self.search_scale, self.search_step))


def tip_recipe(dataset: str | None) -> TipRecipe:
    """Tip-Adapter's recipe for a CoOp dataset (fastcoop's name); another dataset gets Caltech101's, whose prompt is
    CLIP's plain 'a photo of a {}.'."""
    table = json.loads(resources.files("fastcoop").joinpath("presets/tip_adapter.json").read_text())
    return TipRecipe(**table.get(dataset or "", table["caltech101"]))


def tip_datasets() -> list[str]:
    """The datasets Tip-Adapter has a recipe (and templates) for, by fastcoop's names."""
    return list(json.loads(resources.files("fastcoop").joinpath("presets/tip_adapter.json").read_text()))


def cache_model(views: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (n × D): each image's features averaged over its augmented views (V × n × D), then normalised; values
    (n × K): its one-hot label (build_cache_model)."""
    keys = F.normalize(views.float().mean(dim=0), dim=-1)
    return keys, F.one_hot(labels, num_classes).float()


def tip_logits(features: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, clip_weights: torch.Tensor,
               alpha: float, beta: float) -> torch.Tensor:
    """n × K: zero-shot CLIP's logits plus α times the cache's (features and clip_weights normalised)."""
    affinity = features @ keys.t()
    return 100.0 * features @ clip_weights.t() + alpha * torch.exp(-(beta - beta * affinity)) @ values


def search(features: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
           clip_weights: torch.Tensor, recipe: TipRecipe) -> tuple[float, float, float]:
    """(β, α, accuracy) with the best accuracy on (features, labels) over the recipe's grid, the first best in the
    published order (β outer, α inner, a later one only when strictly better); (0, 0, 0) — CLIP alone — when no
    setting gets an image right, as the published search starts from β = α = 0 at accuracy 0.

    The same numbers as the published loop with less work: images a chunk at a time (memory stays bounded), the
    affinities and CLIP's logits once per chunk, the cache's logits once per β, and its product with the one-hot
    values as a sum over each class's keys (a reshape when every class has as many keys)."""
    betas, alphas = recipe.grid()
    num_classes = values.shape[1]
    key_labels = values.argmax(dim=1)
    order = torch.argsort(key_labels, stable=True)
    keys, key_labels = keys[order], key_labels[order]
    per_class = torch.bincount(key_labels, minlength=num_classes)
    balanced = bool((per_class == per_class[0]).all())
    scales = torch.tensor(alphas, device=features.device)[:, None, None]
    hits = torch.zeros(len(betas), len(alphas), dtype=torch.long, device=features.device)
    per_call = ELEMENTS_PER_CALL["cuda" if features.is_cuda else "cpu"]
    rows = max(1, per_call // (len(keys) + len(alphas) * num_classes))
    for start in range(0, len(features), rows):
        chunk, chunk_labels = features[start:start + rows], labels[start:start + rows]
        affinity = chunk @ keys.t()
        clip_logits = 100.0 * chunk @ clip_weights.t()
        for b, beta in enumerate(betas):
            # exp(−(β − β·a)) as exp(β·a − β): the same value (x − β = −(β − x) exactly), in place
            similarity = (affinity * beta).sub_(beta).exp_()
            if balanced:
                cache_logits = similarity.view(len(chunk), num_classes, -1).sum(dim=-1)
            else:
                cache_logits = similarity.new_zeros(len(chunk), num_classes).index_add_(1, key_labels, similarity)
            predicted = (clip_logits + scales * cache_logits).argmax(dim=-1)
            hits[b] += (predicted == chunk_labels).sum(dim=1)
    best = int(hits.flatten().argmax())  # the first of the best, β-major as the published loops run
    if hits.flatten()[best] == 0:  # no setting gets any image right: the published search keeps CLIP alone
        return 0.0, 0.0, 0.0
    return betas[best // len(alphas)], alphas[best % len(alphas)], hits.flatten()[best].item() / len(labels)


def finetune(keys: torch.Tensor, values: torch.Tensor, clip_weights: torch.Tensor, epoch_views: list[torch.Tensor],
             labels: torch.Tensor, recipe: TipRecipe, seed: int = 1) -> torch.Tensor:
    """Tip-Adapter-F: the keys trained as a linear layer's weight with β, α at their initial values; epoch e on
    `epoch_views[e]` (n × D, a fresh augmented view of every image), shuffled batches of 256 (the last one
    smaller), AdamW (eps 1e-4, its default weight decay) on a cosine schedule over all batches. Returns the keys."""
    weight = torch.nn.Parameter(keys.clone())
    optimizer = torch.optim.AdamW([weight], lr=recipe.lr, eps=1e-4)
    batches = math.ceil(len(labels) / BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe.train_epoch * batches)
    generator = torch.Generator().manual_seed(seed)
    for features in epoch_views:
        order = torch.randperm(len(labels), generator=generator).to(labels.device)
        for rows in order.split(BATCH_SIZE):
            batch = F.normalize(features[rows].float(), dim=-1)
            affinity = batch @ weight.t()
            logits = 100.0 * batch @ clip_weights.t() + recipe.init_alpha * torch.exp(
                -(recipe.init_beta - recipe.init_beta * affinity)) @ values
            loss = F.cross_entropy(logits, labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return weight.detach()


def check_cache(cache: FeatureCache) -> None:
    """What Tip-Adapter needs of a cache, checked by a command before any work: val and test splits; warnings when
    its keys would average fewer augmented views than published, or views not cropped as its own code crops
    them (said once, here: run_tip_adapter checks only the splits)."""
    _check_splits(cache)
    if cache.crop_scale != TIP_CROP_SCALE:
        low, high = cache.crop_scale
        warnings.warn(f"Tip-Adapter's keys average {cache.path}'s views, cropped at scale {low:g}–{high:g}; its "
                      "published code crops at 0.5–1: cache with --crop-scale 0.5,1 for its own views")
    augmented, needed = cache.num_views("train") - 1, tip_recipe(cache.dataset).augment_epoch
    if augmented < needed:
        warnings.warn(f"Tip-Adapter averages {needed} augmented views per key; {cache.path} holds {augmented}, so "
                      f"its keys average {augmented or 'only the un-augmented view'} (recorded in the result): "
                      f"cache with --views {needed} or more for the published keys")


def _check_splits(cache: FeatureCache) -> None:
    for split in ("val", "test"):
        if split not in cache.splits:
            raise FastCoopError(f"Tip-Adapter searches α and β on the val split and tests on test; {cache.path} has "
                                f"no {split} split: cache it with --splits train,val,test")


def run_tip_adapter(cache: FeatureCache, loaded: LoadedModel, subsets: list[tuple[int, int]], finetuned: bool,
                    device: str = "cpu") -> list[dict]:
    """Zero-shot CLIP, Tip-Adapter and (with `finetuned`) Tip-Adapter-F on each of a cache's (shots, seed) subsets:
    α and β searched on val, accuracies on test; CLIP's classifier and the val and test features made once for all
    of them. Needs the val and test splits; with fewer augmented views cached than the recipe's, the keys average
    those there are (the un-augmented view when none), as each result records."""
    _check_splits(cache)
    recipe = tip_recipe(cache.dataset)
    names = [spoken(name) for name in cache.classnames]
    clip_weights = clip_classifier(loaded, names, recipe.templates, device)
    val, test = ((F.normalize(cache.features(s, view=0).float().to(device), dim=-1), cache.labels(s).to(device))
                 for s in ("val", "test"))
    zero_shot = {"val": _accuracy(val[0] @ clip_weights.t(), val[1]),
                 "test": _accuracy(test[0] @ clip_weights.t(), test[1])}
    return [{**_on_subset(cache, recipe, shots, seed, finetuned, clip_weights, val, test, device),
             "zero_shot": zero_shot} for shots, seed in subsets]


def clip_classifier(loaded: LoadedModel, names: list[str], templates: list[str], device: str = "cpu") -> torch.Tensor:
    """K × D: CLIP's classifier as Tip-Adapter builds it (utils.clip_classifier): each class's template features
    normalised, averaged, and the mean normalised again (its logits are 100 · f·w, with no cosine to do that)."""
    return F.normalize(zeroshot_classifier(loaded, names, templates, device=device).float(), dim=-1)


def _first_views(augmented: int, wanted: int) -> slice:
    """The first `wanted` of a cache's `augmented` views per image (as many as it holds), or its un-augmented view
    (view 0) when it holds none."""
    return slice(1, 1 + min(augmented, wanted)) if augmented else slice(0, 1)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def _on_subset(cache: FeatureCache, recipe: TipRecipe, shots: int, seed: int, finetuned: bool,
               clip_weights: torch.Tensor, val: tuple, test: tuple, device: str) -> dict:
    """Tip-Adapter (and -F) on one (shots, seed) subset's keys."""
    augmented = cache.num_views("train") - 1
    key_views = _first_views(augmented, recipe.augment_epoch)
    rows = cache.rows("train", shots, seed)
    train_labels = cache.labels("train", rows).to(device)
    keys, values = cache_model(cache.features("train", rows, key_views).to(device), train_labels,
                               len(cache.classnames))
    result = {"method": "tip-adapter", "shots": shots, "seed": seed, "dataset": cache.dataset,
              "templates": recipe.templates, "crop_scale": list(cache.crop_scale),
              "augmentation": {"cached_views": augmented, "key_views": key_views.stop - key_views.start,
                               "published_key_views": recipe.augment_epoch}}
    beta, alpha, val_acc = search(*val, keys, values, clip_weights, recipe)
    result["tip_adapter"] = {"beta": beta, "alpha": alpha, "val": val_acc,
                             "test": _accuracy(tip_logits(test[0], keys, values, clip_weights, alpha, beta), test[1])}
    if finetuned:
        # views the keys were not averaged from, while the cache holds enough; else its views in turn
        fresh = 1 + recipe.augment_epoch + recipe.train_epoch <= 1 + augmented
        used = slice(1 + recipe.augment_epoch, 1 + recipe.augment_epoch + recipe.train_epoch) if fresh else \
            _first_views(augmented, recipe.train_epoch)
        views = cache.features("train", rows, used).to(device)  # only the views the epochs use
        epoch_views = [views[e % len(views)] for e in range(recipe.train_epoch)]
        tuned = finetune(keys, values, clip_weights, epoch_views, train_labels, recipe, seed)
        beta, alpha, val_acc = search(*val, tuned, values, clip_weights, recipe)
        result["augmentation"]["finetune_views"] = used.stop - used.start  # distinct views over its epochs
        result["tip_adapter_f"] = {"beta": beta, "alpha": alpha, "val": val_acc, "epochs": recipe.train_epoch,
                                   "test": _accuracy(tip_logits(test[0], tuned, values, clip_weights, alpha, beta),
                                                     test[1])}
    return result


class TipAdapter(Baseline):
    """Tip-Adapter (`finetuned` False) or Tip-Adapter-F beside a sweep's runs: each row its test top-1 and the
    β and α chosen on val (Tip-Adapter-F's rows the search after its training)."""

    why_val = "it searches α and β on val"
    paper = "Zhang et al., ECCV 2022"

    def __init__(self, name: str, title: str, finetuned: bool):
        self.name, self.title, self.finetuned = name, title, finetuned

    def check(self, cache, subsets) -> None:
        check_cache(cache)

    def run(self, cache, loaded, subsets, device):
        key = "tip_adapter_f" if self.finetuned else "tip_adapter"
        return [{"shots": row["shots"], "seed": row["seed"], **row[key], "augmentation": row["augmentation"]}
                for row in run_tip_adapter(cache, loaded, subsets, self.finetuned, device)]


TIP_ADAPTER = TipAdapter("tip-adapter", "Tip-Adapter", finetuned=False)
TIP_ADAPTER_F = TipAdapter("tip-adapter-f", "Tip-Adapter-F", finetuned=True)
