"""Exactness beside speed: fastcoop against the published computation, for each step configuration (fp32)."""

import torch

from benchmarks.common import real_classnames
from fastcoop.backends import resolve
from fastcoop.models import load_model
from fastcoop.prompts import PromptLearner
from fastcoop.methods.coop import CoOpLoss
from fastcoop.step import SGD, TrainStep
from fastcoop.text_encoder import FastTextEncoder, ReferenceTextEncoder
from fastcoop.text_tower import TextTower


def run_exactness_section(configs, device: str, steps: int) -> list[dict]:
    """Max |Δ| of the text features (relative to their max magnitude), and of the context after `steps` SGD
    steps on the same random batches, fast path against the 77-token reference."""
    rows, loaded = [], {}
    for model_name, k, n_ctx, csc in configs:
        if model_name not in loaded:
            loaded = {model_name: load_model(model_name, "none", device)}
        model, tokenizer = loaded[model_name].model, loaded[model_name].tokenizer
        backends = resolve(device, tower=TextTower.of(model))  # what training runs here: the kernels on a GPU
        gen = torch.Generator().manual_seed(0)
        features = torch.randn(4 * 32, model.text_projection.shape[-1], generator=gen).to(device)
        labels = torch.randint(k, (4 * 32,), generator=gen).to(device)
        contexts, texts = [], []
        for fast in (True, False):
            torch.manual_seed(0)
            learner = PromptLearner(model, tokenizer, real_classnames(k), n_ctx=n_ctx, csc=csc).to(device)
            encode = FastTextEncoder(model, learner, backends) if fast else ReferenceTextEncoder(model, learner)
            with torch.no_grad():
                texts.append(encode().float())
            generator = torch.Generator().manual_seed(1)
            epochs = -(-steps // 4)  # 4 steps of 32 per epoch
            orders = torch.stack([torch.randperm(128, generator=generator) for _ in range(epochs)]).view(epochs, 4, 32)
            step = TrainStep([learner], CoOpLoss(encode, model.logit_scale.exp().detach(), None, backends.loss),
                             features[None], labels[None], orders[None].to(device),
                             torch.full((1, epochs), 0.002, device=device), SGD(0.9, 5e-4))
            for _ in range(steps):
                step()
            contexts.append(learner.ctx.detach().float())
        (fast_text, ref_text), (fast_ctx, ref_ctx) = texts, contexts
        rows.append({"model": model_name, "classes": k, "n_ctx": n_ctx, "csc": csc, "attention": backends.attention,
                     "steps": steps,
                     "text_max_abs_diff_rel": ((fast_text - ref_text).abs().max() / ref_text.abs().max()).item(),
                     "ctx_max_abs_diff": (fast_ctx - ref_ctx).abs().max().item(),
                     "ctx_rel_norm_diff": ((fast_ctx - ref_ctx).norm() / ref_ctx.norm()).item()})
        print(f"  exactness {model_name} K={k} M={n_ctx} {'CSC' if csc else 'unified'}: "
              f"text {rows[-1]['text_max_abs_diff_rel']:.1e}, ctx after {steps} steps "
              f"{rows[-1]['ctx_rel_norm_diff']:.1e}", flush=True)
    return rows
