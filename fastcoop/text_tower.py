"""A uniform view of an open_clip text tower (CLIP keeps it on the model, CustomTextCLIP in model.text)."""

import copy
from dataclasses import dataclass

import torch
from open_clip.transformer import ResidualAttentionBlock

from fastcoop.errors import FastCoopError


@dataclass
class TextTower:
    token_embedding: torch.nn.Embedding | None  # None on a copy_to copy, which only runs blocks
    positional_embedding: torch.Tensor
    blocks: torch.nn.ModuleList
    ln_final: torch.nn.Module
    text_projection: torch.Tensor | torch.nn.Linear | None
    attn_mask: torch.Tensor | None
    pool_type: str
    eos_id: int | None

    @classmethod
    def of(cls, model: torch.nn.Module) -> "TextTower":
        tower = getattr(model, "text", model)
        if not hasattr(tower, "token_embedding") or not hasattr(tower, "transformer"):
            raise FastCoopError(f"{type(model).__name__} has no open_clip text transformer; CoOp needs one")
        if getattr(tower, "cls_emb", None) is not None:
            raise FastCoopError("text towers with an appended CLS embedding (CoCa) are not supported")
        if not getattr(tower.transformer, "batch_first", True):
            raise FastCoopError("text transformers that are not batch-first are not supported")
        pool = getattr(tower, "text_pool_type", None) or getattr(tower, "pool_type", "argmax")
        eos = getattr(tower, "text_eos_id", None) if hasattr(tower, "text_pool_type") else getattr(tower, "eos_id", None)
        return cls(tower.token_embedding, tower.positional_embedding, tower.transformer.resblocks, tower.ln_final,
                   tower.text_projection, tower.attn_mask, pool, eos)

    def copy_to(self, device, matrix_dtype: torch.dtype | None = None) -> "TextTower":
        """A copy of what runs on every call (positions, blocks, final norm, projection) on `device`, the blocks'
        matrix weights and the projection in matrix_dtype. Training holds only this on the accelerator, not the
        whole fp32 tower (the token embedding alone is 0.1 GB). With matrix_dtype the autocast dtype, the numbers
        are those of autocast casting the fp32 weights at every call (it rounds them the same way), without the
        casts."""
        blocks = copy.deepcopy(self.blocks)
        if matrix_dtype is not None:  # before the move, so the device never holds the fp32 matrices
            for block in blocks:
                block.attn.to(matrix_dtype)  # the packed q/k/v projection and the output projection
                block.mlp.to(matrix_dtype)
        blocks.to(device)
        projection = self.text_projection
        if isinstance(projection, torch.nn.Module):
            projection = copy.deepcopy(projection).to(device, matrix_dtype)
        elif projection is not None:
            projection = projection.detach().to(device, matrix_dtype)
        return TextTower(None, self.positional_embedding.detach().to(device), blocks,
                         copy.deepcopy(self.ln_final).to(device), projection,
                         None if self.attn_mask is None else self.attn_mask.to(device), self.pool_type, self.eos_id)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """n × D: token ids (n × 77) through the whole tower, as the model's encode_text (not normalised)."""
        x = self.token_embedding(tokens) + self.positional_embedding
        for block in self.blocks:
            x = block(x, attn_mask=self.attn_mask)
        x = self.ln_final(x)
        return self.project(x[torch.arange(len(x), device=x.device), self.pool_positions(tokens)])

    def pool_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """The position each prompt is pooled at, by the same rule as open_clip's text_global_pool."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "first":
            return torch.zeros(len(tokens), dtype=torch.long)
        if self.pool_type == "last":
            return torch.full((len(tokens),), tokens.shape[1] - 1, dtype=torch.long)
        raise FastCoopError(f"text pooling '{self.pool_type}' gives no single feature per prompt")

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.text_projection is None:
            return pooled
        if isinstance(self.text_projection, torch.nn.Linear):
            return self.text_projection(pooled)
        return pooled @ self.text_projection

    def fast_path_problem(self) -> str | None:
        """Why cutting and prefix sharing would not be exact for this tower, or None when they are."""
        if self.attn_mask is None:
            return "its attention is bidirectional (no causal mask)"
        causal = torch.full_like(self.attn_mask, float("-inf")).triu(1)
        if not torch.equal(self.attn_mask.float(), causal.float()):
            return "its attention mask is not the causal mask"
        if self.pool_type not in ("argmax", "eos"):
            return f"it pools the '{self.pool_type}' token, not the end-of-text token"
        if not all(type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv") for b in self.blocks):
            return "its blocks are not open_clip's standard ResidualAttentionBlock"
        return None
