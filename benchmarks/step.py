"""Per-step time and peak memory of CoOp: the published step, the same on cached features, and fastcoop.

    python -m benchmarks.step --device cpu --classes 100 --model ViT-B-16 --repeats 3
"""

import argparse
import json
import logging
from dataclasses import replace

import torch

from benchmarks.common import median_ms, peak_memory_gb, real_classnames
from fastcoop.backends import resolve
from fastcoop.models import load_model
from fastcoop.prompts import PromptLearner
from fastcoop.reference import published_step
from fastcoop.methods.coop import CoOpLoss
from fastcoop.step import SGD, CudaGraphStep, TrainStep
from fastcoop.text_encoder import PACK_ROWS, FastTextEncoder, ReferenceTextEncoder, reference_text_features
from fastcoop.text_tower import TextTower


def random_batch(model, num_classes: int, device: str, batch: int = 32):
    """Random images at the model's input size, random labels, and the images' features (values do not matter)."""
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(batch, 3, size, size, device=device)
    with torch.no_grad():
        features = model.encode_image(images).float()
    return images, torch.randint(num_classes, (batch,), device=device), features


def step_variants(loaded, classnames, device, batch=32, n_ctx=16, csc=False, precision=None, graph=True,
                  backends=None):
    """name → a function running one step; all share one learner and random batch (speed ignores values).
    precision: the autocast dtype (None: fp32; on CPU a bf16 eager step beside it). The published step always
    runs fp16 autocast on GPU.
    backends: fastcoop_eager's implementations (default: fastcoop.backends' choice for the device)."""
    model = loaded.model.to(device)
    learner = PromptLearner(model, loaded.tokenizer, classnames, n_ctx=n_ctx, csc=csc).to(device)
    images, labels, features = random_batch(model, len(classnames), device, batch)
    scale = model.logit_scale.exp().detach()
    optimizer = torch.optim.SGD([learner.ctx], lr=0.002, momentum=0.9, weight_decay=5e-4)
    published_dtype = torch.float16 if device.startswith("cuda") else None

    def published():
        with torch.autocast(device.split(":")[0], dtype=published_dtype or torch.float32,
                            enabled=published_dtype is not None):
            published_step(model, learner, images, labels, optimizer)

    backends = backends or resolve(device, tower=TextTower.of(model))
    loss_backend = backends.loss

    def make(encoder, dtype):
        step = TrainStep([learner], CoOpLoss(encoder, scale, dtype, loss_backend), features[None],
                         labels[None], torch.arange(batch, device=device)[None, None, None],
                         torch.full((1, 1), 0.002, device=device), SGD(0.9, 5e-4))

        def run():
            step.start_at_epoch(0, 0)
            step()
        return step, run

    variants = {"published": published,
                "cached_77_tokens": make(ReferenceTextEncoder(model, learner), published_dtype)[1]}
    step, eager = make(FastTextEncoder(model, learner, backends, weight_dtype=precision),
                       precision)
    variants["fastcoop_eager"] = eager
    if precision is None and device == "cpu":  # on request (--precision bf16): CPUs with bf16 units run it faster
        variants["fastcoop_eager_bf16"] = make(FastTextEncoder(model, learner, backends, weight_dtype=torch.bfloat16),
                                               torch.bfloat16)[1]
    if graph and device.startswith("cuda"):  # the whole step in a CUDA graph: each attention, norms fused or not
        for name, options in GRAPH_VARIANTS.items():
            try:
                backends = replace(resolve(device, tower=TextTower.of(model)), **options.get("backends", {}))
                step, _ = make(FastTextEncoder(model, learner, backends, weight_dtype=precision,
                                               pack_rows=options.get("pack_rows", PACK_ROWS)), precision)
                graphed = CudaGraphStep(step)
            except Exception as exc:  # one attention failing on this GPU must not cost the others their numbers
                print(f"  step variant {name}: failed ({str(exc).splitlines()[0][:160]})", flush=True)
                continue
            variants[name] = lambda step=step, graphed=graphed: (step.start_at_epoch(0, 0), graphed())
    return variants


# name → how the variant's encoder differs from the default GPU path: implementations (fastcoop.backends) and the
# attention's tiles. Every variant holds the frozen weights in bf16, as training does.
UNFUSED = dict(add_norm="reference", activation="reference")
GRAPH_VARIANTS = {"fastcoop_graph": {}, "fastcoop_grid_graph": dict(backends=dict(attention="grid")),
                  "fastcoop_flex_graph": dict(backends=dict(attention="flex")),
                  "fastcoop_graph_unfused": dict(backends=UNFUSED),
                  "fastcoop_graph_classwise": dict(pack_rows=None),
                  "fastcoop_graph_fused_mlp": dict(backends=dict(mlp="triton"))}


def time_breakdown(loaded, classnames, device: str, repeats: int, n_ctx: int = 16) -> dict:
    """Where a step's time goes: each component timed alone, for the published step and for fastcoop."""
    from fastcoop.kernels import cosine_ce
    from fastcoop.step import sgd_update_

    model = loaded.model.to(device)
    learner = PromptLearner(model, loaded.tokenizer, classnames, n_ctx=n_ctx).to(device)
    images, labels, features = random_batch(model, len(classnames), device)
    tower, fast = TextTower.of(model), FastTextEncoder(model, learner)
    text = fast().detach().requires_grad_()
    scale = model.logit_scale.exp().detach()
    buffer, lr = torch.zeros_like(learner.ctx), torch.tensor([0.002], device=device)

    def text_fwd_bwd(encode):
        return lambda: torch.autograd.grad(encode().float().square().sum(), learner.ctx)

    def image_encoder():
        with torch.no_grad():
            model.encode_image(images)

    def update():
        with torch.no_grad():
            sgd_update_([learner.ctx], [learner.ctx], [buffer], lr, 0.9, 5e-4)

    parts = {"image encoder (32 images)": image_encoder,
             "text 77 tokens fwd+bwd": text_fwd_bwd(lambda: reference_text_features(tower, learner)),
             "text fast fwd+bwd": text_fwd_bwd(fast),
             "loss fwd+bwd": lambda: torch.autograd.grad(cosine_ce(features, text, scale, labels), text),
             "SGD update": update}
    return {name: median_ms(fn, device, repeats) for name, fn in parts.items()}


def training_memory_gb(model_name: str, classnames, device: str, precision, batch: int = 32, n_ctx: int = 16,
                       shots: int = 16) -> tuple[float, float]:
    """Peak GPU memory a `fastcoop train` run adds, measured as the run holds it: the fast encoder's copy of the
    text blocks (the model stays on the host), the learner, `shots` cached features per class, and the captured
    step; and of that, what is resident before the first step (weights, learner, features)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loaded = load_model(model_name, "none", "cpu")  # stays on the host, as in `fastcoop train`
    model = loaded.model
    learner = PromptLearner(model, loaded.tokenizer, classnames, n_ctx=n_ctx).to(device)
    n = shots * len(classnames)
    features = torch.randn(n, model.visual.output_dim, device=device)
    labels = torch.arange(n, device=device) % len(classnames)
    backends = resolve(device, tower=TextTower.of(model))
    encode = FastTextEncoder(model, learner, backends, weight_dtype=precision)
    order = torch.randperm(n, device=device)[:n // batch * batch].view(1, 1, n // batch, batch)
    loss = CoOpLoss(encode, model.logit_scale.exp().detach().to(device), precision, backends.loss)
    step = TrainStep([learner], loss, features[None], labels[None], order, torch.full((1, 1), 0.002, device=device),
                     SGD(0.9, 5e-4))
    resident = torch.cuda.memory_allocated() - before
    graphed = CudaGraphStep(step)
    for _ in range(3):
        graphed()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 1e9, resident / 1e9


def run_step_section(configs, device: str, repeats: int) -> list[dict]:
    """Time every step variant for each (model, K, M, csc) configuration; one model load per architecture."""
    rows = []
    precision = torch.bfloat16 if device.startswith("cuda") else None
    loaded = {}
    for model_name, k, n_ctx, csc in configs:
        if model_name not in loaded:
            loaded = {model_name: load_model(model_name, "none", device)}  # keep one model in memory
        torch.manual_seed(0)
        variants = step_variants(loaded[model_name], real_classnames(k), device, n_ctx=n_ctx, csc=csc,
                                 precision=precision)
        for name, fn in variants.items():
            try:
                graphed = name in GRAPH_VARIANTS
                ms, peak = median_ms(fn, device, repeats), None if graphed else peak_memory_gb(fn, device)
            except Exception as exc:  # keep the other variants' numbers
                print(f"  step {model_name} K={k} {name}: failed ({str(exc).splitlines()[0][:160]})", flush=True)
                continue
            rows.append({"model": model_name, "classes": k, "n_ctx": n_ctx, "csc": csc, "variant": name,
                         "median_ms": ms, "peak_gb": peak})
            print(f"  step {model_name} K={k} M={n_ctx} {'CSC' if csc else 'unified'} {name}: "
                  f"{rows[-1]['median_ms']:.2f} ms", flush=True)
        del variants
    return rows


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
    precision = torch.bfloat16 if args.device.startswith("cuda") else None
    steps = step_variants(loaded, real_classnames(args.classes), args.device, precision=precision)
    rows = {name: {"median_ms": median_ms(fn, args.device, args.repeats), "peak_gb": peak_memory_gb(fn, args.device)}
            for name, fn in steps.items()}
    base = rows["published"]["median_ms"]
    for name, row in rows.items():
        print(f"{name:<18s} {row['median_ms']:10.1f} ms   {base / row['median_ms']:6.1f}× vs published")
    print(json.dumps({"device": args.device, "classes": args.classes, "model": args.model, "rows": rows}))


if __name__ == "__main__":
    main()
