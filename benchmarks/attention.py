"""The packed attention alone, forward + backward in a CUDA graph: the Triton kernel for several group sizes
(classes per program), with the prefix in the classes' launch or in its own, with fewer warps, with several
classes packed into each tile, against the grid reference, on the real packed layout of K class names.
(FlexAttention is compared in the whole step, benchmarks/step.py: each layout costs it a compilation.)"""

import torch

from benchmarks.common import graphed, median_ms, real_classnames
from fastcoop.kernels.prefix_attention_kernel import group_size, prefix_attention_triton
from fastcoop.kernels.prefix_attention_reference import PackedLayout, prefix_attention_reference
from fastcoop.models import load_model
from fastcoop.prompts import PromptLearner
from fastcoop.text_encoder import FastTextEncoder
from fastcoop.text_tower import TextTower

GROUPS = (1, 2, 4, 8)  # (the default group at K = 1000 is ~15: "as called by default")
WARPS_GROUPS = (1, 4)
# classes packed into tiles of up to this many rows (PackedLayout's pack_rows), with the warps for that height
PACKED = ((32, 4), (64, 4), (64, 8))


def run_attention_section(ks, device: str, repeats: int, model_name: str = "ViT-B-16", n_ctx: int = 16) -> list[dict]:
    """One row per (K, implementation): median ms of one layer's attention, forward + backward, bf16."""
    loaded = load_model(model_name, "none", "cpu")
    attn = TextTower.of(loaded.model).blocks[0].attn
    heads, dh = attn.num_heads, attn.embed_dim // attn.num_heads
    rows = []
    for k in ks:
        learner = PromptLearner(loaded.model, loaded.tokenizer, real_classnames(k), n_ctx=n_ctx)
        names = FastTextEncoder(loaded.model, learner).layout  # the real packing of these names
        layout = PackedLayout.of(names.lengths, device, prefix_len=names.prefix_len)
        rows_total = int(layout.segment_lengths.sum())
        qkv = torch.randn(rows_total, 3, heads, dh, device=device, dtype=torch.bfloat16, requires_grad=True)
        upstream = torch.randn(rows_total, heads, dh, device=device, dtype=torch.bfloat16)
        default = group_size(len(names.segment_starts), heads, qkv.device)
        as_called = PackedLayout.of(names.lengths, device, names.prefix_len, names.pack_rows)
        variants = {f"triton as called by default (packed {names.pack_rows} rows, group {default})":
                    lambda: prefix_attention_triton(qkv, as_called)}
        for g in GROUPS:
            for apart in (False, True):
                name = f"triton group {g}{', prefix launched apart' if apart else ''}"
                variants[name] = lambda g=g, apart=apart: prefix_attention_triton(qkv, layout, g, apart)
        for g in WARPS_GROUPS:  # 16-row class tiles fill one warp's matrix instructions: fewer warps per program
            variants[f"triton group {g}, prefix launched apart, 2 warps"] = \
                lambda g=g: prefix_attention_triton(qkv, layout, g, True, num_warps=2)
        for pack_rows, warps in PACKED:  # or several classes per tile: fewer, fuller matrix instructions
            tiled = PackedLayout.of(names.lengths, device, names.prefix_len, pack_rows)
            for g, apart in [(g, True) for g in WARPS_GROUPS] + [(1, False)]:
                where = "prefix launched apart" if apart else "prefix in the classes' launch"
                variants[f"triton packed {pack_rows} rows, group {g}, {where}, {warps} warps"] = \
                    lambda g=g, apart=apart, tiled=tiled, w=warps: prefix_attention_triton(qkv, tiled, g, apart,
                                                                                            num_warps=w)
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
