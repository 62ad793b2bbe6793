import random
from collections import defaultdict

from fastcoop.fewshot import sample_few_shot


def published_rule(labels, shots, seed):
    """The published code's rule, written out independently: global random, classes by first appearance."""
    random.seed(seed)
    tracker = defaultdict(list)
    for i, label in enumerate(labels):
        tracker[label].append(i)
    out = []
    for label, items in tracker.items():
        out.extend(random.sample(items, shots) if len(items) >= shots else items)
    return out


def test_same_images_as_published_rule():
    rng = random.Random(123)
    labels = [rng.randrange(7) for _ in range(400)]
    labels += [7, 7]  # a class with fewer images than shots
    for seed in (1, 2, 3):
        for shots in (1, 2, 4, 16):
            assert sample_few_shot(labels, shots, seed) == published_rule(labels, shots, seed)


def test_seeds_differ_and_counts_are_per_class():
    labels = [i % 5 for i in range(100)]
    a, b = sample_few_shot(labels, 4, 1), sample_few_shot(labels, 4, 2)
    assert a != b and len(a) == 20
    assert sorted(labels[i] for i in a) == sorted(list(range(5)) * 4)
