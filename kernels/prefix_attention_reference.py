"""Attention of packed per-class prompt tokens over a shared prefix and their own earlier tokens, in plain PyTorch.

The fast text path keeps every class's tokens packed (class 0's tokens, then class 1's, ...). Each token attends
to all tokens of the shared prefix [SOS][V].. (if any) and causally to its own class's tokens. This reference
scatters the packed tokens into a K × S grid (zeros after each class's last token, never attended under the
causal mask) and broadcasts the prefix keys and values to every class without copying them.
"""

import math
from dataclasses import dataclass

import torch


@dataclass
class PackedLayout:
    """Where each class's tokens sit in the packed sequence; built once on the host, used on the device."""

    lengths: torch.Tensor  # K, tokens per class
    starts: torch.Tensor  # K, first packed row of each class
    classes: torch.Tensor  # N, the class of each packed row
    offsets: torch.Tensor  # N, each packed row's position within its class
    padded_index: torch.Tensor  # N, packed row → row of the K × S grid
    causal: torch.Tensor  # S × S additive mask (0 on and below the diagonal, −inf above)
    num_classes: int
    max_len: int

    @classmethod
    def of(cls, lengths: torch.Tensor, device) -> "PackedLayout":
        lengths = lengths.cpu()
        K, S = len(lengths), int(lengths.max())
        offsets = torch.cat([torch.arange(n) for n in lengths.tolist()])
        classes = torch.repeat_interleave(torch.arange(K), lengths)
        causal = torch.full((S, S), float("-inf")).triu(1)
        return cls(lengths.to(device), (lengths.cumsum(0) - lengths).to(device), classes.to(device),
                   offsets.to(device), (classes * S + offsets).to(device), causal.to(device), K, S)


def prefix_attention_reference(q, k, v, k_prefix, v_prefix, layout: PackedLayout) -> torch.Tensor:
    """q, k, v: N × H × dh packed; k_prefix, v_prefix: P × H × dh or None. Returns N × H × dh."""
    K, S = layout.num_classes, layout.max_len

    def to_grid(t):  # N × H × dh → K × H × S × dh
        grid = t.new_zeros(K * S, *t.shape[1:]).index_copy(0, layout.padded_index, t)
        return grid.view(K, S, *t.shape[1:]).transpose(1, 2)

    qg, kg, vg = to_grid(q), to_grid(k), to_grid(v)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (qg @ kg.transpose(-1, -2)) * scale + layout.causal.to(qg.dtype)
    if k_prefix is None:
        out = torch.softmax(scores, dim=-1) @ vg
    else:
        scores_prefix = torch.einsum("khsd,phd->khsp", qg, k_prefix) * scale
        probs = torch.softmax(torch.cat([scores_prefix, scores], dim=-1), dim=-1)
        P = k_prefix.shape[0]
        out = torch.einsum("khsp,phd->khsd", probs[..., :P], v_prefix) + probs[..., P:] @ vg
    return out.transpose(1, 2).reshape(K * S, *q.shape[1:])[layout.padded_index]
