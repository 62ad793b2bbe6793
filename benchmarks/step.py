"""Per-step time of CoOp: the published step (pixels + 77-token text), cached features + 77-token text, fastcoop.

    python -m benchmarks.step --device cpu --classes 100 --model ViT-B-16 --repeats 3
"""

import argparse
import json
import logging

import torch

from benchmarks.common import median_ms, peak_memory_gb, real_classnames
from fastcoop.kernels import cosine_ce
from fastcoop.models import load_model
from fastcoop.prompts import PromptLearner
from fastcoop.reference import published_step
from fastcoop.text_encoder import encode_prompts


def step_variants(loaded, classnames, device, batch=32, n_ctx=16, csc=False, autocast_dtype=None):
    """The three steps as closures over one learner and one random batch (speed does not depend on values)."""
    model = loaded.model.to(device)
    learner = PromptLearner(model, loaded.tokenizer, classnames, n_ctx=n_ctx, csc=csc).to(device)
    optimizer = torch.optim.SGD([learner.ctx], lr=0.002, momentum=0.9, weight_decay=5e-4)
    size = loaded.preprocess.transforms[0].size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(len(classnames), (batch,), device=device)
    with torch.no_grad():
        features = model.encode_image(images)
    scale = model.logit_scale.exp().detach()
    autocast = torch.autocast(device.split(":")[0], dtype=autocast_dtype or torch.float32,
                              enabled=autocast_dtype is not None)

    def cached(mode):
        def step():
            with autocast:
                text = encode_prompts(model, learner, mode)
            loss = cosine_ce(features, text, scale, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    def published():
        with autocast:
            published_step(model, learner, images, labels, optimizer)

    return {"published": published, "cached_77_tokens": cached("reference"), "fastcoop_eager": cached("fast")}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    loaded = load_model(args.model, "none", args.device)
    steps = step_variants(loaded, real_classnames(args.classes), args.device)
    rows = {name: {"median_ms": median_ms(fn, args.device, args.repeats), "peak_gb": peak_memory_gb(fn, args.device)}
            for name, fn in steps.items()}
    base = rows["published"]["median_ms"]
    for name, row in rows.items():
        print(f"{name:<18s} {row['median_ms']:10.1f} ms   {base / row['median_ms']:6.1f}× vs published")
    print(json.dumps({"device": args.device, "classes": args.classes, "model": args.model, "rows": rows}))


if __name__ == "__main__":
    main()
