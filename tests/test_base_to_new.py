"""The base-to-new protocol (CoCoOp's): the published class split and relabelling, training on base classes and
testing on base and new."""

import json

import torch

from conftest import run_cli
from fastcoop.fewshot import class_subset, relabel


def published_subsample(labels: list[int], which: str) -> tuple[list[int], list[int]]:
    """CoCoOp's subsample_classes, written out: the labels present, sorted; the first ⌈n/2⌉ base, the rest new;
    items of the chosen half kept in order and relabelled by their label's place in it."""
    present = sorted(set(labels))
    half = -(-len(present) // 2)
    chosen = present[:half] if which == "base" else present[half:]
    kept = [i for i, label in enumerate(labels) if label in chosen]
    return kept, [chosen.index(labels[i]) for i in kept]


def test_the_split_and_relabelling_follow_the_published_rule():
    labels = [4, 0, 36, 18, 19, 18, 2, 36, 19, 0]
    for which in ("base", "new"):
        kept, new_labels = published_subsample(list(range(37)) + labels, which)
        mask, relabelled = relabel(torch.tensor(list(range(37)) + labels), class_subset(37, which))
        assert mask.nonzero().flatten().tolist() == kept and relabelled.tolist() == new_labels
    assert len(class_subset(37, "base")) == 19 and class_subset(37, "new")[0] == 19 and class_subset(4, "new") == [2, 3]


def test_train_on_base_then_test_on_base_and_new(tmp_path, capsys, tiny_vit, example_images):
    from fastcoop.cache import FeatureCache, extract_features
    from fastcoop.data import read_dataset

    cache = extract_features(read_dataset(example_images), tmp_path / "f.h5", tiny_vit, shots=4, seeds=[1], views=1,
                             workers=0, progress=False)
    run_dir = tmp_path / "base"
    code, _, err = run_cli(capsys, "train", cache, "--out", run_dir, "--shots", "4", "--n-ctx", "2", "--epochs", "2",
                           "--classes", "base", "--device", "cpu")
    assert code == 0, err
    config = json.loads((run_dir / "config.json").read_text())
    with FeatureCache(cache) as c:
        names = c.classnames
        train_labels = c.labels("train", c.rows("train", 4, 1))
    assert config["classnames"] == names[:6] and config["train"]["classes"] == "base"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["test"]["images"] == 6 * 3  # the base classes' test images only
    assert sum(json.loads(line)["steps"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()) == 2 * (
        int((train_labels < 6).sum()) // 32 or 1)
    code, out, _ = run_cli(capsys, "eval", run_dir, cache)
    assert code == 0 and f"top-1 {results['test']['top1']:.2%}" in out and "(18 images)" in out
    code, out, _ = run_cli(capsys, "eval", run_dir, cache, "--classes", "new")
    assert code == 0 and "(18 images)" in out
    all_dir = tmp_path / "all"
    assert run_cli(capsys, "train", cache, "--out", all_dir, "--shots", "4", "--n-ctx", "2", "--epochs", "1",
                   "--device", "cpu")[0] == 0
    code, _, err = run_cli(capsys, "eval", all_dir, cache, "--classes", "new")
    assert code == 2 and "was trained on all classes" in err
    csc_dir = tmp_path / "csc"
    assert run_cli(capsys, "train", cache, "--out", csc_dir, "--shots", "4", "--n-ctx", "2", "--epochs", "1",
                   "--classes", "base", "--csc", "--device", "cpu")[0] == 0
    code, _, err = run_cli(capsys, "eval", csc_dir, cache, "--classes", "new")
    assert code == 2 and "a context per class" in err
