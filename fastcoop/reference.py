"""The published CoOp training step, kept as the baseline: tests use it as the oracle, benchmarks as the bar.

Every step it runs the frozen image encoder on the freshly augmented batch and pushes all K prompts, 77 tokens
each, through the text encoder, forward and backward, as the published implementation does.
"""

import torch

from fastcoop.kernels.cosine_ce_reference import cosine_ce_reference
from fastcoop.prompts import PromptLearner
from fastcoop.text_encoder import encode_prompts


def published_step(model, learner: PromptLearner, images: torch.Tensor, labels: torch.Tensor,
                   optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """One SGD step of CoOp from pixels; returns the loss."""
    with torch.no_grad():
        image_features = model.encode_image(images)
    text_features = encode_prompts(model, learner, "reference")
    loss = cosine_ce_reference(image_features, text_features, model.logit_scale.exp(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()
