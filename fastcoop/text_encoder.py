"""Text features of the K learned prompts: the published computation, and an exact fast one.

reference: all K prompts, 77 tokens each, through the text transformer with its causal mask, pooled at EOS.
fast: the same numbers with less work, exact because the mask is causal and the output is read at EOS only:
  1. tokens after the longest prompt's EOS cannot reach any pooled output: cut every prompt there;
  2. with one shared context and the class name after it (end/middle), every prompt starts with the same
     [SOS][V]_1..: its hidden states are the same for every class, so they are computed once and each class's
     few remaining tokens attend to the shared keys and values (no per-class copies);
  3. the last block runs only for the pooled rows.
Towers for which this is not exact (no causal mask, other pooling, custom blocks) fall back to `reference`.
"""

import math
import warnings

import torch
import torch.nn.functional as F

from fastcoop.prompts import PromptLearner
from fastcoop.text_tower import TextTower

_warned: set[str] = set()


def encode_prompts(model, learner: PromptLearner, mode: str = "fast") -> torch.Tensor:
    """K × D text features as CLIP's encode_text returns them (before normalisation), differentiable in ctx."""
    tower = TextTower.of(model)
    if mode == "reference":
        return _reference(tower, learner)
    if mode != "fast":
        raise ValueError(f"mode must be 'fast' or 'reference', not '{mode}'")
    problem = tower.fast_path_problem()
    if problem:
        if problem not in _warned:
            _warned.add(problem)
            warnings.warn(f"fast text path is not exact for this model ({problem}): using the reference path")
        return _reference(tower, learner)
    eos = tower.pool_positions(learner.tokens)
    if learner.shared_prefix_length():
        return _shared_prefix(tower, learner, eos)
    return _cut_at_eos(tower, learner, eos)


def _reference(tower: TextTower, learner: PromptLearner) -> torch.Tensor:
    x = learner() + tower.positional_embedding
    mask = tower.attn_mask
    for block in tower.blocks:
        x = block(x, attn_mask=mask)
    x = tower.ln_final(x)
    rows = torch.arange(len(x), device=x.device)
    return tower.project(x[rows, tower.pool_positions(learner.tokens).to(x.device)])


def _cut_at_eos(tower: TextTower, learner: PromptLearner, eos: torch.Tensor) -> torch.Tensor:
    length = int(eos.max()) + 1
    x = learner()[:, :length] + tower.positional_embedding[:length]
    causal = tower.attn_mask[:length, :length]
    blocks = list(tower.blocks)
    for block in blocks[:-1]:
        x = block(x, attn_mask=causal)
    rows = torch.arange(len(x), device=x.device)
    eos = eos.to(x.device)
    x = _block_at_rows(blocks[-1], x, eos, causal)  # last block: only the pooled rows
    return tower.project(tower.ln_final(x))


def _block_at_rows(block, x: torch.Tensor, rows_at: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """One block's output at position rows_at[k] of sequence k (keys and values still from the whole prefix)."""
    k_index = torch.arange(len(x), device=x.device)
    h = block.ln_1(x)
    q, k, v = _qkv(block, h)
    q_rows = q[k_index, :, rows_at].unsqueeze(2)  # K × H × 1 × dh
    mask = causal[rows_at].unsqueeze(1).unsqueeze(1)  # K × 1 × 1 × T
    attn = F.scaled_dot_product_attention(q_rows, k, v, attn_mask=mask).squeeze(2)
    y = x[k_index, rows_at] + block.ls_1(block.attn.out_proj(attn.flatten(1)))
    return y + block.ls_2(block.mlp(block.ln_2(y)))


def _qkv(block, h: torch.Tensor):
    """Split nn.MultiheadAttention's packed projection into per-head q, k, v: each (..., H, T, dh)."""
    heads = block.attn.num_heads
    qkv = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias)
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).unbind(-3)
    return q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2)


def _shared_prefix(tower: TextTower, learner: PromptLearner, eos: torch.Tensor) -> torch.Tensor:
    """Shared [SOS][V].. computed once (1 sequence); each class's suffix attends to it and to itself."""
    P = learner.shared_prefix_length()
    length = int(eos.max()) + 1
    prompts = learner()
    pos = tower.positional_embedding
    prefix = prompts[:1, :P] + pos[:P]  # identical for every class
    suffix = prompts[:, P:length] + pos[P:length]
    causal = tower.attn_mask[P:length, P:length]
    prefix_mask = tower.attn_mask[:P, :P]
    blocks = list(tower.blocks)
    for i, block in enumerate(blocks):
        hp, hs = block.ln_1(prefix), block.ln_1(suffix)
        qp, kp, vp = _qkv(block, hp)  # 1 × H × P × dh
        qs, ks, vs = _qkv(block, hs)  # K × H × S × dh
        last = i == len(blocks) - 1
        if last:  # only the pooled row of each class is read after the last block
            k_index = torch.arange(len(suffix), device=suffix.device)
            at = (eos.to(suffix.device) - P)
            qs = qs[k_index, :, at].unsqueeze(2)
            mask = causal[at].unsqueeze(1).unsqueeze(1)
            suffix = suffix[k_index, at].unsqueeze(1)
        else:
            mask = causal
        attn = _attend_prefix_and_self(qs, kp[0], vp[0], ks, vs, mask)
        suffix = suffix + block.ls_1(block.attn.out_proj(attn.transpose(1, 2).flatten(2)))
        suffix = suffix + block.ls_2(block.mlp(block.ln_2(suffix)))
        if not last:
            prefix_attn = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=prefix_mask)
            prefix = prefix + block.ls_1(block.attn.out_proj(prefix_attn.transpose(1, 2).flatten(2)))
            prefix = prefix + block.ls_2(block.mlp(block.ln_2(prefix)))
    return tower.project(tower.ln_final(suffix[:, 0]))


def _attend_prefix_and_self(q, k_prefix, v_prefix, k_self, v_self, mask):
    """softmax([q·k_prefix, q·k_self + mask]) @ [v_prefix; v_self], with the prefix broadcast, never copied.

    q, k_self, v_self: K × H × S × dh; k_prefix, v_prefix: H × P × dh; mask: additive, broadcastable to K×H×S×S.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores_prefix = torch.einsum("khsd,hpd->khsp", q, k_prefix) * scale
    scores_self = (q @ k_self.transpose(-1, -2)) * scale + mask
    probs = torch.softmax(torch.cat([scores_prefix, scores_self], dim=-1), dim=-1)
    P = k_prefix.shape[1]
    return torch.einsum("khsp,hpd->khsd", probs[..., :P], v_prefix) + probs[..., P:] @ v_self
