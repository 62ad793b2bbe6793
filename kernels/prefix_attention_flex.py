"""The packed attention as one FlexAttention call with a block mask (compiled into a fused kernel on GPU).

Same rows and contract as prefix_attention_reference: the shared prefix first (causal within itself), then each
class's rows, which see the whole prefix and their own class up to themselves.
"""

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from fastcoop.kernels.prefix_attention_reference import PackedLayout


def prefix_class_block_mask(layout: PackedLayout):
    """Built once per layout: the block-sparse mask over the T × T packed rows."""
    device, P = layout.classes.device, layout.prefix_len
    row_class = torch.cat([torch.full((P,), -1, device=device), layout.classes])  # −1: the shared prefix
    T = len(row_class)

    def mask_mod(b, h, q, kv):
        sees_prefix = (row_class[kv] < 0) & (row_class[q] >= 0)
        return sees_prefix | ((row_class[kv] == row_class[q]) & (kv <= q))

    return create_block_mask(mask_mod, None, None, T, T, device=device)


def prefix_attention_flex(qkv: torch.Tensor, block_mask) -> torch.Tensor:
    """qkv: T × 3 × H × dh. Returns T × H × dh. FlexAttention's backward exists on GPU only; on CPU it runs
    eagerly (dense), forward only."""
    q, k, v = (t.transpose(0, 1)[None] for t in qkv.unbind(1))  # 1 × H × T × dh
    attend = _compiled() if q.is_cuda else flex_attention
    return attend(q, k, v, block_mask=block_mask)[0].transpose(0, 1)


@functools.cache
def _compiled():
    return torch.compile(flex_attention, dynamic=False)
