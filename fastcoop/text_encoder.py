"""Text features of the K learned prompts: the published computation, and an exact fast one.

reference: all K prompts, 77 tokens each, through the text transformer with its causal mask, pooled at EOS.
fast: the same numbers with less work, exact because the mask is causal and the output is read at EOS only:
  1. tokens after a prompt's EOS cannot reach its pooled output: each prompt is cut after its own EOS and the
     prompts are packed (no padding) for every per-token operation (layer norms, projections, MLP);
  2. with one shared context and the class name after it (end/middle), every prompt starts with the same
     [SOS][V]_1..: its hidden states are the same for every class, so they are computed once and each class's
     few remaining tokens attend to the shared keys and values (broadcast, never copied);
  3. the last block runs only for the EOS rows.
Towers for which this is not exact (no causal mask, other pooling, custom blocks) fall back to `reference`.
"""

import functools
import math
import warnings

import torch
import torch.nn.functional as F

from fastcoop.prompts import PromptLearner
from fastcoop.text_tower import TextTower

_warned: set[str] = set()


def encode_prompts(model, learner: PromptLearner, mode: str = "fast") -> torch.Tensor:
    """K × D text features as CLIP's encode_text returns them (before normalisation), differentiable in ctx.
    In a loop, build a FastTextEncoder once instead: it prepares the packing once."""
    if mode == "reference":
        return reference_text_features(TextTower.of(model), learner)
    if mode != "fast":
        raise ValueError(f"mode must be 'fast' or 'reference', not '{mode}'")
    return FastTextEncoder(model, learner)()


def reference_text_features(tower: TextTower, learner: PromptLearner) -> torch.Tensor:
    """The published computation: K × 77 tokens through every block, pooled at EOS, projected."""
    x = learner() + tower.positional_embedding
    for block in tower.blocks:
        x = block(x, attn_mask=tower.attn_mask)
    x = tower.ln_final(x)
    rows = torch.arange(len(x), device=x.device)
    return tower.project(x[rows, tower.pool_positions(learner.tokens)])


class FastTextEncoder:
    """The exact fast path for one learner. Everything static (packing, positions, masks) is prepared here once,
    so a call is device work only: no host synchronisation, safe to capture in a CUDA graph.

    attention="grid": each class's packed tokens are scattered into a K × S grid for attention (plain PyTorch);
    attention="flex": one FlexAttention call over [prefix; packed tokens] with a block mask (prefix for everyone,
    causal within a class), no grid at all; compiled on GPU."""

    def __init__(self, model, learner: PromptLearner, attention: str = "grid"):
        if attention not in ("grid", "flex"):
            raise ValueError(f"attention must be 'grid' or 'flex', not '{attention}'")
        self.tower, self.learner, self.attention = TextTower.of(model), learner, attention
        self.problem = self.tower.fast_path_problem()
        if self.problem:
            if self.problem not in _warned:
                _warned.add(self.problem)
                warnings.warn(f"fast text path is not exact for this model ({self.problem}): using the reference path")
            return
        device = learner.ctx.device
        eos = self.tower.pool_positions(learner.tokens).cpu()
        P = learner.shared_prefix_length()
        lengths = eos - P + 1  # tokens per class after the shared prefix, EOS included
        K, S = len(lengths), int(lengths.max())
        classes = torch.repeat_interleave(torch.arange(K), lengths)
        offsets = torch.cat([torch.arange(n) for n in lengths.tolist()])
        positions = P + offsets
        self.K, self.S, self.P = K, S, P
        self.pack = self._sources(classes, positions, device)
        self.prefix = self._sources(torch.zeros(P, dtype=torch.long), torch.arange(P), device) if P else None
        self.padded_index = (classes * S + offsets).to(device)  # packed row → row of the K × S grid
        self.eos_rows = (lengths.cumsum(0) - 1).to(device)  # packed row of each class's EOS
        causal = self.tower.attn_mask
        self.causal = causal[P:P + S, P:P + S].to(device)
        self.eos_mask = self.causal[(lengths - 1).to(device)][:, None, None, :]  # K × 1 × 1 × S
        if attention == "flex":
            self.block_mask = _prefix_and_class_mask(torch.cat([torch.full((P,), -1), classes]).to(device))

    def _sources(self, classes, positions, device):
        """For each packed token: its frozen embedding + positional embedding, and where its context vector is."""
        learner = self.learner
        slot = learner.ctx_slot[classes, positions].cpu()
        return {
            "frozen": (learner.base[classes, positions] + self.tower.positional_embedding[positions]).detach(),
            "is_ctx": (slot >= 0)[:, None].to(device),
            "ctx_index": learner.ctx_index(classes, slot.clamp(min=0)).to(device),
        }

    def _embed(self, sources) -> torch.Tensor:
        ctx = self.learner.flat_ctx()[sources["ctx_index"]]
        return sources["frozen"] + torch.where(sources["is_ctx"], ctx, torch.zeros_like(ctx))

    def __call__(self) -> torch.Tensor:
        if self.problem:
            return reference_text_features(self.tower, self.learner)
        if self.attention == "flex":
            return self._forward_flex()
        x = self._embed(self.pack)  # N packed tokens × D
        prefix = self._embed(self.prefix)[None] if self.P else None  # 1 × P × D
        blocks = list(self.tower.blocks)
        for i, block in enumerate(blocks):
            last = i == len(blocks) - 1
            q, k, v = _qkv(block, block.ln_1(x))  # each N × H × dh
            kp = vp = None
            if prefix is not None:
                qp, kp, vp = (t[0] for t in _qkv(block, block.ln_1(prefix)))  # each P × H × dh
            k_grid, v_grid = self._to_grid(k), self._to_grid(v)  # K × H × S × dh
            if last:  # only each class's EOS row is read after the last block
                q_grid = q[self.eos_rows][:, :, None]  # K × H × 1 × dh
                x = x[self.eos_rows]
                attn = _attend(q_grid, kp, vp, k_grid, v_grid, self.eos_mask)[:, :, 0].flatten(1)
            else:
                attn = _attend(self._to_grid(q), kp, vp, k_grid, v_grid, self.causal)
                attn = attn.transpose(1, 2).reshape(self.K * self.S, -1)[self.padded_index]
            x = x + block.ls_1(block.attn.out_proj(attn))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
            if prefix is not None and not last:
                out = F.scaled_dot_product_attention(qp.transpose(0, 1), kp.transpose(0, 1), vp.transpose(0, 1),
                                                     is_causal=True)
                prefix = prefix + block.ls_1(block.attn.out_proj(out.transpose(0, 1).flatten(1)))[None]
                prefix = prefix + block.ls_2(block.mlp(block.ln_2(prefix)))
        return self.tower.project(self.tower.ln_final(x))

    def _forward_flex(self) -> torch.Tensor:
        """All tokens as one sequence [prefix; class 0 tokens; class 1 tokens; ...], attention by block mask."""
        x = self._embed(self.pack)
        if self.P:
            x = torch.cat([self._embed(self.prefix), x])
        eos = self.eos_rows + self.P
        blocks = list(self.tower.blocks)
        for i, block in enumerate(blocks):
            q, k, v = (t.transpose(0, 1)[None] for t in _qkv(block, block.ln_1(x)))  # 1 × H × T × dh
            attn = _flex_attention(q, k, v, block_mask=self.block_mask)[0].transpose(0, 1).flatten(1)
            if i == len(blocks) - 1:  # only the EOS rows are read after the last block
                x, attn = x[eos], attn[eos]
            x = x + block.ls_1(block.attn.out_proj(attn))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return self.tower.project(self.tower.ln_final(x))

    def _to_grid(self, t: torch.Tensor) -> torch.Tensor:
        """Packed N × H × dh → K × H × S × dh, zeros after each class's EOS (never attended: causal mask)."""
        grid = t.new_zeros(self.K * self.S, *t.shape[1:]).index_copy(0, self.padded_index, t)
        return grid.view(self.K, self.S, *t.shape[1:]).transpose(1, 2)


def _qkv(block, h: torch.Tensor):
    """nn.MultiheadAttention's packed input projection split into q, k, v, each (..., H, dh)."""
    qkv = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias)
    return qkv.unflatten(-1, (3, block.attn.num_heads, -1)).unbind(-3)


def _attend(q, k_prefix, v_prefix, k_self, v_self, mask):
    """softmax([q·k_prefix, q·k_self + mask] / √dh) @ [v_prefix; v_self], the prefix broadcast, never copied.

    q: K × H × Q × dh; k_self, v_self: K × H × S × dh; k_prefix, v_prefix: P × H × dh or None; mask: additive."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k_self.transpose(-1, -2)) * scale + mask
    if k_prefix is None:
        return torch.softmax(scores, dim=-1) @ v_self
    scores_prefix = torch.einsum("khqd,phd->khqp", q, k_prefix) * scale
    probs = torch.softmax(torch.cat([scores_prefix, scores], dim=-1), dim=-1)
    P = k_prefix.shape[0]
    return torch.einsum("khqp,phd->khqd", probs[..., :P], v_prefix) + probs[..., P:] @ v_self


def _prefix_and_class_mask(doc: torch.Tensor):
    """FlexAttention block mask over [prefix (doc −1); packed classes (doc k)]: a token sees earlier tokens that
    are in the shared prefix or in its own class."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        return (kv <= q) & ((doc[kv] == doc[q]) | (doc[kv] < 0))

    return create_block_mask(mask_mod, None, None, len(doc), len(doc), device=doc.device)


def _flex_attention(q, k, v, block_mask):
    """FlexAttention: compiled on GPU (its fused kernel); eager elsewhere (a dense reference, for tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    if q.is_cuda:
        return _compiled_flex_attention()(q, k, v, block_mask=block_mask)
    return flex_attention(q, k, v, block_mask=block_mask)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)
