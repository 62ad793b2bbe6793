"""Plain-PyTorch cosine-logit cross-entropy: the obviously-correct oracle for the fused kernel."""

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
