"""The Python API, for notebooks: open a cache, train any method on it (fastcoop.methods), evaluate the run on
this or another cache, save it as a run directory that every command reads.

    cache = fastcoop.open_cache("caltech101.h5")
    run = fastcoop.train(cache, method="coop", shots=16, seed=1)
    run.evaluate(cache)            # {"top1": ..., "mean_per_class": ..., "images": ...}
    run.save("runs/coop-16shot")
"""

from dataclasses import dataclass
from pathlib import Path

from fastcoop.cache import FeatureCache
from fastcoop.config import Recipe, Runtime
from fastcoop.errors import FastCoopError
from fastcoop.evaluate import score_run
from fastcoop.models import LoadedModel, load_model
from fastcoop.outputs import held
from fastcoop.pipeline import finish_run
from fastcoop.run import Run, plan_run_dir
from fastcoop.training import Plan, TrainResult, plan_runs, train_stack


def open_cache(path: str | Path) -> FeatureCache:
    """A feature cache made by `fastcoop cache` (close it, or use it in a `with`, when done)."""
    return FeatureCache(path)


@dataclass
class TrainedRun:
    """A run trained in this process: what it learned (`learner`), its recipe as run, its per-epoch `history`."""

    result: TrainResult
    plan: Plan
    cache: FeatureCache
    loaded: LoadedModel

    @property
    def learner(self):
        return self.result.learner

    @property
    def recipe(self) -> Recipe:
        return self.result.recipe

    @property
    def history(self) -> list[dict]:
        return self.result.history

    def evaluate(self, cache: FeatureCache | None = None, split: str = "test", classes: str | None = None) -> dict:
        """Top-1 and mean per-class accuracy on a cache's split (this run's by default; another dataset's:
        transfer), on the classes the run was trained on unless `classes` says (base-to-new: "new")."""
        config = {"train": self.recipe.record(), "classnames": self.learner.classnames}
        run = Run(config, self.plan.method, self.loaded, self.learner)
        return score_run(run, cache or self.cache, split, classes)[0]

    def save(self, run_dir: str | Path) -> Path:
        """The run as a finished run directory (`eval`, `predict`, `report` read it); refused where one is."""
        run_dir = Path(run_dir)
        request = self.plan.recipes[0].record()
        with held(run_dir):
            if plan_run_dir(run_dir, self.cache, request, overwrite=False) != "new":
                raise FastCoopError(f"{run_dir} holds a run already; save to a new folder")
            finish_run(run_dir, self.plan, self.cache, self.loaded, self.result, request)
        return run_dir


def train(cache: FeatureCache, method: str = "coop", shots: int | None = 16, seed: int = 1,
          runtime: Runtime = Runtime(), loaded: LoadedModel | None = None, progress: bool = False,
          **recipe) -> TrainedRun:
    """Train `method` (a registered name or FILE.py:ClassName) on the cache's (shots, seed) subset with its
    published recipe; `recipe`: Recipe fields over it (epochs=..., lr=..., options=(("kg_weight", 4.0),)).
    `loaded`: the cache's model, when already loaded."""
    loaded = loaded or load_model(cache.model, cache.pretrained, "cpu", image_tower=False)
    plan = plan_runs(cache, loaded, [Recipe(method=method, shots=shots, seed=seed, **recipe)], runtime)
    result, = train_stack(cache, loaded, plan, progress=progress)
    return TrainedRun(result, plan, cache, loaded)
