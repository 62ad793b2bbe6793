"""The packed prefix attention as one FlexAttention call with a block mask (compiled into a fused kernel on GPU).

Queries are the packed class tokens; keys and values are [shared prefix; packed class tokens]. A query sees every
prefix key and the keys of its own class up to itself. Same contract as prefix_attention_reference.
"""

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from fastcoop.kernels.prefix_attention_reference import PackedLayout


def prefix_class_block_mask(layout: PackedLayout, prefix_len: int):
    """Built once per layout: the block-sparse mask over (packed queries) × (prefix + packed keys)."""
    device, classes = layout.classes.device, layout.classes
    n = len(classes)
    key_class = torch.cat([torch.full((prefix_len,), -1, device=device), classes])
    key_row = torch.cat([torch.full((prefix_len,), -1, device=device), torch.arange(n, device=device)])

    def mask_mod(b, h, q, kv):
        return (key_class[kv] < 0) | ((key_class[kv] == classes[q]) & (key_row[kv] <= q))

    return create_block_mask(mask_mod, None, None, n, prefix_len + n, device=device)


def prefix_attention_flex(q, k, v, k_prefix, v_prefix, block_mask) -> torch.Tensor:
    """q, k, v: N × H × dh packed; k_prefix, v_prefix: P × H × dh or None. Returns N × H × dh.
    FlexAttention's backward exists on GPU only; on CPU it runs eagerly (dense), forward only."""
    if k_prefix is not None:
        k, v = torch.cat([k_prefix, k]), torch.cat([v_prefix, v])
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # 1 × H × T × dh
    attend = _compiled() if q.is_cuda else flex_attention
    return attend(q, k, v, block_mask=block_mask)[0].transpose(0, 1)


@functools.cache
def _compiled():
    return torch.compile(flex_attention, dynamic=False)
