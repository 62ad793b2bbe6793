"""CoOp (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022): M context vectors learned in
word-embedding space, before, around or after each class name (fastcoop.prompts.PromptLearner), every CLIP weight
frozen; cosine cross-entropy against the K prompts' text features (trainers/coop.py). Its recipe is
fastcoop.methods.Method's: M = 16 at random, batch 32, epochs by shot count, SGD lr 0.002."""

import torch

from fastcoop.errors import FastCoopError
from fastcoop.classifiers import TextClassifier, prompt_text_features
from fastcoop.kernels import cosine_ce_runs
from fastcoop.methods import Method
from fastcoop.prompts import PromptLearner


class CoOp(Method):
    name = "coop"
    title = "CoOp"
    paper = "Zhou et al., IJCV 2022"
    learns = "M = {n_ctx} context vectors ({init})"

    def learner(self, model, tokenizer, classnames, recipe):
        learner = PromptLearner(model, tokenizer, classnames, recipe.n_ctx, recipe.csc, recipe.position,
                                recipe.init)
        check_context(recipe, learner)
        return learner

    def loss(self, parts):
        return CoOpLoss(parts.text_encoder(), parts.logit_scale, parts.autocast_dtype, parts.backends.loss)

    def classifier(self, model, learner, backends):
        """The K text features computed once; each image's logits against them."""
        return TextClassifier(prompt_text_features(model, learner, backends), model.logit_scale.exp().detach())


def check_context(recipe, learner) -> None:
    """Given words set M; a different --n-ctx beside them contradicts them."""
    if recipe.init is not None and recipe.n_ctx is not None and recipe.n_ctx != learner.n_ctx:
        raise FastCoopError(f"--init '{learner.init}' is {learner.n_ctx} token(s), which set M = {learner.n_ctx}; "
                            f"--n-ctx {recipe.n_ctx} contradicts it: give one of them")


class CoOpLoss:
    """CoOp's training loss of stacked runs: the runs' contexts through `encoder` in one call (FastTextEncoder or
    ReferenceTextEncoder, built for the runs' prompt layouts: R contexts of each layout → R × K × D), then each
    run's batch against its own text features with the fused cosine cross-entropy of all runs at once
    (`loss_backend`: fastcoop.backends' choice). `text_features(learners)` is the first half, for losses that add
    a term on the text features (KgCoOp's)."""

    def __init__(self, encoder, logit_scale, autocast_dtype=None, loss_backend: str = "reference"):
        self.encoder, self.logit_scale, self.autocast_dtype = encoder, logit_scale, autocast_dtype
        self.loss_backend = loss_backend
        self._run_order = {}  # the runs' order by layout → where each run's text lies in it (device tensors)

    def __call__(self, learners, images: torch.Tensor, labels: torch.Tensor, sizes: list[int]):
        """The runs' losses (R) and hits (R) from their batches: images R × B × D, labels R × B, run r's first
        sizes[r] rows (the rest padding)."""
        return cosine_ce_runs(images, self.text_features(learners), self.logit_scale, labels, sizes,
                              backend=self.loss_backend)

    def text_features(self, learners) -> torch.Tensor:
        """R × K × D: each run's K prompts through the text encoder, in run order."""
        by_layout = {}  # the encoder's prompt layouts → the runs of each
        for run, learner in enumerate(learners):
            by_layout.setdefault(self.encoder.layouts[learner.layout], []).append(run)
        # one run's context as a view; several stacked
        contexts = {layout: learners[runs[0]].ctx[None] if len(runs) == 1 else
                    torch.stack([learners[run].ctx for run in runs]) for layout, runs in by_layout.items()}
        with torch.autocast(learners[0].ctx.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None, cache_enabled=False):
            encoded = self.encoder.encode_each(contexts)
        return self._in_run_order([encoded[layout] for layout in by_layout], list(by_layout.values()))

    def _in_run_order(self, texts: list[torch.Tensor], runs: list[list[int]]) -> torch.Tensor:
        """The layouts' text features (each R_l × K × D, for the runs in `runs`) as one R × K × D in run order."""
        if len(texts) == 1:
            return texts[0]
        order = tuple(run for layout_runs in runs for run in layout_runs)
        text = torch.cat(texts)
        if order == tuple(sorted(order)):
            return text
        if order not in self._run_order:
            self._run_order[order] = torch.tensor(order, device=text.device).argsort()
        return text.index_select(0, self._run_order[order])
