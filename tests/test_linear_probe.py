"""The linear-probe baseline: the published C search, on cached features."""

import shutil

import numpy as np
import pytest

from conftest import TINY_VIT, run_cli
from fastcoop.cache import FeatureCache
from fastcoop.methods.linear_probe import GRID, fit, linear_probe, search


def published_search(train_x, train_y, val_x, val_y, steps=8):
    """The rule of CoOp's lpclip/linear_probe.py, kept in log10 space: the grid's best C (first on ties), then
    `steps` times both ends of [log C − 1, log C + 1] narrowing by half towards the better (the left on ties)."""
    def score(log_c):
        model = fit(train_x, train_y, 10.0 ** log_c)
        return np.mean(model.predict(val_x) == val_y), model

    grid = [np.mean(fit(train_x, train_y, c).predict(val_x) == val_y) for c in GRID]
    centre = np.log10(GRID[int(np.argmax(grid))])
    low, high = centre - 1, centre + 1
    for _ in range(steps):
        (low_acc, low_model), (high_acc, high_model) = score(low), score(high)
        middle = (low + high) / 2
        if low_acc < high_acc:
            kept, model, low = high, high_model, middle
        else:
            kept, model, high = low, low_model, middle
    return 10.0 ** kept, model


def test_the_search_follows_the_published_rule():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16))
    labels = np.repeat(np.arange(5), 8)
    train_x = centres[labels] + rng.normal(scale=2.0, size=(40, 16))
    val_y = np.repeat(np.arange(5), 4)
    val_x = centres[val_y] + rng.normal(scale=2.0, size=(20, 16))
    c, model = search(train_x, labels, val_x, val_y)
    expected_c, expected = published_search(train_x, labels, val_x, val_y)
    assert c == pytest.approx(expected_c, rel=1e-9)
    probe = rng.normal(size=(200, 16))
    assert (model.predict(probe) == expected.predict(probe)).all()
    np.testing.assert_allclose(model.coef_, fit(train_x, labels, c).coef_)  # the classifier kept is C's


@pytest.fixture(scope="module")
def split_cache(tmp_path_factory, example_images):
    """A cache with train, val and test: the example's train images as a flat folder, split 50/20/30 %."""
    root = tmp_path_factory.mktemp("lp")
    for class_dir in (example_images / "train").iterdir():
        shutil.copytree(class_dir, root / "flat" / class_dir.name)
    from fastcoop.cli import main

    with pytest.raises(SystemExit) as done:
        main(["cache", str(root / "flat"), "--out", str(root / "f.h5"), "--model", TINY_VIT, "--pretrained", "none",
              "--shots", "2", "--seeds", "1,2", "--views", "0", "--splits", "train,val,test", "--workers", "0"])
    assert done.value.code == 0
    return root / "f.h5"


def test_linear_probe_on_a_cache_and_its_cli(capsys, split_cache):
    with FeatureCache(split_cache) as cache:
        result = linear_probe(cache, 2, 1)
        rows = cache.rows("train", 2, 1)
        x, y = cache.features("train", rows, view=0).double().numpy(), cache.labels("train", rows).numpy()
        test_x, test_y = cache.features("test", view=0).double().numpy(), cache.labels("test").numpy()
    assert result["test"]["top1"] == np.mean(fit(x, y, result["C"]).predict(test_x) == test_y)
    code, out, _ = run_cli(capsys, "linear-probe", split_cache, "--shots", "2", "--seed", "1")
    assert code == 0 and f"test top-1 {result['test']['top1']:.2%}" in out


def test_linear_probe_needs_a_val_split(tmp_path, capsys, tiny_vit, example_images):
    from fastcoop.cache import extract_features
    from fastcoop.datasets import read_dataset

    path = extract_features(read_dataset(example_images), tmp_path / "f.h5", tiny_vit, shots=2, seeds=[1], views=0,
                            workers=0, progress=False)
    code, _, err = run_cli(capsys, "linear-probe", path, "--shots", "2")
    assert code == 2 and "has no val split" in err and "--splits train,val,test" in err


def test_its_val_images_are_those_coops_datasets_draw(tmp_path, capsys, example_images):
    """The few-shot val images of (shots, seed): drawn as CoOp's datasets draw them, after the train images from
    the same seeded stream (the published rule written out in coop_layouts, on the saved split). 9 images per
    class split 4 / 4 / 1, so that both draws are random."""
    import os

    import coop_layouts as coop

    for split in ("train", "test"):
        for image in (example_images / split).glob("*/*.jpg"):
            (tmp_path / "flat" / image.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(image, tmp_path / "flat" / image.parent.name / f"{split}-{image.name}")
    code, _, err = run_cli(capsys, "cache", tmp_path / "flat", "--out", tmp_path / "f.h5", "--model", TINY_VIT,
                           "--pretrained", "none", "--shots", "2", "--seeds", "1,2", "--views", "0", "--splits",
                           "train,val,test", "--split-ratios", "0.4,0.4", "--workers", "0")
    assert code == 0, err
    published = coop.coop_split(tmp_path, "f.split.json", "flat")
    assert len(published["train"]) == len(published["val"]) == 4 * 12
    with FeatureCache(tmp_path / "f.h5") as cache:
        for seed in (1, 2):
            expected = coop.coop_few_shot(published, 2, seed)
            for split in ("train", "val"):
                paths = cache.paths(split)
                got = [os.path.realpath(paths[i]) for i in cache.rows(split, 2, seed)]
                assert got == [os.path.realpath(p) for p, _, _ in expected[split]]


@pytest.mark.slow
def test_blas_threads_follow_the_machine_as_torchs_do(split_cache):
    """The shared-machine rule covers BLAS: beside other work, NumPy's and SciPy's OpenBLAS (under scikit-learn's
    solver) compute with one thread, not one spinning thread per core (in a fresh process: libraries read their
    thread count when they load). A user's own OPENBLAS_NUM_THREADS stands."""
    import json
    import os
    import subprocess
    import sys

    script = ("import atexit, json, threadpoolctl\n"
              "from fastcoop import cli, machine\n"
              "machine.others_running, machine.usable_cores = (lambda: 1.0), (lambda: 2)\n"
              "atexit.register(lambda: print(json.dumps(sorted({i['num_threads'] for i in "
              "threadpoolctl.threadpool_info() if i['user_api'] == 'blas'}))))\n"
              f"cli.main(['linear-probe', {str(split_cache)!r}, '--shots', '2', '--seed', '1'])\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                               "MKL_NUM_THREADS")}
    for env, expected in ((clean, [1]), (clean | {"OPENBLAS_NUM_THREADS": "2"}, [2])):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.strip().splitlines()[-1]) == expected


def test_the_search_runs_blas_on_one_thread(monkeypatch):
    """lbfgs on few-shot features is many small products, which more BLAS threads slow; one thread also makes the
    chosen C independent of the machine's load."""
    import threadpoolctl

    from fastcoop.methods import linear_probe as lp

    seen = []
    fit = lp.fit

    def fit_watching_threads(x, y, c):
        seen.append({i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"})
        return fit(x, y, c)

    monkeypatch.setattr(lp, "fit", fit_watching_threads)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 8)), np.arange(20) % 4
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        lp.search(x, y, x, y, steps=1)
    assert seen and all(threads == {1} for threads in seen)
