"""CoCoOp: the fast per-image prompts against the published per-image 77-token computation."""

import pytest
import torch

from conftest import relative
from fastcoop.cocoop import CoCoOpLearner, cocoop_logits

NAMES = ["dog", "sea lion", "kite (bird of prey)", "a remarkably long class name of many word tokens", "cat"]


@pytest.mark.parametrize("init, n_ctx", [("a photo of a", 4), (None, 8)])
def test_fast_logits_and_gradients_equal_the_published_computation(tiny_vit, tiny_rn, init, n_ctx):
    for loaded in (tiny_vit, tiny_rn):
        torch.manual_seed(0)
        learner = CoCoOpLearner(loaded.model, loaded.tokenizer, NAMES, n_ctx=n_ctx, init=init)
        images = torch.randn(3, loaded.model.visual.output_dim)
        params = [learner.ctx, *learner.meta_net.parameters()]
        results = {}
        for mode in ("fast", "reference"):
            logits = cocoop_logits(loaded.model, learner, images, mode)
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3, 4]))
            results[mode] = (logits.detach(), torch.autograd.grad(loss, params))
        (fast, fast_grads), (ref, ref_grads) = results["fast"], results["reference"]
        assert fast.shape == (3, len(NAMES)) and relative(fast, ref) <= 1e-5
        for a, b in zip(fast_grads, ref_grads):
            assert relative(a, b) <= 1e-4


def test_the_published_layout_and_state_dict_names(tiny_vit):
    learner = CoCoOpLearner(tiny_vit.model, tiny_vit.tokenizer, NAMES)
    vis_dim, ctx_dim = tiny_vit.model.visual.output_dim, learner.ctx.shape[-1]
    assert learner.n_ctx == 4 and learner.ctx.shape == (4, ctx_dim)
    shapes = {k: tuple(v.shape) for k, v in learner.state_dict().items()}
    assert shapes == {"ctx": (4, ctx_dim), "meta_net.linear1.weight": (vis_dim // 16, vis_dim),
                      "meta_net.linear1.bias": (vis_dim // 16,), "meta_net.linear2.weight": (ctx_dim, vis_dim // 16),
                      "meta_net.linear2.bias": (ctx_dim,)}
    images = torch.randn(2, vis_dim)
    shift = learner.meta_net(images / images.norm(dim=-1, keepdim=True))  # on the normalised feature
    torch.testing.assert_close(learner.contexts(images), learner.ctx[None] + shift[:, None])
