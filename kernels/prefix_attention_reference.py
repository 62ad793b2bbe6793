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
    first class row (row P of the packed tensor). The segments are what a Triton program takes at a time: the
    prefix, then each class — or, packed, runs of whole classes of up to pack_rows rows, which the kernel keeps
    apart by each row's first_row."""

    lengths: torch.Tensor  # K, rows per class
    starts: torch.Tensor  # K, first row of each class, counted from row P
    classes: torch.Tensor  # N, the class of each class row
    offsets: torch.Tensor  # N, each class row's position within its class
    padded_index: torch.Tensor  # N, class row → row of the K × S grid
    causal: torch.Tensor  # S × S additive mask (0 on and below the diagonal, −inf above)
    segment_starts: torch.Tensor  # the prefix (if any), then each class or run of classes: first packed row
    segment_lengths: torch.Tensor  # and its number of rows
    first_row: torch.Tensor  # T, the first packed row of each row's class (0 for the prefix's rows)
    num_classes: int
    max_len: int
    max_segment_len: int  # rows of the tallest class segment
    prefix_len: int
    pack_rows: int | None  # segments are runs of classes up to this many rows, or None: one class each

    @classmethod
    def of(cls, lengths: torch.Tensor, device, prefix_len: int = 0, pack_rows: int | None = None) -> "PackedLayout":
        lengths = lengths.cpu()
        K, S = len(lengths), int(lengths.max())
        offsets = torch.cat([torch.arange(n) for n in lengths.tolist()])
        classes = torch.repeat_interleave(torch.arange(K), lengths)
        causal = torch.full((S, S), float("-inf")).triu(1)
        starts = lengths.cumsum(0) - lengths
        first_row = torch.cat([torch.zeros(prefix_len, dtype=torch.long), prefix_len + starts[classes]])
        class_segments = _runs_of_classes(lengths.tolist(), pack_rows) if pack_rows else lengths
        segment_lengths = torch.cat([torch.tensor([prefix_len]), class_segments]) if prefix_len else class_segments
        segment_starts = segment_lengths.cumsum(0) - segment_lengths
        return cls(lengths.to(device), starts.to(device), classes.to(device), offsets.to(device),
                   (classes * S + offsets).to(device), causal.to(device), segment_starts.to(device),
                   segment_lengths.to(device), first_row.to(device), K, S, int(class_segments.max()), prefix_len,
                   pack_rows)


def _runs_of_classes(lengths: list[int], pack_rows: int) -> torch.Tensor:
    """Rows of each run of consecutive whole classes, greedily up to pack_rows (a longer class runs alone)."""
    runs = [0]
    for n in lengths:
        if runs[-1] and runs[-1] + n > pack_rows:
            runs.append(0)
        runs[-1] += n
    return torch.tensor(runs)


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
