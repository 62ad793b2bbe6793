"""CoOp's prompt learner: learnable context vectors placed around frozen class-name token embeddings.

Prompts are laid out as the published code lays them: the text "X X ... X {name}." is tokenized (placeholders
for the M context words), embedded by the frozen token embedding, and the M placeholder embeddings are replaced by
the learnable context, with the class tokens at the end, the middle or the front.
"""

import torch
from torch import nn

from fastcoop.errors import FastCoopError
from fastcoop.text_tower import TextTower

POSITIONS = ("end", "middle", "front")


class PromptLearner(nn.Module):
    """Holds `ctx` (M × D unified, or K × M × D class-specific) and assembles the K prompt embeddings."""

    def __init__(self, model, tokenizer, classnames, n_ctx: int = 16, csc: bool = False, position: str = "end",
                 init: str | None = None):
        super().__init__()
        if position not in POSITIONS:
            raise FastCoopError(f"class token position must be one of {', '.join(POSITIONS)}, not '{position}'")
        if not hasattr(tokenizer, "sot_token_id"):
            raise FastCoopError("CoOp's prompt layout needs a CLIP-style tokenizer with a start-of-text token")
        tower = TextTower.of(model)
        embed = tower.token_embedding
        names = [name.replace("_", " ") for name in classnames]
        if init:
            init = init.replace("_", " ").strip()
            n_ctx = len(tokenizer.encode(init))
            if n_ctx == 0:
                raise FastCoopError("--init has no words")
        if n_ctx < 1:
            raise FastCoopError(f"the context needs at least one vector (--n-ctx {n_ctx})")
        placeholder = " ".join(["X"] * n_ctx)
        context_length = tower.positional_embedding.shape[0]
        for name in names:
            used = len(tokenizer.encode(f"{placeholder} {name}.")) + 2
            if used > context_length:
                raise FastCoopError(f"{n_ctx} context words + '{name}.' need {used} tokens; the model takes "
                                    f"{context_length}: use fewer context words")
        tokens = tokenizer([f"{placeholder} {name}." for name in names])
        device = embed.weight.device
        with torch.no_grad():
            embedded = embed(tokens.to(device)).float()
            if init:
                vectors = embed(tokenizer([init]).to(device))[0, 1:1 + n_ctx].float()
                ctx = vectors.repeat(len(names), 1, 1) if csc else vectors.clone()
            else:
                ctx = torch.empty(len(names), n_ctx, embedded.shape[-1]) if csc else torch.empty(n_ctx, embedded.shape[-1])
                nn.init.normal_(ctx, std=0.02)
        self.ctx = nn.Parameter(ctx.to(device))
        self.register_buffer("token_prefix", embedded[:, :1], persistent=False)  # SOS
        self.register_buffer("token_suffix", embedded[:, 1 + n_ctx:], persistent=False)  # name . EOS pad
        self.register_buffer("tokens", tokens.to(device), persistent=False)
        # class-name token counts, as the published code counts them (the name tokenized on its own)
        self.name_lens = [len(tokenizer.encode(name)) for name in names]
        self.classnames, self.n_ctx, self.csc, self.position, self.init = names, n_ctx, csc, position, init

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def class_ctx(self) -> torch.Tensor:
        """K × M × D context (a broadcast view when unified)."""
        return self.ctx if self.csc else self.ctx.expand(self.num_classes, -1, -1)

    def forward(self) -> torch.Tensor:
        """K × 77 × D prompt embeddings, exactly the published layout."""
        ctx, prefix, suffix = self.class_ctx(), self.token_prefix, self.token_suffix
        if self.position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1)
        rows = []
        half = self.n_ctx // 2
        for k, n in enumerate(self.name_lens):
            name, rest = suffix[k:k + 1, :n], suffix[k:k + 1, n:]
            if self.position == "middle":
                rows.append(torch.cat([prefix[k:k + 1], ctx[k:k + 1, :half], name, ctx[k:k + 1, half:], rest], 1))
            else:
                rows.append(torch.cat([prefix[k:k + 1], name, ctx[k:k + 1], rest], 1))
        return torch.cat(rows, dim=0)

    def shared_prefix_length(self) -> int:
        """Tokens every prompt shares (SOS + context before the class name); 0 when prompts differ from token 1."""
        if self.csc or self.position == "front":
            return 0
        return 1 + (self.n_ctx if self.position == "end" else self.n_ctx // 2)
