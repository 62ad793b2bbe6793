"""CoCoOp's training step and test-set evaluation: the published computation (each image's K prompts × 77 tokens
through the text encoder, the image re-encoded every step) against fastcoop's (cached features, every image's
prompts packed into one fast-encoder call, the step graphed on GPU), measured in the same run."""

import tempfile

import torch
import torch.nn.functional as F

from benchmarks.common import classnames_of, median_ms, real_classnames
from benchmarks.full_run import run_fastcoop_train, save_checkpoint
from benchmarks.step import random_batch
from fastcoop.backends import resolve
from fastcoop.methods.cocoop import CoCoOpClassifier, CoCoOpLearner, CoCoOpLoss, cocoop_logits
from fastcoop.fewshot import class_subset
from fastcoop.models import load_model
from fastcoop.step import SGD, TrainStep, graphed_or_eager
from fastcoop.text_encoder import FastTextEncoder
from fastcoop.text_tower import TextTower


def published_cocoop_step(loaded, model, classnames, batch: int, device: str):
    """One published CoCoOp training step from pixels (random images; speed ignores values), fp16 on GPU."""
    learner = CoCoOpLearner(model, loaded.tokenizer, classnames).to(device)
    images, labels, _ = random_batch(model, len(classnames), device, batch)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)
    dtype = torch.float16 if device.startswith("cuda") else None  # the published PREC fp16

    def step():
        with torch.autocast(device.split(":")[0], dtype=dtype or torch.float32, enabled=dtype is not None):
            with torch.no_grad():
                image_features = model.encode_image(images)
            loss = F.cross_entropy(cocoop_logits(model, learner, image_features, "reference"), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def fastcoop_cocoop_step(loaded, model, classnames, batch: int, device: str):
    """fastcoop's CoCoOp step on cached features (bf16 autocast and one CUDA graph on GPU), as `train` runs it."""
    dtype = torch.bfloat16 if device.startswith("cuda") else None
    learner = CoCoOpLearner(model, loaded.tokenizer, classnames).to(device)
    _, labels, features = random_batch(model, len(classnames), device, batch)
    encoder = FastTextEncoder(model, learner, resolve(device, tower=TextTower.of(model)), weight_dtype=dtype)
    loss = CoCoOpLoss(encoder, model.logit_scale.exp().detach(), dtype)
    order = torch.arange(batch, device=device)[None, None, None]
    step = TrainStep([learner], loss, features[None], labels[None], order, torch.full((1, 1), 0.002, device=device),
                     SGD(0.9, 5e-4))
    run = graphed_or_eager(step) if device.startswith("cuda") else step

    def one_step():
        step.start_at_epoch(0, 0)
        run()
    return one_step


def run_cocoop_section(model_name: str, k: int, batches: list[int], eval_images: int, dataset: str, device: str,
                       repeats: int, run_options: tuple[str, ...] = ()) -> list[dict]:
    """Steps at K classes for each batch size, the evaluation of `eval_images` test images, and a whole
    `fastcoop train --method cocoop --classes base` process on a cache shaped like `dataset` (16 shots;
    `run_options`: more of its options, e.g. fewer epochs)."""
    loaded = load_model(model_name, "none", "cpu")
    model = loaded.model.to(device)
    classnames = real_classnames(k)
    rows = []
    for batch in batches:
        published = median_ms(published_cocoop_step(loaded, model, classnames, batch, device), device, repeats)
        if device.startswith("cuda"):  # the fastcoop step's own peak, the model's blocks and its graph included
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        fast = median_ms(fastcoop_cocoop_step(loaded, model, classnames, batch, device), device, repeats)
        rows.append({"model": model_name, "classes": k, "batch": batch, "published_ms": published,
                     "fastcoop_ms": fast, "speedup": published / fast,
                     "fastcoop_peak_gb": (torch.cuda.max_memory_allocated() - before) / 1e9
                     if device.startswith("cuda") else None})
        print(f"  cocoop step {model_name} K={k} batch {batch}: published {published:.1f} ms, fastcoop {fast:.2f} ms "
              f"({published / fast:.1f}×)", flush=True)
    learner = CoCoOpLearner(model, loaded.tokenizer, classnames).to(device)
    test_features = torch.randn(eval_images, model.visual.output_dim)
    classify = CoCoOpClassifier(model, learner, resolve(device, tower=TextTower.of(model))).predict
    seconds = median_ms(lambda: classify(test_features), device, max(1, repeats // 10)) / 1000
    rows.append({"model": model_name, "classes": k, "eval_images": eval_images, "eval_seconds": seconds})
    print(f"  cocoop evaluation {model_name}: {eval_images} test images × {k} classes in {seconds:.1f} s", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        run = run_fastcoop_train(dataset, device, model_name,
                                 options=("--method", "cocoop", "--classes", "base", *run_options),
                                 weights=save_checkpoint(loaded.model, folder))
    base = class_subset(len(classnames_of(dataset)), "base")
    published = median_ms(published_cocoop_step(loaded, model, [classnames_of(dataset)[c] for c in base], 1, device),
                          device, repeats)
    rows.append({**run, "method": "cocoop", "classes": len(base), "published_step_ms": published,
                 "published_estimate_seconds": published * run["steps"] / 1000})
    print(f"  cocoop base-to-new run {dataset} ({len(base)} base classes, {run['steps']} batch-1 steps): "
          f"{run['process_seconds']:.1f} s (loop {run['loop_seconds']:.1f} s); published ≈ "
          f"{rows[-1]['published_estimate_seconds']:.0f} s", flush=True)
    return rows
