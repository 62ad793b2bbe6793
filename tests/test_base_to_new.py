"""The base-to-new protocol (CoCoOp's): the published class split and relabelling, training on base classes and
testing on base and new."""

import json
import shutil

import pytest
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
    from fastcoop.datasets import read_dataset

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
    assert code == 2 and "a row per class (ctx)" in err


def test_base_runs_record_new_and_h_and_report_shows_them(tmp_path, capsys, tiny_vit, example_images):
    from fastcoop.cache import extract_features
    from fastcoop.datasets import read_dataset

    cache = extract_features(read_dataset(example_images), tmp_path / "f.h5", tiny_vit, shots=4, seeds=[1, 2],
                             views=1, workers=0, progress=False)
    runs = []
    for method, seed in (("cocoop", 1), ("cocoop", 2)):
        run_dir = tmp_path / f"{method}-{seed}"
        code, _, err = run_cli(capsys, "train", cache, "--out", run_dir, "--method", method, "--seed", str(seed),
                               "--shots", "4", "--epochs", "1", "--batch-size", "8", "--classes", "base",
                               "--device", "cpu")
        assert code == 0, err
        results = json.loads((run_dir / "results.json").read_text())
        code, out, _ = run_cli(capsys, "eval", run_dir, cache, "--classes", "new")
        assert code == 0 and f"top-1 {results['test_new']['top1']:.2%}" in out  # what eval says, recorded
        base, new = results["test"]["top1"], results["test_new"]["top1"]
        assert results["harmonic_mean"] == pytest.approx(2 * base * new / (base + new) if base + new else 0.0)
        runs.append((base, new))
    code, out, _ = run_cli(capsys, "report", tmp_path / "cocoop-1", tmp_path / "cocoop-2")
    assert code == 0 and "new top-1 | H |" in out
    mean_base, mean_new = (sum(v) / 2 for v in zip(*runs))
    harmonic = 2 * mean_base * mean_new / (mean_base + mean_new) if mean_base + mean_new else 0.0
    assert "| cocoop | base |" in out and f"| {100 * harmonic:.2f} |" in out


@pytest.mark.slow
def test_cross_dataset_and_named_subset_evaluation(tmp_path, capsys, tiny_vit, example_images):
    """Another dataset (the same images under other class names) and a named subset of the run's classes (as
    ImageNet-A and -R are of ImageNet): a shared context carries over to both, a class-specific one to the subset
    only, with its rows for those classes."""
    from fastcoop.cache import FeatureCache, extract_features
    from fastcoop.datasets import read_dataset
    from fastcoop.evaluate import evaluate_split
    from fastcoop.run import load_run, with_classnames

    other, subset, kept = tmp_path / "other", tmp_path / "subset", (1, 4, 7, 10)
    for split in ("train", "test"):
        for i, folder in enumerate(sorted((example_images / split).iterdir())):
            shutil.copytree(folder, other / split / f"object_{chr(97 + i)}")
            if i in kept:
                shutil.copytree(folder, subset / split / folder.name)
    caches = {name: extract_features(read_dataset(root), tmp_path / f"{name}.h5", tiny_vit, shots=4, seeds=[1],
                                     views=1, workers=0, progress=False)
              for name, root in (("own", example_images), ("other", other), ("subset", subset))}
    for context in ("unified", "csc"):
        run_dir = tmp_path / context
        assert run_cli(capsys, "train", caches["own"], "--out", run_dir, "--shots", "4", "--n-ctx", "2", "--epochs",
                       "1", "--device", "cpu", *(["--csc"] if context == "csc" else []))[0] == 0
        run = load_run(run_dir)
        with FeatureCache(caches["subset"]) as cache:
            on_subset = with_classnames(run, [n.replace("_", " ") for n in cache.classnames])
            expected = evaluate_split(cache, on_subset.classifier().predict)
        rows = [run.learner.classnames.index(name) for name in on_subset.learner.classnames]
        assert rows == list(kept) and torch.equal(on_subset.learner.ctx, run.learner.ctx[rows] if context == "csc"
                                                  else run.learner.ctx)
        code, out, _ = run_cli(capsys, "eval", run_dir, caches["subset"])
        assert code == 0 and f"top-1 {expected['top1']:.2%}" in out and "(12 images)" in out
        code, out, err = run_cli(capsys, "eval", run_dir, caches["other"])
        if context == "unified":
            assert code == 0 and "(36 images)" in out
        else:
            assert code == 2 and "has none for 'object a', 'object b'" in err and "and 7 more" in err
        code, _, err = run_cli(capsys, "eval", run_dir, caches["subset"], "--classes", "new")
        assert code == 2 and "other class names" in err
        evaluations = json.loads((run_dir / "evaluations.json").read_text())
        assert {e["dataset"] for e in evaluations.values()} == ({"subset", "other"} if context == "unified"
                                                                else {"subset"})
    code, out, _ = run_cli(capsys, "report", tmp_path / "unified")
    subset_top1 = json.loads((tmp_path / "unified" / "evaluations.json").read_text())["subset.h5 test all"]["top1"]
    assert code == 0 and "| other | subset | average |" in out and f"| {100 * subset_top1:.2f} |" in out
    assert run_cli(capsys, "train", caches["own"], "--out", tmp_path / "unified", "--shots", "4", "--n-ctx", "2",
                   "--epochs", "1", "--device", "cpu", "--overwrite")[0] == 0
    assert not (tmp_path / "unified" / "evaluations.json").exists()  # a replaced run keeps none of the old one's
