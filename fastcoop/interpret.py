"""What a learned context "says": the vocabulary words nearest to each context vector (as the CoOp paper reads
its prompts), by Euclidean distance in the frozen token-embedding space."""

import torch

from fastcoop.run import Run
from fastcoop.text_tower import TextTower


def nearest_words(run: Run, top_k: int = 3, class_index: int = 0) -> list[list[tuple[str, float]]]:
    """For each context vector (of class `class_index` when class-specific): the top-k (word, distance)."""
    vocabulary = TextTower.of(run.loaded.model).token_embedding.weight.detach().float()
    ctx = run.learner.ctx.detach().float()
    ctx = ctx[class_index] if run.learner.csc else ctx
    distances = torch.cdist(ctx, vocabulary.to(ctx.device))
    top = distances.topk(top_k, dim=-1, largest=False)
    decode = run.loaded.tokenizer.decode
    return [[(decode([i]).strip(), d) for d, i in zip(values.tolist(), indices.tolist())]
            for values, indices in zip(top.values, top.indices)]
