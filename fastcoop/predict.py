"""Classify new image files with a trained prompt."""

import torch
from PIL import Image

from fastcoop.cocoop import cocoop_logits
from fastcoop.errors import FastCoopError
from fastcoop.evaluate import evaluation_backends, run_text_features
from fastcoop.kernels.cosine_ce_reference import cosine_logits
from fastcoop.run import Run
from fastcoop.text_encoder import text_encoder


def predict_images(run: Run, paths: list[str], top_k: int = 5, device: str = "cpu"
                   ) -> list[list[tuple[str, float]]]:
    """For each image, the top-k (class name, probability) under the learned prompts."""
    tensors = []
    for path in paths:
        try:
            with Image.open(path) as image:
                tensors.append(run.loaded.preprocess(image.convert("RGB")))
        except (OSError, ValueError, SyntaxError) as exc:
            raise FastCoopError(f"cannot read image {path} ({exc})") from exc
    model = run.loaded.model
    with torch.no_grad():
        image_features = model.encode_image(torch.stack(tensors).to(device))
        if run.learner.method == "cocoop":  # each image its own prompts
            encoder = text_encoder(model, run.learner, evaluation_backends(model, run.learner))
            logits = cocoop_logits(model, run.learner, image_features, encoder=encoder)
        else:
            logits = cosine_logits(image_features, run_text_features(run), model.logit_scale.exp())
        probs = logits.softmax(dim=-1)
    top = probs.topk(min(top_k, probs.shape[1]), dim=-1)
    names = run.learner.classnames
    return [[(names[i], p) for p, i in zip(values.tolist(), indices.tolist())]
            for values, indices in zip(top.values, top.indices)]
