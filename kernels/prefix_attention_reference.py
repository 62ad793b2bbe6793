"""Attention over the packed rows of the fast text path, in plain PyTorch.

The rows are the shared prefix [SOS][V].. (P rows, possibly none), then every class's own tokens, class after
class, unpadded. A prefix row attends causally within the prefix; a class row attends to the whole prefix and
causally to its own class's rows. This reference computes the prefix with an explicit causal mask and the classes
on a K × S grid (zeros after each class's last token, never attended under the causal mask), broadcasting the
prefix keys and values to every class without copying them.
"""

import math
from dataclasses import dataclass

import torch


@dataclass
class PackedLayout:
    """Where each class's rows sit; built once on the host, used on the device. Class rows are counted from the
    first class row (row P of the packed tensor)."""

    lengths: torch.Tensor  # K, rows per class
    starts: torch.Tensor  # K, first row of each class, counted from row P
    classes: torch.Tensor  # N, the class of each class row
    offsets: torch.Tensor  # N, each class row's position within its class
    padded_index: torch.Tensor  # N, class row → row of the K × S grid
    causal: torch.Tensor  # S × S additive mask (0 on and below the diagonal, −inf above)
    segment_starts: torch.Tensor  # the prefix (if any), then each class: first row in the packed tensor
    segment_lengths: torch.Tensor  # and its number of rows
    num_classes: int
    max_len: int
    prefix_len: int

    @classmethod
    def of(cls, lengths: torch.Tensor, device, prefix_len: int = 0) -> "PackedLayout":
        lengths = lengths.cpu()
        K, S = len(lengths), int(lengths.max())
        offsets = torch.cat([torch.arange(n) for n in lengths.tolist()])
        classes = torch.repeat_interleave(torch.arange(K), lengths)
        causal = torch.full((S, S), float("-inf")).triu(1)
        starts = lengths.cumsum(0) - lengths
        segment_lengths = torch.cat([torch.tensor([prefix_len]), lengths]) if prefix_len else lengths
        segment_starts = segment_lengths.cumsum(0) - segment_lengths
        return cls(lengths.to(device), starts.to(device), classes.to(device), offsets.to(device),
                   (classes * S + offsets).to(device), causal.to(device), segment_starts.to(device),
                   segment_lengths.to(device), K, S, prefix_len)


def prefix_attention_reference(qkv: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """qkv: T × 3 × H × dh, the packed rows (T = P + N). Returns the attention output, T × H × dh."""
    P, K, S = layout.prefix_len, layout.num_classes, layout.max_len
    (q_prefix, k_prefix, v_prefix), (q, k, v) = qkv[:P].unbind(1), qkv[P:].unbind(1)
    scale = 1.0 / math.sqrt(q.shape[-1])
    prefix_out = []
    if P:
        causal = torch.full((P, P), float("-inf"), device=q.device, dtype=q.dtype).triu(1)
        scores = torch.einsum("shd,thd->hst", q_prefix, k_prefix) * scale + causal
        prefix_out = [torch.einsum("hst,thd->shd", torch.softmax(scores, dim=-1), v_prefix)]

    def to_grid(t):  # N × H × dh → K × H × S × dh
        grid = t.new_zeros(K * S, *t.shape[1:]).index_copy(0, layout.padded_index, t)
        return grid.view(K, S, *t.shape[1:]).transpose(1, 2)

    qg, kg, vg = to_grid(q), to_grid(k), to_grid(v)
    scores = (qg @ kg.transpose(-1, -2)) * scale + layout.causal.to(qg.dtype)
    if not P:
        out = torch.softmax(scores, dim=-1) @ vg
    else:
        scores_prefix = torch.einsum("khsd,phd->khsp", qg, k_prefix) * scale
        probs = torch.softmax(torch.cat([scores_prefix, scores], dim=-1), dim=-1)
        out = torch.einsum("khsp,phd->khsd", probs[..., :P], v_prefix) + probs[..., P:] @ vg
    class_out = out.transpose(1, 2).reshape(K * S, *q.shape[1:])[layout.padded_index]
    return torch.cat([*prefix_out, class_out])
