"""The fast text path gives the reference (published) text features and context gradients."""

import copy
import itertools

import pytest
import torch

from conftest import CONFIGS, relative
from fastcoop import kernels
from fastcoop.backends import Backends, resolve
from fastcoop.kernels import mlp_kernel
from fastcoop.kernels.mlp_kernel import mlp_triton as fused_mlp_triton
from fastcoop.models import load_model
from fastcoop.prompts import PromptLearner
from fastcoop.text_encoder import PACK_ROWS, FastTextEncoder, encode_prompts, reference_text_features, text_encoder
from fastcoop.text_tower import TextTower

# 1 to 10+ tokens, including names whose last token merges with the '.' in BPE
CLASSNAMES = ["dog", "sea_lion", "kite (bird of prey)", "Yorkshire terrier",
              "a remarkably long class name made of a dozen or more distinct word tokens"]
MATRIX = list(itertools.product([False, True], ["end", "middle", "front"], [None, "a photo of a"]))


def features_and_grad(model, learner, mode, attention="grid", fused=False, pack_rows=PACK_ROWS, fused_mlp=False):
    # what the resolver picks for this tower on a GPU (the kernels that serve its modules), with these choices
    detail = (("attention", attention), ("mlp", "triton" if fused_mlp else "reference")) + (
        () if fused else (("add_norm", "reference"), ("activation", "reference")))
    backends = resolve("cuda", detail=detail, tower=TextTower.of(model))
    features = (FastTextEncoder(model, learner, backends, pack_rows=pack_rows)()
                if mode == "fast"
                else encode_prompts(model, learner, mode))
    weights = torch.linspace(-1, 1, features.numel(), device=features.device).view_as(features)  # reads every element
    grad, = torch.autograd.grad((features * weights).sum(), learner.ctx)
    return features.detach(), grad


def assert_exact(model, tokenizer, csc, position, init, n_ctx=6, names=CLASSNAMES, attention="grid",
                 fused=False, pack_rows=PACK_ROWS, fused_mlp=False):
    torch.manual_seed(0)
    learner = PromptLearner(model, tokenizer, names, n_ctx=n_ctx, csc=csc, position=position, init=init)
    ref, ref_grad = features_and_grad(model, learner, "reference")
    fast, fast_grad = features_and_grad(model, learner, "fast", attention, fused, pack_rows, fused_mlp)
    assert (fast - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (fast_grad - ref_grad).norm() <= 1e-4 * ref_grad.norm()
    assert ref_grad.abs().sum() > 0


@pytest.mark.parametrize("csc, position, init", MATRIX)
def test_fast_equals_reference_vit_tower(tiny_vit, csc, position, init):
    assert_exact(tiny_vit.model, tiny_vit.tokenizer, csc, position, init)


@pytest.mark.skipif(not (torch.cuda.is_available() or kernels.INTERPRET), reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("csc, position, init", MATRIX)
def test_triton_fast_path_equals_reference(tiny_vit, tiny_vit_on_device, csc, position, init):
    """The path a GPU trains with: Triton attention and the fused residual-add + layer-norm kernel."""
    assert_exact(tiny_vit_on_device, tiny_vit.tokenizer, csc, position, init, attention="triton", fused=True)


@pytest.mark.skipif(not (torch.cuda.is_available() or kernels.INTERPRET), reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("csc, position, init", [(False, "end", None), (True, "front", None)])
def test_triton_fast_path_one_class_per_tile(tiny_vit, tiny_vit_on_device, csc, position, init):
    """The attention's other layout (by default several classes share a tile)."""
    assert_exact(tiny_vit_on_device, tiny_vit.tokenizer, csc, position, init, attention="triton", fused=True,
                 pack_rows=None)


@pytest.fixture(scope="module")
def tiny_vit_on_device(tiny_vit):
    return copy.deepcopy(tiny_vit.model).to("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("csc, position, init", [(False, "end", None), (False, "middle", "a photo of a"),
                                                 (True, "front", None)])  # each case compiles anew on GPU
def test_flex_attention_fast_path_equals_reference(tiny_vit, tiny_vit_on_device, csc, position, init):
    """FlexAttention's backward exists only on GPU: on CPU the features alone are compared."""
    model = tiny_vit_on_device
    if model.logit_scale.is_cuda:
        with torch.autocast("cuda", enabled=False):
            assert_exact(model, tiny_vit.tokenizer, csc, position, init, attention="flex")
        return
    learner = PromptLearner(model, tiny_vit.tokenizer, CLASSNAMES, n_ctx=6, csc=csc, position=position, init=init)
    with torch.no_grad():
        ref = encode_prompts(model, learner, "reference")
        flex = FastTextEncoder(model, learner, Backends(attention="flex"))()
    assert (flex - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("csc, position, init", MATRIX)
def test_fast_equals_reference_quickgelu_resnet_model(tiny_rn, csc, position, init):
    assert_exact(tiny_rn.model, tiny_rn.tokenizer, csc, position, init)


@pytest.mark.skipif(not (torch.cuda.is_available() or kernels.INTERPRET), reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("csc, position, init", [(False, "end", None), (True, "middle", "a photo of a")])
def test_triton_fast_path_with_quick_gelu_equals_reference(tiny_rn, csc, position, init):
    """The GPU path on a QuickGELU tower (OpenAI's weights): the fused QuickGELU kernel runs in every MLP."""
    model = copy.deepcopy(tiny_rn.model).to("cuda" if torch.cuda.is_available() else "cpu")
    assert_exact(model, tiny_rn.tokenizer, csc, position, init, attention="triton", fused=True)


@pytest.mark.skipif(not (torch.cuda.is_available() or kernels.INTERPRET), reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("tower", ["tiny_vit", "tiny_rn"])  # exact GELU; QuickGELU
def test_triton_fast_path_with_fused_mlp_equals_reference(request, monkeypatch, tower):
    """Every block's MLP through mlp_kernel (its activation inside the matrix products)."""
    loaded = request.getfixturevalue(tower)
    model = copy.deepcopy(loaded.model).to("cuda" if torch.cuda.is_available() else "cpu")
    calls = []
    monkeypatch.setattr(mlp_kernel, "mlp_triton", lambda *a: calls.append(1) or fused_mlp_triton(*a))
    assert_exact(model, loaded.tokenizer, False, "end", None, attention="triton", fused=True, fused_mlp=True)
    assert len(calls) == len(TextTower.of(model).blocks)


@pytest.fixture(scope="module")
def rn50():
    return load_model("RN50-quickgelu", "none")


@pytest.mark.parametrize("csc, position, init", MATRIX)
def test_fast_equals_reference_real_rn50_text_tower(rn50, csc, position, init):
    """RN50's real text tower (12 blocks, width 512, QuickGELU), M = 16."""
    assert_exact(rn50.model, rn50.tokenizer, csc, position, init, n_ctx=16)


def test_reference_equals_open_clip_encode_text_for_hand_written_words(tiny_vit):
    """With the context set to the embeddings of 'a photo of a', the prompt is that sentence: CLIP's own
    encode_text must give the same features as both paths."""
    learner = PromptLearner(tiny_vit.model, tiny_vit.tokenizer, CLASSNAMES, init="a photo of a")
    expected = tiny_vit.model.encode_text(tiny_vit.tokenizer([f"a photo of a {n.replace('_', ' ')}." for n in CLASSNAMES]))
    for mode in ("reference", "fast"):
        torch.testing.assert_close(encode_prompts(tiny_vit.model, learner, mode), expected, atol=1e-5, rtol=1e-5)


def test_a_bidirectional_tower_runs_the_published_path():
    """The resolver gives a tower the fast path cannot run exactly the reference path (with a warning); the fast
    encoder itself refuses it rather than compute something else."""
    loaded = load_model(str(CONFIGS / "tiny-bidirectional.json"), "none")
    learner = PromptLearner(loaded.model, loaded.tokenizer, CLASSNAMES, n_ctx=4)
    with pytest.warns(UserWarning, match="bidirectional"):
        backends = resolve("cpu", tower=TextTower.of(loaded.model))
    assert backends.text == "reference"
    torch.testing.assert_close(text_encoder(loaded.model, learner, backends)(),
                               encode_prompts(loaded.model, learner, "reference"))
    with pytest.raises(ValueError, match="not exact for this model .its attention is bidirectional"):
        FastTextEncoder(loaded.model, learner)


def test_layouts_place_the_class_tokens(tiny_vit):
    """[SOS] V1 V2 sea lion V3 V4 . [EOS] (middle) and [SOS] sea lion V1..V4 . [EOS] (front), M = 4."""
    words = tiny_vit.model.token_embedding(tiny_vit.tokenizer(["X X X X sea lion."]))[0]  # SOS X X X X sea lion . EOS
    for position, ctx_at, name_at in (("middle", [1, 2, 5, 6], [3, 4]), ("front", [3, 4, 5, 6], [1, 2]),
                                      ("end", [1, 2, 3, 4], [5, 6])):
        learner = PromptLearner(tiny_vit.model, tiny_vit.tokenizer, ["sea_lion"], n_ctx=4, position=position)
        prompt = learner(tiny_vit.model.token_embedding)[0]
        assert learner.name_lens == [2] and learner.classnames == ["sea lion"]
        torch.testing.assert_close(prompt[ctx_at], learner.ctx)
        torch.testing.assert_close(prompt[name_at], words[5:7])
        torch.testing.assert_close(prompt[[0, 7, 8]], words[[0, 7, 8]])


@pytest.mark.parametrize("csc, position, init", [(False, "end", None), (True, "middle", "a photo of a")])
def test_fast_equals_reference_real_vit_b16_text_tower(csc, position, init):
    vit = load_model("ViT-B-16", "none")
    assert_exact(vit.model, vit.tokenizer, csc, position, init, n_ctx=16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weights_held_in_autocast_dtype_give_identical_numbers(tiny_vit, dtype):
    """weight_dtype only saves autocast's per-call weight casts: features and gradient are bit for bit the same."""
    torch.manual_seed(0)
    learner = PromptLearner(tiny_vit.model, tiny_vit.tokenizer, CLASSNAMES, n_ctx=6)
    results = []
    for weight_dtype in (None, dtype):
        encode = FastTextEncoder(tiny_vit.model, learner, weight_dtype=weight_dtype)
        with torch.autocast("cpu", dtype=dtype, cache_enabled=False):
            features = encode()
        grad, = torch.autograd.grad(features.float().square().sum(), learner.ctx)
        results.append((features, grad))
    (features, grad), (held_features, held_grad) = results
    assert held_features.dtype == features.dtype == dtype
    assert torch.equal(held_features, features) and torch.equal(held_grad, grad)
    assert grad.abs().sum() > 0


def test_learner_stores_token_ids_not_embeddings(tiny_vit):
    """The frozen K × 77 × D embeddings are looked up when needed: the learner's buffers hold token ids and
    context slots only (two K × 77 integer tables)."""
    learner = PromptLearner(tiny_vit.model, tiny_vit.tokenizer, CLASSNAMES, n_ctx=4)
    K, L = learner.ctx_slot.shape
    assert all(not b.is_floating_point() for b in learner.buffers())
    assert sum(b.numel() for b in learner.buffers()) == 3 * K * L  # tokens, prompt_tokens, ctx_slot


def test_tower_copy_holds_only_what_runs_with_matrices_in_the_asked_dtype(tiny_vit):
    tower = TextTower.of(tiny_vit.model)
    copy = tower.copy_to("cpu", torch.bfloat16)
    assert copy.token_embedding is None and copy.blocks is not tower.blocks
    block, original = copy.blocks[0], tower.blocks[0]
    assert block.attn.in_proj_weight.dtype == block.mlp.c_fc.weight.dtype == torch.bfloat16
    assert block.ln_1.weight.dtype == copy.ln_final.weight.dtype == torch.float32  # norms stay as autocast runs them
    assert torch.equal(block.mlp.c_proj.weight, original.mlp.c_proj.weight.to(torch.bfloat16))
    assert torch.equal(copy.text_projection, tower.text_projection.to(torch.bfloat16))
    assert not copy.text_projection.requires_grad  # a constant, not a cast autograd would trace back
    assert original.attn.in_proj_weight.dtype == tower.text_projection.dtype == torch.float32  # model untouched


@pytest.mark.parametrize("csc, position", [(False, "end"), (False, "middle"), (True, "front")])
@pytest.mark.parametrize("backends", [Backends(), Backends(attention="triton", add_norm="triton")],
                         ids=["grid", "triton"])
def test_stacked_contexts_equal_one_call_each(request, tiny_vit, tiny_rn, csc, position, backends):
    """R contexts in one pass (their rows stacked, their attention as R times the heads) give each context's own
    features and gradients — what stacked runs and CoCoOp's per-image contexts are built on."""
    if backends.attention == "triton" and not kernels.INTERPRET:
        pytest.skip("runs the Triton kernels on CPU tensors: needs TRITON_INTERPRET=1")
    for loaded in (tiny_vit, tiny_rn):
        torch.manual_seed(0)
        learner = PromptLearner(loaded.model, loaded.tokenizer, CLASSNAMES, n_ctx=4, csc=csc, position=position)
        encoder = FastTextEncoder(loaded.model, learner, backends)
        contexts = (0.02 * torch.randn(3, *learner.ctx.shape)).requires_grad_()
        stacked = encoder(contexts)
        weights = torch.linspace(-1, 1, stacked[0].numel()).view_as(stacked[0])
        grad, = torch.autograd.grad((stacked * weights).sum(), contexts)
        assert stacked.shape == (3, len(CLASSNAMES), stacked.shape[-1])
        for r in range(3):
            with torch.no_grad():
                learner.ctx.copy_(contexts[r])
            alone = encoder()
            alone_grad, = torch.autograd.grad((alone * weights).sum(), learner.ctx)
            assert relative(stacked[r], alone) <= 1e-5 and relative(grad[r], alone_grad) <= 1e-4


@pytest.mark.parametrize("backends", [Backends(), Backends(attention="triton", add_norm="triton")],
                         ids=["grid", "triton"])
def test_prompt_layouts_in_one_pass_equal_the_published_features(tiny_vit, backends):
    """Learners of four prompt layouts (context lengths, positions, unified and class-specific) in one encoder: the
    per-token ops run once over all their rows, the attention once per layout; each layout's stacked contexts give
    their published features and gradients, and a layout left out of a call is not computed."""
    if backends.attention == "triton" and not kernels.INTERPRET:
        pytest.skip("runs the Triton kernels on CPU tensors: needs TRITON_INTERPRET=1")
    model, tokenizer = tiny_vit.model, tiny_vit.tokenizer
    torch.manual_seed(0)
    learners = [PromptLearner(model, tokenizer, CLASSNAMES, n_ctx=n, csc=csc, position=position)
                for n, csc, position in [(4, False, "end"), (2, False, "middle"), (4, True, "front"), (3, True, "end")]]
    encoder = FastTextEncoder(model, learners, backends)
    contexts = {i: (0.02 * torch.randn(r, *learner.ctx.shape)).requires_grad_()
                for i, (r, learner) in enumerate(zip([2, 1, 3, 1], learners))}
    encoded = encoder.encode_each(contexts)
    weights = {i: torch.linspace(-1, 1, text.numel()).view_as(text) for i, text in encoded.items()}
    grads = torch.autograd.grad(sum((text * weights[i]).sum() for i, text in encoded.items()), list(contexts.values()))
    for (i, ctx), grad in zip(contexts.items(), grads):
        assert encoder.layouts[learners[i].layout] == i
        for r in range(len(ctx)):
            each = ctx[r].detach().clone().requires_grad_()
            reference = reference_text_features(TextTower.of(model), learners[i], each)
            reference_grad, = torch.autograd.grad((reference * weights[i][r]).sum(), each)
            assert relative(encoded[i][r], reference) <= 1e-5 and relative(grad[r], reference_grad) <= 1e-4
    assert list(encoder.encode_each({2: contexts[2]})) == [2]
