"""Classify new image files with a trained prompt."""

import torch
from PIL import Image

from fastcoop.errors import FastCoopError
from fastcoop.run import Run


def predict_images(run: Run, paths: list[str], top_k: int = 5, device: str = "cpu"
                   ) -> list[list[tuple[str, float]]]:
    """For each image, the top-k (class name, probability) under the run's classifier."""
    tensors = []
    for path in paths:
        try:
            with Image.open(path) as image:
                tensors.append(run.loaded.preprocess(image.convert("RGB")))
        except (OSError, ValueError, SyntaxError) as exc:
            raise FastCoopError(f"cannot read image {path} ({exc})") from exc
    with torch.no_grad():
        image_features = run.loaded.model.encode_image(torch.stack(tensors).to(device))
        probs = run.classifier().logits(image_features).softmax(dim=-1)
    top = probs.topk(min(top_k, probs.shape[1]), dim=-1)
    names = run.learner.classnames
    return [[(names[i], p) for p, i in zip(values.tolist(), indices.tolist())]
            for values, indices in zip(top.values, top.indices)]
