"""The CoOp paper's linear-probe baseline: L2-regularised multinomial logistic regression (scikit-learn's lbfgs,
the published script's solver) on cached image features, its C searched on a few-shot validation split.

The published search (CoOp's lpclip/linear_probe.py): fit C in 1e6, 1e4, …, 1e-6 and keep the best on validation
(the first on ties); then, from [C/10, 10·C], 8 steps that fit both ends, keep the better (the left one on ties)
and halve the interval in log10 towards it; the classifier kept at the last step is the one tested. Validation
holds min(shots, 4) images per class. The train images here are the cache's few-shot subset — the images the
CoOp runs of that seed train on — and the validation images those CoOp's datasets draw for that seed (the cache's
val subset: fewshot.sample_train_and_val), where the published script draws both anew with NumPy.
Features are the eval view as the image encoder returns them (not normalised) in float64, as the published
script's features are (lists of Python floats).
"""

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from fastcoop.cache import FeatureCache
from fastcoop.errors import FastCoopError
from fastcoop.methods import Baseline

GRID = (1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6)
STEPS = 8


def fit(features: np.ndarray, labels: np.ndarray, c: float) -> LogisticRegression:
    # L2 is scikit-learn's default penalty (naming it is deprecated); lbfgs is multinomial for several classes
    return LogisticRegression(solver="lbfgs", max_iter=1000, C=float(c)).fit(features, labels)


def accuracy(classifier: LogisticRegression, features: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(classifier.predict(features) == labels))


def search(train_x, train_y, val_x, val_y, steps: int = STEPS) -> tuple[float, LogisticRegression]:
    """The published search for C; returns the C and the classifier it keeps. BLAS runs one thread: lbfgs on a
    few-shot problem is many small products, which a second thread slows (2 cores: K = 100 at 16 shots 2.8 s
    against 1.2 s; K = 1000 at 4 shots about equal), and the result then depends on no thread count."""
    with warnings.catch_warnings(), threadpool_limits(1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)  # lbfgs stopping at max_iter is the recipe, not news
        return _search(train_x, train_y, val_x, val_y, steps)


def _search(train_x, train_y, val_x, val_y, steps):
    scores = [accuracy(fit(train_x, train_y, c), val_x, val_y) for c in GRID]
    peak = GRID[int(np.argmax(scores))]
    left, right = 0.1 * peak, 10 * peak
    for _ in range(steps):
        fit_left, fit_right = fit(train_x, train_y, left), fit(train_x, train_y, right)
        if accuracy(fit_left, val_x, val_y) < accuracy(fit_right, val_x, val_y):
            chosen, classifier = right, fit_right
            left, right = 0.5 * (np.log10(right) + np.log10(left)), np.log10(right)
        else:
            chosen, classifier = left, fit_left
            left, right = np.log10(left), 0.5 * (np.log10(right) + np.log10(left))
        left, right = 10 ** left, 10 ** right
    return chosen, classifier


def linear_probe(cache: FeatureCache, shots: int, seed: int) -> dict:
    """Test accuracy of the published linear probe on `cache`'s (shots, seed) subset, and the C it chose."""
    for split in ("val", "test"):
        if split not in cache.splits:
            raise FastCoopError(f"{cache.path} has no {split} split, which the linear probe needs; cache it with "
                                "`fastcoop cache ... --splits train,val,test`")
    rows = cache.rows("train", shots, seed)
    train_x, train_y = _arrays(cache, "train", rows)
    val_x, val_y = _arrays(cache, "val", cache.rows("val", shots, seed))
    test_x, test_y = _arrays(cache, "test", None)
    c, classifier = search(train_x, train_y, val_x, val_y)
    return {"shots": shots, "seed": seed, "C": float(c), "val_top1": accuracy(classifier, val_x, val_y),
            "test": {"top1": accuracy(classifier, test_x, test_y), "images": len(test_y)}}


def _arrays(cache: FeatureCache, split: str, rows) -> tuple[np.ndarray, np.ndarray]:
    features = cache.features(split, rows, view=0).double().numpy()  # float64, as the published script's
    return features, cache.labels(split, rows).numpy()


class LinearProbe(Baseline):
    name = "linear-probe"
    title = "linear probe"
    paper = "Radford et al., ICML 2021; CoOp's search"
    why_val = "CoOp's baseline selects its regularisation on val"

    def check(self, cache, subsets) -> None:
        """Each subset's val images (min(shots, 4) per class, drawn as the published code draws them), where the
        cache has val and test: without them the sweep leaves the probe out, with a warning."""
        if "val" in cache.splits and "test" in cache.splits:
            for shots, seed in subsets:
                cache.rows("val", shots, seed)

    def run(self, cache, loaded, subsets, device):
        return [{**result, "test": result["test"]["top1"], "test_images": result["test"]["images"]}
                for result in (linear_probe(cache, shots, seed) for shots, seed in subsets)]


LINEAR_PROBE = LinearProbe()
