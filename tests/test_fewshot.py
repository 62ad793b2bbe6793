import random
from collections import defaultdict

import pytest

from fastcoop.fewshot import sample_few_shot


def published_rule(labels, shots, seed):
    """The published code's rule, written out independently: global random, classes by first appearance."""
    random.seed(seed)
    return published_rule_continuing(labels, shots)


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


def test_val_is_drawn_after_train_from_the_same_stream():
    """CoOp's datasets call generate_fewshot_dataset on train, then on val with min(shots, 4), after one
    set_random_seed: the val images depend on the train draws before them."""
    from fastcoop.fewshot import sample_train_and_val

    rng = random.Random(7)
    train = [rng.randrange(6) for _ in range(300)]
    val = [rng.randrange(6) for _ in range(60)] + [6]  # a class with a single val image
    for seed in (1, 2, 3):
        for shots in (1, 2, 4, 8, 16):
            random.seed(seed)
            expected_train = published_rule_continuing(train, shots)
            expected_val = published_rule_continuing(val, min(shots, 4))
            assert sample_train_and_val(train, val, shots, seed) == (expected_train, expected_val)
    assert sample_train_and_val(train, val, 4, 1)[1] != sample_few_shot(val, 4, 1)  # not a fresh stream


def published_rule_continuing(labels, shots):
    """published_rule without seeding: the global stream as the previous draw left it."""
    tracker = defaultdict(list)
    for i, label in enumerate(labels):
        tracker[label].append(i)
    out = []
    for label, items in tracker.items():
        out.extend(random.sample(items, shots) if len(items) >= shots else items)
    return out


def test_class_subsets_too_small_to_mean_anything_are_refused():
    """One class trains nothing (its loss is 0) and scores 100 %; a base-to-new half of one class inflates H."""
    from fastcoop.errors import FastCoopError
    from fastcoop.fewshot import check_classes

    for num_classes, which in ((1, "all"), (3, "base"), (3, "new"), (0, "all")):
        with pytest.raises(FastCoopError):
            check_classes(num_classes, which)
    for num_classes, which in ((2, "all"), (4, "base"), (4, "new")):
        check_classes(num_classes, which)
