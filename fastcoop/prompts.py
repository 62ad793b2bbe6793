"""CoOp's prompt learner: learnable context vectors placed around frozen class-name token embeddings.

Prompts are laid out as the published code lays them: the text "X X ... X {name}." is tokenized (placeholders
for the M context words), embedded by the frozen token embedding, and the M placeholder embeddings are replaced by
the learnable context, with the class tokens at the end, the middle or the front.
"""

import torch
from torch import nn

from fastcoop.classnames import spoken
from fastcoop.errors import FastCoopError
from fastcoop.text_tower import TextTower

POSITIONS = ("end", "middle", "front")


class PromptLearner(nn.Module):
    """Holds `ctx` (M × D unified, or K × M × D class-specific) and assembles the K prompt embeddings."""

    def __init__(self, model, tokenizer, classnames, n_ctx: int | None = 16, csc: bool = False,
                 position: str = "end", init: str | None = None):
        """`init`: words the context starts from; they set M (`n_ctx` is then not used)."""
        super().__init__()
        if position not in POSITIONS:
            raise FastCoopError(f"class token position must be one of {', '.join(POSITIONS)}, not '{position}'")
        if not hasattr(tokenizer, "sot_token_id"):
            raise FastCoopError("CoOp's prompt layout needs a CLIP-style tokenizer with a start-of-text token")
        tower = TextTower.of(model)
        embed = tower.token_embedding
        names = [spoken(name) for name in classnames]
        if init is not None:
            init = spoken(init).strip()
            if not tokenizer.encode(init):
                raise FastCoopError("--init has no words")
        n_ctx = self.context_length(tokenizer, n_ctx, init)
        if n_ctx < 1:
            raise FastCoopError(f"the context needs at least one vector (--n-ctx {n_ctx})")
        placeholder = self.placeholder(n_ctx, init)
        context_length = tower.positional_embedding.shape[0]
        for name in names:
            used = len(tokenizer.encode(f"{placeholder} {name}.")) + 2
            if used > context_length:
                raise FastCoopError(f"{n_ctx} context words + '{name}.' need {used} tokens; the model takes "
                                    f"{context_length}: use fewer context words")
        tokens = tokenizer([f"{placeholder} {name}." for name in names])
        device, width = embed.weight.device, embed.weight.shape[1]
        with torch.no_grad():
            if init:
                vectors = self.context_from_words(embed(tokenizer([init]).to(device))[0].float(), n_ctx, init)
                ctx = vectors.repeat(len(names), 1, 1) if csc else vectors.clone()
            else:
                ctx = torch.empty(len(names), n_ctx, width) if csc else torch.empty(n_ctx, width)
                nn.init.normal_(ctx, std=0.02)
        self.ctx = nn.Parameter(ctx.to(device))
        self.classnames, self.n_ctx, self.csc, self.position, self.init = names, n_ctx, csc, position, init
        # class-name token counts, as the published code counts them (the name tokenized on its own)
        self.name_lens = [len(tokenizer.encode(name)) for name in names]
        token_index, ctx_slot = (t.to(device) for t in self._layout(tokens.shape[1]))
        self.register_buffer("tokens", tokens.to(device), persistent=False)
        # token ids in prompt order: their embeddings are looked up when needed, not stored (K × 77 × D floats
        # would be the largest tensor of a training run)
        self.register_buffer("prompt_tokens", tokens.to(device).gather(1, token_index), persistent=False)
        self.register_buffer("ctx_slot", ctx_slot, persistent=False)  # which ctx vector, or -1

    def context_length(self, tokenizer, n_ctx: int | None, init: str | None) -> int:
        """M: given words' token count (CoOp's: the words set it), else `n_ctx`."""
        return len(tokenizer.encode(init)) if init is not None else n_ctx

    def placeholder(self, n_ctx: int, init: str | None) -> str:
        """The text the context stands in for before the class name: M placeholder words (CoOp's)."""
        return " ".join(["X"] * n_ctx)

    def context_from_words(self, embedded: torch.Tensor, n_ctx: int, init: str) -> torch.Tensor:
        """M × D: the context starting from the words (their tokenized text's embeddings, SOS first): CoOp's,
        the words' own token embeddings."""
        return embedded[1:1 + n_ctx]

    def _layout(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per class and position: which token of "[SOS] X.. name . [EOS]" goes there, and which context vector
        (-1: a frozen token). end: [SOS] V.. name . ; middle: [SOS] V..(M/2) name V.. . ; front: [SOS] name V.. ."""
        M, half = self.n_ctx, self.n_ctx // 2
        token_rows, slot_rows = [], []
        for n in self.name_lens:
            name = [(i, -1) for i in range(1 + M, 1 + M + n)]
            ctx = [(1 + j, j) for j in range(M)]  # the placeholder's own position, for a consistent index
            order = {"end": ctx + name, "middle": ctx[:half] + name + ctx[half:], "front": name + ctx}[self.position]
            rest = [(i, -1) for i in range(1 + M + n, length)]
            sources = [(0, -1)] + order + rest
            token_rows.append([i for i, _ in sources])
            slot_rows.append([j for _, j in sources])
        return torch.tensor(token_rows), torch.tensor(slot_rows)

    @property
    def layout(self) -> tuple:
        """What fixes where the context goes in the prompts (of the same class names): learners alike in it are
        packed alike, so their contexts can stack."""
        return self.n_ctx, self.csc, self.position

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def trainable(self) -> dict[str, torch.Tensor]:
        """What training learns, by the published state dict's names."""
        return {"ctx": self.ctx}

    def load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in self.trainable().items():
                tensor.copy_(tensors[name])

    def flat_ctx(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """The context (this learner's, or `ctx` shaped like it) as rows that ctx indices address: M × D (unified)
        or K·M × D (class-specific)."""
        ctx = self.ctx if ctx is None else ctx
        return ctx.reshape(-1, ctx.shape[-1])

    def ctx_index(self, classes: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Row of flat_ctx() for (class, slot) pairs (slot ≥ 0)."""
        return classes * self.n_ctx + slots if self.csc else slots

    def frozen(self, token_embedding: nn.Embedding, classes=None, positions=None) -> torch.Tensor:
        """The frozen token embeddings in prompt order, zero where a context vector goes (fp32): all K × 77, or
        those of the given (class, position) pairs."""
        ids, slot = self.prompt_tokens, self.ctx_slot
        if classes is not None:
            ids, slot = ids[classes, positions], slot[classes, positions]
        with torch.no_grad():  # looked up where the embedding table is, returned where the learner is
            embedded = token_embedding(ids.to(token_embedding.weight.device)).float().to(ids.device)
            return embedded.masked_fill((slot >= 0)[..., None], 0.0)

    def forward(self, token_embedding: nn.Embedding, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """K × 77 × D prompt embeddings, exactly the published layout (token_embedding: the text tower's), with
        this learner's context or `ctx` shaped like it."""
        K, L = self.ctx_slot.shape
        classes = torch.arange(K, device=self.ctx_slot.device)[:, None].expand(K, L)
        slot = self.ctx_slot
        ctx = self.flat_ctx(ctx)[self.ctx_index(classes, slot.clamp(min=0))]
        return torch.where((slot >= 0)[..., None], ctx, self.frozen(token_embedding))

    def shared_prefix_length(self) -> int:
        """Tokens every prompt shares (SOS + context before the class name); 0 when prompts differ from token 1."""
        if self.csc or self.position == "front":
            return 0
        return 1 + (self.n_ctx if self.position == "end" else self.n_ctx // 2)
