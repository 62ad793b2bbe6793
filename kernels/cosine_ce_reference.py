"""Plain-PyTorch cosine-logit cross-entropy: the obviously-correct oracle for the fused kernel."""

import torch
import torch.nn.functional as F


def cosine_logits(image_features, text_features, logit_scale):
    """scale · cos(image_i, text_k): the B × K logits of CLIP/CoOp, in fp32 (logit_scale is already exp'd)."""
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    return logit_scale * image @ text.T


def cosine_ce_reference(image_features, text_features, logit_scale, labels, reduction="mean",
                        return_argmax=False):
    """Softmax cross-entropy of the scaled cosine logits; with return_argmax also each row's predicted class."""
    logits = cosine_logits(image_features, text_features, logit_scale)
    loss = F.cross_entropy(logits, labels, reduction=reduction)
    return (loss, logits.argmax(dim=-1)) if return_argmax else loss


def cosine_ce_runs_reference(image_features, text_features, logit_scale, labels, sizes):
    """Stacked runs, one at a time: run r's first sizes[r] rows of image_features[r] (R × B × D; the rest are
    padding) and labels[r] (R × B) against text_features[r] (R × K × D). Returns each run's mean loss (R, fp32)
    and its rows whose predicted class is the label (R, int64)."""
    losses, hits = [], []
    for images, text, run_labels, size in zip(image_features, text_features, labels, sizes):
        loss, predicted = cosine_ce_reference(images[:size], text, logit_scale, run_labels[:size], return_argmax=True)
        losses.append(loss)
        hits.append((predicted == run_labels[:size]).sum())
    return torch.stack(losses), torch.stack(hits)
