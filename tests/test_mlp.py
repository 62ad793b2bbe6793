"""The fused text-block MLP against open_clip's own module (on CPU under TRITON_INTERPRET=1)."""

from collections import OrderedDict

import pytest
import torch
from open_clip.transformer import QuickGELU

from conftest import DEVICE, needs_kernel, relative
from fastcoop.kernels import mlp_kernel

pytestmark = needs_kernel
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def open_clip_mlp(width: int, act: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Sequential:
    """As open_clip's ResidualAttentionBlock builds it, frozen, in dtype."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(OrderedDict([("c_fc", torch.nn.Linear(width, 4 * width)), ("gelu", act),
                                           ("c_proj", torch.nn.Linear(4 * width, width))]))
    return mlp.requires_grad_(False).to(DEVICE, dtype)



@pytest.mark.parametrize("act", [torch.nn.GELU(), QuickGELU()], ids=["gelu", "quick_gelu"])
@pytest.mark.parametrize("rows, width", [(70, 64), (130, 96), (1, 64)])  # rows past a tile; width past a block
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_open_clip_mlp(act, rows, width, dtype):
    mlp = open_clip_mlp(width, act, dtype)
    assert mlp_kernel.supports(mlp)
    gen = torch.Generator().manual_seed(1)
    y = (2 * torch.randn(rows, width, generator=gen)).to(DEVICE, dtype)
    upstream = torch.randn(rows, width, generator=gen).to(DEVICE, dtype)
    results = []
    for fn in (lambda t: mlp_kernel.mlp_triton(mlp, t), mlp):
        leaf = y.clone().requires_grad_()
        out = fn(leaf)
        results.append((out.detach(), *torch.autograd.grad(out, leaf, upstream)))
    for name, fused, reference in zip(("out", "dy"), *results):
        assert fused.dtype == reference.dtype == dtype and fused.shape == reference.shape, name
        assert relative(fused, reference) <= TOLERANCE[dtype], name


def test_supports_only_the_plain_frozen_mlp():
    assert not mlp_kernel.supports(open_clip_mlp(64, torch.nn.GELU(approximate="tanh"), torch.float32))
    assert not mlp_kernel.supports(open_clip_mlp(64, torch.nn.GELU(), torch.float32).requires_grad_(True))
    extra = open_clip_mlp(64, torch.nn.GELU(), torch.float32)
    extra.add_module("ln", torch.nn.Identity())
    assert not mlp_kernel.supports(extra)
