"""Text features of the K learned prompts: the published computation, and an exact fast one.

reference: all K prompts, 77 tokens each, through the text transformer with its causal mask, pooled at EOS.
fast: the same numbers with less work, exact because the mask is causal and the output is read at EOS only:
  1. tokens after a prompt's EOS cannot reach its pooled output: each prompt is cut after its own EOS and the
     prompts are packed (no padding) for every per-token operation (layer norms, projections, MLP);
  2. with one shared context and the class name after it (end/middle), every prompt starts with the same
     [SOS][V]_1..: its hidden states are the same for every class, so they are computed once and each class's
     few remaining tokens attend to the shared keys and values (broadcast, never copied);
  3. after the last block's attention only the EOS rows go on (output projection, MLP, final norm).
Towers for which this is not exact (no causal mask, other pooling, custom blocks) run `reference`: the resolver
(fastcoop.backends) decides, and `text_encoder` builds what it decided.
"""

import torch
import torch.nn.functional as F

from fastcoop.backends import Backends, unfit_for
from fastcoop.kernels.add_layer_norm_reference import add_layer_norm_reference
from fastcoop.kernels.prefix_attention_flex import prefix_attention_flex, prefix_class_block_mask
from fastcoop.kernels.prefix_attention_reference import PackedLayout, prefix_attention_reference
from fastcoop.prompts import PromptLearner
from fastcoop.text_tower import TextTower

try:
    from fastcoop.kernels import add_layer_norm_kernel, mlp_kernel
    from fastcoop.kernels.prefix_attention_kernel import prefix_attention_triton
    from fastcoop.kernels.quick_gelu_kernel import quick_gelu_triton
except ImportError:  # no Triton on this platform
    add_layer_norm_kernel = mlp_kernel = prefix_attention_triton = quick_gelu_triton = None

# Triton attention tiles hold runs of whole classes up to 64 rows: fewer, fuller programs than one class per tile
# (benchmarks/CHANGELOG.md has the timings)
PACK_ROWS = 64


def encode_prompts(model, learner: PromptLearner, mode: str = "fast") -> torch.Tensor:
    """K × D text features as CLIP's encode_text returns them (before normalisation), differentiable in ctx; fast:
    the fast path with every op's reference. In a loop, build an encoder once instead (text_encoder): the fast one
    prepares the packing once."""
    if mode not in ("fast", "reference"):
        raise ValueError(f"mode must be 'fast' or 'reference', not '{mode}'")
    return text_encoder(model, learner, Backends(text=mode))()


def text_encoder(model, learners: PromptLearner | list[PromptLearner], backends: Backends,
                 weight_dtype: torch.dtype | None = None):
    """The text encoder `backends.text` names for one learner, or for the learners of a stack (of one or more
    prompt layouts): FastTextEncoder, or the published computation behind the same calls (ReferenceTextEncoder)."""
    if backends.text == "reference":
        return ReferenceTextEncoder(model, learners)
    return FastTextEncoder(model, learners, backends, weight_dtype)


def reference_text_features(tower: TextTower, learner: PromptLearner, ctx: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """The published computation: K × 77 tokens through every block, pooled at EOS, projected (the prompts made
    with `ctx` in place of the learner's context, when given)."""
    x = learner(tower.token_embedding, ctx) + tower.positional_embedding
    for block in tower.blocks:
        x = block(x, attn_mask=tower.attn_mask)
    x = tower.ln_final(x)
    rows = torch.arange(len(x), device=x.device)
    return tower.project(x[rows, tower.pool_positions(learner.tokens)])


def _one_per_layout(learners) -> list[PromptLearner]:
    """A learner, or the first learner of each prompt layout among several."""
    first = {}
    for learner in learners if isinstance(learners, (list, tuple)) else [learners]:
        first.setdefault(learner.layout, learner)
    return list(first.values())


def _layout_indices(learners: list[PromptLearner]) -> dict[tuple, int]:
    """Each learner's prompt layout → its index among `learners` (one learner per layout)."""
    return {learner.layout: i for i, learner in enumerate(learners)}


class ReferenceTextEncoder:
    """The published computation called as FastTextEncoder is: K × D features of the learner's prompts, or, given R
    contexts shaped like the learner's, R × K × D (each context's prompts in turn); `encode_each` for several
    learners' layouts."""

    def __init__(self, model, learners: PromptLearner | list[PromptLearner]):
        self.tower, self.learners = TextTower.of(model), _one_per_layout(learners)
        self.layouts = _layout_indices(self.learners)

    def __call__(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        return self._encode(self.learners[0], ctx)

    def encode_each(self, contexts: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Learner i's layout → R_i contexts shaped like its context → their R_i × K × D features."""
        return {i: self._encode(self.learners[i], ctx) for i, ctx in contexts.items()}

    def _encode(self, learner: PromptLearner, ctx: torch.Tensor | None) -> torch.Tensor:
        if ctx is None:
            return reference_text_features(self.tower, learner)
        return torch.stack([reference_text_features(self.tower, learner, each) for each in ctx])


class PackedPrompts:
    """One learner's prompts as the fast path packs them, prepared once: the packed rows' frozen embeddings (the
    shared prefix once, then each class's own tokens up to its EOS), where the context goes, each class's EOS
    row, and the attention layout. Prompts of the same layout (a stack's runs) share it."""

    def __init__(self, tower: TextTower, learner: PromptLearner, positional_embedding: torch.Tensor, attention: str,
                 pack_rows: int | None):
        """`tower`: the model's (its token embedding is read where it is); `positional_embedding`: on the learner's
        device."""
        device = learner.ctx.device
        eos = tower.pool_positions(learner.tokens).cpu()
        P = learner.shared_prefix_length()
        lengths = eos - P + 1  # tokens per class after the shared prefix, EOS included
        self.layout = layout = PackedLayout.of(lengths, device, prefix_len=P, pack_rows=pack_rows)
        self.attention = attention
        # the packed rows: the shared prefix (class 0's first P tokens), then each class's own tokens
        classes = torch.cat([torch.zeros(P, dtype=torch.long, device=device), layout.classes])
        positions = torch.cat([torch.arange(P, device=device), P + layout.offsets])
        slot = learner.ctx_slot[classes, positions]
        frozen = learner.frozen(tower.token_embedding, classes, positions)  # looked up where the embedding is
        self.frozen = (frozen + positional_embedding[positions]).detach()
        self.ctx_rows = (slot >= 0).nonzero()[:, 0]  # rows holding a context vector, and which one
        index = learner.ctx_index(classes[self.ctx_rows], slot[self.ctx_rows])
        # None where the rows hold the context in its own order (a shared prefix, or CSC with the name after it)
        self.ctx_index = None if torch.equal(index, torch.arange(len(learner.flat_ctx()), device=device)) else index
        self.eos_rows = P + layout.starts + layout.lengths - 1  # each class's EOS row
        self.block_mask = prefix_class_block_mask(layout) if attention == "flex" else None

    def embed(self, ctx: torch.Tensor | None, learner: PromptLearner) -> torch.Tensor:
        """Token + positional embeddings of the packed rows, the learned context (learner's, or R stacked contexts
        shaped like it: R copies of the rows, one after another) added where it goes. Gathers and scatters are
        index_select and index_add, whose gradients are each other, not indexing, whose gradient sorts its
        indices on a GPU."""
        if ctx is None:
            rows = learner.flat_ctx()
            if self.ctx_index is not None:
                rows = rows.index_select(0, self.ctx_index)
            return self.frozen.index_add(0, self.ctx_rows, rows.to(self.frozen.dtype))
        rows = ctx.reshape(len(ctx), -1, ctx.shape[-1])
        if self.ctx_index is not None:
            rows = rows.index_select(1, self.ctx_index)
        stacked = self.frozen.expand(len(ctx), -1, -1).index_add(1, self.ctx_rows, rows.to(self.frozen.dtype))
        return stacked.flatten(0, 1)

    def attend(self, qkv: torch.Tensor, runs: int, heads: int) -> torch.Tensor:
        """Attention over the packed rows of `runs` stacked contexts: every context's rows share one layout and
        never attend to another's, so the contexts become more heads of one call (the Triton kernel addresses
        each run's heads where they are; the others take them as copies, heads first). qkv: runs·T × 3·D."""
        if self.attention == "triton":
            return prefix_attention_triton(qkv.view(runs, -1, 3, heads, qkv.shape[-1] // (3 * heads)),
                                           self.layout).view(len(qkv), -1)
        if runs == 1:
            return self._attend(qkv.unflatten(-1, (3, heads, -1))).flatten(1)
        T = len(qkv) // runs
        qkv = qkv.view(runs, T, 3, heads, -1).permute(1, 2, 0, 3, 4).reshape(T, 3, runs * heads, -1)
        out = self._attend(qkv)  # T × runs·heads × dh
        return out.view(T, runs, -1).transpose(0, 1).reshape(runs * T, -1)

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        if self.attention == "flex":
            return prefix_attention_flex(qkv, self.block_mask)
        return prefix_attention_reference(qkv, self.layout)


class FastTextEncoder:
    """The exact fast path for one learner, or for learners of different prompt layouts (context length, class
    position, unified or class-specific) that train together: every per-token op (layer norms, projections, MLP)
    runs once over all their packed rows, the attention once per layout. Everything static (packing, positions,
    masks) is prepared here once, so a call is device work only: no host synchronisation, safe to capture in a
    CUDA graph.

    It runs on the learners' device, each op by the implementation `backends` names (fastcoop.backends; default:
    its choice for that device). The attention over the packed rows: "grid", plain PyTorch on a K × S grid (the
    reference); "triton", the fused kernel; "flex", FlexAttention with a block mask (compiled on GPU).

    When the model is elsewhere (training keeps it on the host) or weight_dtype is given, the encoder runs a
    copy of the tower's blocks on the learner's device (TextTower.copy_to), their matrix weights in weight_dtype:
    the dtype the encoder runs under autocast (bf16 on GPU) gives identical numbers without per-call weight
    casts (autocast does not cache casts of frozen weights) and with half the bytes.

    The elementwise work in Triton kernels, one launch each way where PyTorch needs several: each residual add
    with the layer norm after it (backends.add_norm; add_layer_norm_kernel.py, which also hands the next GEMM its
    input in the autocast dtype) and QuickGELU (backends.activation; quick_gelu_kernel.py).

    pack_rows: the Triton attention's tiles hold runs of whole classes up to this many rows (PackedLayout.of);
    None: one class per tile.

    backends.mlp: each MLP's activation inside Triton matrix products (mlp_kernel.py) instead of passes of its
    own (opt-in: the step benchmark's fastcoop_graph_fused_mlp variant times it)."""

    def __init__(self, model, learners: PromptLearner | list[PromptLearner], backends: Backends = Backends(),
                 weight_dtype: torch.dtype | None = None, pack_rows: int | None = PACK_ROWS):
        tower = TextTower.of(model)
        problem = tower.fast_path_problem()
        if problem:
            raise ValueError(f"the fast text path is not exact for this model ({problem}): fastcoop.backends.resolve "
                             "chooses the reference path for it")
        unfit = unfit_for(tower, backends)
        if unfit:  # what resolve(..., tower=) would have decided against: never computed wrongly, nor swapped here
            op, why = next(iter(unfit.items()))
            raise ValueError(f"{op}={getattr(backends, op)} cannot run this model ({why}): resolve the backends "
                             "with its tower")
        self.learners = _one_per_layout(learners)
        self.layouts = _layout_indices(self.learners)  # a layout → its learner's index: what encode_each takes
        self.backends, self.tower = backends, tower
        device = self.learners[0].ctx.device
        if weight_dtype is not None or tower.positional_embedding.device != device:
            self.tower = tower.copy_to(device, weight_dtype)
        self.packed = [PackedPrompts(tower, learner, self.tower.positional_embedding, backends.attention, pack_rows)
                       for learner in self.learners]
        self._eos_rows = {}  # (layouts, runs of each) → the EOS rows among their packed rows

    def __call__(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """K × D text features of the (first) learner's prompts; with `ctx`, R contexts shaped like the learner's
        (R × M × D, or R × K × M × D class-specific), R × K × D: each context's prompts, all in one pass."""
        return self._encode([0], [ctx])[0]

    def encode_each(self, contexts: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Learner i's layout → R_i contexts shaped like its context → their R_i × K × D features; all in one
        pass."""
        return dict(zip(contexts, self._encode(list(contexts), list(contexts.values()))))

    def _encode(self, layouts: list[int], contexts: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """Features of each learner's (layouts[i]) prompts with contexts[i] (None: the learner's own)."""
        runs = [1 if ctx is None else len(ctx) for ctx in contexts]
        packed = [self.packed[i] for i in layouts]
        parts = [p.embed(ctx, self.learners[i]) for p, ctx, i in zip(packed, contexts, layouts)]
        sizes = [len(part) for part in parts]
        x = parts[0] if len(parts) == 1 else torch.cat(parts)  # the packed rows × D: the residual stream, in fp32
        eos_rows = self._eos_rows_of(layouts, runs)
        device = x.device.type
        gemm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        blocks = list(self.tower.blocks)
        # each norm's output goes to a GEMM, which would cast it anyway (the final one's only when projected)
        x, y = self._add_norm(x, None, blocks[0].ln_1, gemm_dtype)
        final_dtype = x.dtype if self.tower.text_projection is None else gemm_dtype
        for i, block in enumerate(blocks):
            last = i == len(blocks) - 1
            qkv = F.linear(y, block.attn.in_proj_weight, block.attn.in_proj_bias)
            heads = block.attn.num_heads
            if len(parts) == 1:
                attn = packed[0].attend(qkv, runs[0], heads)
            else:
                attn = torch.cat([p.attend(part, r, heads) for p, part, r in zip(packed, qkv.split(sizes), runs)])
            if last:  # only each class's EOS row is read after the last block
                x, attn = x.index_select(0, eos_rows), attn.index_select(0, eos_rows)
            x, y = self._add_norm(x, block.ls_1(block.attn.out_proj(attn)), block.ln_2, gemm_dtype)
            next_norm, next_dtype = (self.tower.ln_final, final_dtype) if last else (blocks[i + 1].ln_1, gemm_dtype)
            x, y = self._add_norm(x, block.ls_2(self._mlp(block.mlp, y)), next_norm, next_dtype)
        features = self.tower.project(y)
        if len(parts) > 1:  # (a split's gradient is a concatenation, even of one part)
            features = features.split([r * p.layout.num_classes for p, r in zip(packed, runs)])
        else:
            features = [features]
        return [part if ctx is None else part.unflatten(0, (r, -1)) for part, ctx, r in zip(features, contexts, runs)]

    def _eos_rows_of(self, layouts: list[int], runs: list[int]) -> torch.Tensor:
        """Each class's EOS row among the packed rows of these layouts' stacked contexts (each layout's rows, R
        copies one after another, then the next layout's), made once per shape: a call does no index arithmetic."""
        if runs == [1]:
            return self.packed[layouts[0]].eos_rows
        key = (tuple(layouts), tuple(runs))
        if key not in self._eos_rows:
            rows, start = [], 0
            for i, r in zip(layouts, runs):
                packed = self.packed[i]
                copies = torch.arange(r, device=packed.eos_rows.device)[:, None] * len(packed.frozen)
                rows.append((start + copies + packed.eos_rows).flatten())
                start += r * len(packed.frozen)
            self._eos_rows[key] = torch.cat(rows)
        return self._eos_rows[key]

    def _add_norm(self, x, delta, norm, out_dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream x + delta (x without delta), and its norm in out_dtype."""
        if self.backends.add_norm == "triton":
            return add_layer_norm_kernel.add_layer_norm_triton(x, delta, norm, out_dtype)
        return add_layer_norm_reference(x, delta, norm, out_dtype)

    def _mlp(self, mlp, y) -> torch.Tensor:
        if self.backends.mlp == "triton":
            return mlp_kernel.mlp_triton(mlp, y)
        if self.backends.activation == "triton":
            return mlp.c_proj(quick_gelu_triton(mlp.c_fc(y)))
        return mlp(y)
