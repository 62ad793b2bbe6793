"""The packed attention alone, forward + backward in a CUDA graph: the Triton kernel for several group sizes
(classes per program), with the prefix in the classes' launch or in its own, against the grid reference, on the
real packed layout of K class names. (FlexAttention is compared in the whole step, benchmarks/step.py: each
layout costs it a compilation.)"""

import torch

from benchmarks.common import graphed, median_ms, real_classnames
from fastcoop.kernels.prefix_attention_kernel import group_size, prefix_attention_triton
from fastcoop.kernels.prefix_attention_reference import PackedLayout, prefix_attention_reference
from fastcoop.models import load_model
from fastcoop.prompts import PromptLearner
from fastcoop.text_encoder import FastTextEncoder
from fastcoop.text_tower import TextTower

GROUPS = (1, 2, 4, 8, 16)
WARPS_GROUPS = (1, 4)


def run_attention_section(ks, device: str, repeats: int, model_name: str = "ViT-B-16", n_ctx: int = 16) -> list[dict]:
    """One row per (K, implementation): median ms of one layer's attention, forward + backward, bf16."""
    loaded = load_model(model_name, "none", "cpu")
    attn = TextTower.of(loaded.model).blocks[0].attn
    heads, dh = attn.num_heads, attn.embed_dim // attn.num_heads
    rows = []
    for k in ks:
        learner = PromptLearner(loaded.model, loaded.tokenizer, real_classnames(k), n_ctx=n_ctx)
        packed = FastTextEncoder(loaded.model, learner).layout  # the real packing of these names
        layout = PackedLayout.of(packed.lengths, device, prefix_len=packed.prefix_len)
        rows_total = int(layout.segment_lengths.sum())
        qkv = torch.randn(rows_total, 3, heads, dh, device=device, dtype=torch.bfloat16, requires_grad=True)
        upstream = torch.randn(rows_total, heads, dh, device=device, dtype=torch.bfloat16)
        default = group_size(len(layout.segment_starts), heads, qkv.device)
        variants = {f"triton as called by default (group {default})": lambda: prefix_attention_triton(qkv, layout)}
        for g in GROUPS:
            for apart in (False, True):
                name = f"triton group {g}{', prefix launched apart' if apart else ''}"
                variants[name] = lambda g=g, apart=apart: prefix_attention_triton(qkv, layout, g, apart)
        for g in WARPS_GROUPS:  # 16-row class tiles fill one warp's matrix instructions: fewer warps per program
            variants[f"triton group {g}, prefix launched apart, 2 warps"] = \
                lambda g=g: prefix_attention_triton(qkv, layout, g, True, num_warps=2)
        variants["grid"] = lambda: prefix_attention_reference(qkv, layout)
        for name, attend in variants.items():
            def step(attend=attend):
                torch.autograd.grad(attend(), qkv, upstream)
            try:
                ms = median_ms(graphed(step), device, repeats)
            except Exception as exc:  # one variant failing must not lose the others
                print(f"  attention K={k} {name}: failed ({str(exc).splitlines()[0][:120]})", flush=True)
                continue
            rows.append({"classes": k, "rows": rows_total, "heads": heads, "implementation": name, "graph_ms": ms})
            print(f"  attention K={k} ({rows_total} rows) {name}: {ms:.4f} ms", flush=True)
    return rows
