"""CoCoOp's training step and test-set evaluation: the published computation (each image's K prompts × 77 tokens
through the text encoder, the image re-encoded every step) against fastcoop's (cached features, every image's
prompts packed into one fast-encoder call, the step graphed on GPU), measured in the same run."""

import torch
import torch.nn.functional as F

from benchmarks.common import median_ms, real_classnames
from benchmarks.step import random_batch
from fastcoop.backends import resolve
from fastcoop.cocoop import CoCoOpLearner, cocoop_logits, cocoop_loss
from fastcoop.evaluate import prompt_classifier
from fastcoop.models import load_model
from fastcoop.step import TrainStep, graphed_or_eager
from fastcoop.text_encoder import FastTextEncoder


def run_cocoop_section(model_name: str, k: int, batches: list[int], eval_images: int, device: str,
                       repeats: int) -> list[dict]:
    loaded = load_model(model_name, "none", "cpu")
    model = loaded.model.to(device)
    classnames = real_classnames(k)
    dtype = torch.bfloat16 if device.startswith("cuda") else None  # fastcoop's default autocast
    published_dtype = torch.float16 if device.startswith("cuda") else None  # the published PREC fp16
    rows = []
    for batch in batches:
        learner = CoCoOpLearner(model, loaded.tokenizer, classnames).to(device)
        images, labels, features = random_batch(model, k, device, batch)
        optimizer = torch.optim.SGD(learner.parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)

        def published():
            with torch.autocast(device.split(":")[0], dtype=published_dtype or torch.float32,
                                enabled=published_dtype is not None):
                with torch.no_grad():
                    image_features = model.encode_image(images)
                loss = F.cross_entropy(cocoop_logits(model, learner, image_features, "reference"), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        encoder = FastTextEncoder(model, learner, resolve(device), weight_dtype=dtype)
        loss = cocoop_loss([learner], encoder, model.logit_scale.exp().detach(), dtype)
        step = TrainStep([learner], loss, features[None], labels[None],
                         torch.arange(batch, device=device)[None, None, None], torch.full((1, 1), 0.002, device=device),
                         0.9, 5e-4)
        fast = graphed_or_eager(step) if device.startswith("cuda") else step

        def fastcoop():
            step.step.zero_()
            fast()
        times = {"published": median_ms(published, device, repeats), "fastcoop": median_ms(fastcoop, device, repeats)}
        rows.append({"model": model_name, "classes": k, "batch": batch, "published_ms": times["published"],
                     "fastcoop_ms": times["fastcoop"], "speedup": times["published"] / times["fastcoop"]})
        print(f"  cocoop step {model_name} K={k} batch {batch}: published {times['published']:.1f} ms, fastcoop "
              f"{times['fastcoop']:.2f} ms ({rows[-1]['speedup']:.1f}×)", flush=True)
    learner = CoCoOpLearner(model, loaded.tokenizer, classnames).to(device)
    test_features = torch.randn(eval_images, model.visual.output_dim)
    classify = prompt_classifier(model, learner, resolve(device))
    seconds = median_ms(lambda: classify(test_features), device, max(1, repeats // 10)) / 1000
    rows.append({"model": model_name, "classes": k, "eval_images": eval_images, "eval_seconds": seconds})
    print(f"  cocoop evaluation {model_name}: {eval_images} test images × {k} classes in {seconds:.1f} s", flush=True)
    return rows
