"""Few-shot sampling exactly as the published CoOp code does it, so a seed selects the same images."""

import random


def sample_few_shot(labels: list[int], shots: int, seed: int) -> list[int]:
    """Indices into `labels`: per class, in order of first appearance, random.sample(items, shots) (all if fewer).

    The published code seeds Python's global `random` with the run's seed and samples per class in that order;
    a private random.Random(seed) gives the same stream without touching global state.
    """
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    rng = random.Random(seed)
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
