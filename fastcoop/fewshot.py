"""Few-shot sampling and class subsets exactly as the published code makes them, so a seed selects the same
images and 'base' the same classes."""

import math
import random

from fastcoop.errors import FastCoopError

CLASS_SUBSETS = ("all", "base", "new")


def sample_few_shot(labels: list[int], shots: int, seed: int) -> list[int]:
    """Indices into `labels`: per class, in order of first appearance, random.sample(items, shots) (all if fewer).

    The published code seeds Python's global `random` with the run's seed and samples per class in that order;
    a private random.Random(seed) gives the same stream without touching global state.
    """
    return _sample(labels, shots, random.Random(seed))


def sample_train_and_val(train_labels: list[int], val_labels: list[int], shots: int, seed: int
                         ) -> tuple[list[int], list[int]]:
    """The few-shot train and val subsets the published code draws for (shots, seed): CoOp's datasets sample the
    train split (`shots` per class) and then the val split (min(shots, 4) per class) from the one random stream
    seeded with the run's seed, so the val images follow from the train split's draws."""
    rng = random.Random(seed)
    train = _sample(train_labels, shots, rng)
    return train, _sample(val_labels, val_shots(shots), rng)


def val_shots(shots: int) -> int:
    """1, 2, 4, 4, 4 val images per class for 1, 2, 4, 8, 16 shots."""
    return min(shots, 4)


def _sample(labels: list[int], shots: int, rng: random.Random) -> list[int]:
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    chosen = []
    for items in by_class.values():
        chosen += rng.sample(items, shots) if len(items) >= shots else items
    return chosen


def parse_shots(value: str) -> int | None:
    """'all' → None (the whole split), else a positive integer."""
    if value == "all":
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"shots must be a positive integer or 'all', not '{value}'")
    return int(value)


def subset_key(shots: int, seed: int) -> str:
    return f"shots{shots}_seed{seed}"


def class_subset(num_classes: int, which: str) -> list[int]:
    """The labels of a class subset, as CoCoOp's base-to-new protocol splits them (subsample_classes): labels in
    order, the first ⌈K/2⌉ are base, the rest new. A label's place in the list is its label within the subset."""
    half = math.ceil(num_classes / 2)
    return {"all": list(range(num_classes)), "base": list(range(half)), "new": list(range(half, num_classes))}[which]


def check_classes(num_classes: int, which: str) -> None:
    """Refuse a class subset too small to train or test a classifier on: one class (its loss is 0, its accuracy
    100 %), or a base-to-new half of one class (H would be inflated)."""
    if which == "all" and num_classes < 2:
        raise FastCoopError(f"a classifier needs at least 2 classes; the cache has {num_classes}")
    if which != "all" and num_classes < 4:
        raise FastCoopError(f"--classes {which}: the base-to-new protocol needs at least 4 classes (2 in each "
                            f"half); the cache has {num_classes}")


def harmonic_mean(base: float | None, new: float | None) -> float | None:
    """H, how the base-to-new protocol sums up base and new accuracy (None where either is missing)."""
    if base is None or new is None:
        return None
    return 2 * base * new / (base + new) if base + new else 0.0


def relabel(labels, kept: list[int]):
    """(which of `labels` belong to `kept`, their labels within it): a torch mask and tensor."""
    import torch

    top = int(labels.max()) if len(labels) else 0
    to_subset = torch.full((max(max(kept), top) + 1,), -1, dtype=torch.long)
    to_subset[kept] = torch.arange(len(kept))
    mapped = to_subset[labels.cpu()]
    return mapped >= 0, mapped[mapped >= 0]
