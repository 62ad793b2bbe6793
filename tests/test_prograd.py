"""ProGrad against plain references written from BeierZhu/Prompt-align: its prompt learner's start
(ProGrad.public/trainers/prograd.py, PromptLearner with CTX_INIT), its teacher (CLIP), its loss (ProGradLoss), the
projected gradient (Dassl.ProGrad.pytorch's prograd_backward_and_update), a whole run against that loop on the
published 77-token text computation, the recipe (scripts/prograd.sh and the README), resume."""

import pytest
import torch
import torch.nn.functional as F

from conftest import relative, run_cli, trained_whole_and_resumed
from fastcoop.cache import FeatureCache, extract_features
from fastcoop.config import Recipe
from fastcoop.datasets import read_dataset
from fastcoop.errors import FastCoopError
from fastcoop.methods import publish
from fastcoop.methods.prograd import ProGradLearner, ProGradLoss, prograd_template, teacher_features
from fastcoop.schedule import lr_at
from fastcoop.text_encoder import FastTextEncoder, reference_text_features
from fastcoop.text_tower import TextTower
from fastcoop.training import batches_per_epoch, train

PETS = ["Abyssinian", "american_bulldog", "basset_hound", "Birman"]
PETS_INIT = "a type of pet, a photo of a"  # ProGrad's OxfordPets prompt less " {}.": 8 words, 9 tokens


def test_the_published_prograd_recipe():
    pets = publish(Recipe(method="prograd", shots=16), 37, "cpu", "oxford_pets")
    assert (pets.n_ctx, pets.init, pets.batch_size, pets.epochs, pets.lr, pets.weight_decay) == (
        16, PETS_INIT, 32, 200, 0.002, 5e-4)
    assert (pets.option("prograd_lambda"), pets.option("temperature")) == (1.0, 1.0)
    assert pets.option("template") == "a type of pet, a photo of a {}." == prograd_template("oxford_pets")
    assert publish(Recipe(method="prograd", shots=1), 37, "cpu", "oxford_pets").epochs == 50
    assert publish(Recipe(method="prograd", shots=8), 47, "cpu", "dtd").option("prograd_lambda") == 0.8
    assert publish(Recipe(method="prograd", shots=4), 47, "cpu", "dtd").option("prograd_lambda") == 1.0
    assert publish(Recipe(method="prograd", shots=8), 10, "cpu", None).init == "a photo of a"
    with pytest.raises(FastCoopError, match="ProGrad has no --csc"):
        publish(Recipe(method="prograd", csc=True), 10, "cpu")


def test_the_context_starts_as_prograds_prompt_learner_starts_it(tiny_vit):
    """CTX_INIT: zeros, then the first (word count) token embeddings of the words; the prompt's text is
    'X' × (M − words) and the words, so a token the word count misses ("," makes 9 tokens of 8 words) stays a
    frozen token after the context, as token_suffix = embedding[:, 1 + n_ctx:] keeps it."""
    model, tokenizer = tiny_vit.model, tiny_vit.tokenizer
    learner = ProGradLearner(model, tokenizer, PETS, 16, False, "end", PETS_INIT)
    prompt_prefix = " ".join(["X"] * (16 - 8)) + " " + PETS_INIT
    tokenized = tokenizer([prompt_prefix + " " + name.replace("_", " ") + "." for name in PETS])
    with torch.no_grad():
        embedding = model.token_embedding(tokenized)
        ctx_vectors = torch.zeros(16, embedding.shape[-1])
        ctx_vectors[16 - 8:] = model.token_embedding(tokenizer([PETS_INIT]))[0, 1:1 + 8]
        published = torch.cat([embedding[:, :1], ctx_vectors.expand(len(PETS), -1, -1), embedding[:, 1 + 16:]], 1)
        ours = learner(model.token_embedding)
    assert torch.equal(learner.ctx, ctx_vectors) and torch.equal(learner.tokens, tokenized)
    assert torch.equal(ours, published)
    assert tokenizer.decode(tokenized[0, 17:18].tolist()).strip() == "a"  # the frozen 9th token
    with pytest.raises(FastCoopError, match="--n-ctx must be at least 8"):
        ProGradLearner(model, tokenizer, PETS, 6, False, "end", PETS_INIT)


def _published_losses(model, learner, teacher, images, labels, t=1.0):
    """CustomCLIP (the 77-token text encoder) and CLIP's teacher logits, ProGradLoss: cross-entropy, and
    -softmax(teacher / T) · log_softmax(student / T) · T², summed over classes, averaged over the batch."""
    text = reference_text_features(TextTower.of(model), learner)
    image_features = images / images.norm(dim=-1, keepdim=True)
    text_features = text / text.norm(dim=-1, keepdim=True)
    scale = model.logit_scale.exp().detach()
    stu_logits, tea_logits = scale * image_features @ text_features.t(), scale * image_features @ teacher.t()
    xe_loss = F.cross_entropy(stu_logits, labels)
    tea_prob = F.softmax(tea_logits / t, dim=-1)
    kl_loss = (-tea_prob * F.log_softmax(stu_logits / t, -1) * t * t).sum(1).mean()
    return xe_loss, kl_loss


def _prograd_gradient(xe_loss, kl_loss, ctx, lambda_):
    """prograd_backward_and_update's gradient of one tensor."""
    b_grad, = torch.autograd.grad(kl_loss, ctx, retain_graph=True)
    a_grad, = torch.autograd.grad(xe_loss, ctx)
    b_grad_norm = b_grad / torch.linalg.norm(b_grad)
    a_grad_norm = a_grad / torch.linalg.norm(a_grad)
    if torch.dot(a_grad_norm.flatten(), b_grad_norm.flatten()) < 0:
        return a_grad - lambda_ * torch.dot(a_grad.flatten(), b_grad_norm.flatten()) * b_grad_norm, True
    return a_grad, False


def test_loss_and_projected_gradient_equal_the_published_lines(tiny_vit):
    """On the fast text path against the published 77-token computation: the cross-entropy, the distillation
    loss, and the projected gradient, in cases where the two gradients conflict (projected) and where they do not
    (kept)."""
    model, tokenizer = tiny_vit.model, tiny_vit.tokenizer
    teacher = teacher_features(tiny_vit, PETS, prograd_template("oxford_pets"), "cpu")
    with torch.no_grad():
        theirs = model.encode_text(tokenizer([f"a type of pet, a photo of a {n.replace('_', ' ')}." for n in PETS]))
    torch.testing.assert_close(teacher, F.normalize(theirs.float(), dim=-1))
    scale = model.logit_scale.exp().detach()
    projected = []
    for seed in range(6):
        torch.manual_seed(seed)
        learner = ProGradLearner(model, tokenizer, PETS, 16, False, "end", PETS_INIT)
        with torch.no_grad():
            learner.ctx.add_(0.05 * torch.randn_like(learner.ctx))
        images, labels = torch.randn(1, 7, model.visual.output_dim), torch.randint(0, 4, (1, 7))
        t = 1.0 + seed % 2  # the published T = 1, and T = 2 (where its T² shows)
        loss = ProGradLoss(FastTextEncoder(model, learner), scale, None, "reference", teacher, t, 0.8)
        xe, _ = loss([learner], images, labels, [6])
        ours, = loss.gradients(xe, [learner.ctx], torch.ones(1))
        xe_loss, kl_loss = _published_losses(model, learner, teacher, images[0, :6], labels[0, :6], t)
        assert relative(xe.detach(), xe_loss.detach()[None]) <= 1e-5
        assert relative(loss.distillation.detach(), kl_loss.detach()[None]) <= 1e-5
        published, was_projected = _prograd_gradient(xe_loss, kl_loss, learner.ctx, 0.8)
        assert relative(ours, published) <= 1e-4, seed
        projected.append(was_projected)
    assert True in projected and False in projected  # both branches were checked


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory, tiny_vit, example_images):
    out = tmp_path_factory.mktemp("prograd") / "f.h5"
    return extract_features(read_dataset(example_images), out, tiny_vit, shots=[2], seeds=[1], views=2,
                            batch_size=32, workers=0, progress=False)


@pytest.mark.slow
def test_a_prograd_run_equals_the_published_loop(cache_path, tiny_vit):
    """TrainerX's epochs (view e of every image, a permutation in batches), ProGradLoss on the 77-token text,
    prograd_backward_and_update's projected gradient, torch.optim.SGD (momentum 0.9, weight decay 5e-4) at the
    epoch's lr."""
    recipe = Recipe(method="prograd", shots=2, seed=1, epochs=2, batch_size=8, lr=0.05, n_ctx=6, init="a photo of a")
    with FeatureCache(cache_path) as cache:
        result = train(cache, tiny_vit, recipe, progress=False)
        rows = cache.rows("train", 2, 1)
        views, labels, names = cache.features("train", rows, slice(1, 3)).float(), cache.labels("train", rows), \
            cache.classnames
    model = tiny_vit.model
    learner = ProGradLearner(model, tiny_vit.tokenizer, names, 6, False, "end", "a photo of a")
    teacher = teacher_features(tiny_vit, names, "a photo of a {}.", "cpu")
    optimizer = torch.optim.SGD([learner.ctx], lr=0.05, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(1)
    for epoch in range(2):
        optimizer.param_groups[0]["lr"] = lr_at(epoch, 2, 0.05, 1, 1e-5)
        order = torch.randperm(len(rows), generator=generator)
        for step in range(batches_per_epoch(len(rows), 8)):
            chosen = order[step * 8:(step + 1) * 8]
            xe_loss, kl_loss = _published_losses(model, learner, teacher, views[epoch][chosen], labels[chosen])
            learner.ctx.grad, _ = _prograd_gradient(xe_loss, kl_loss, learner.ctx, 1.0)
            optimizer.step()
    start = ProGradLearner(model, tiny_vit.tokenizer, names, 6, False, "end", "a photo of a").ctx
    assert result.history[0]["steps"] == 3 and (result.learner.ctx - start).abs().max() > 1e-4
    torch.testing.assert_close(result.learner.ctx, learner.ctx.detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_prograd_resumes_to_the_uninterrupted_run(tmp_path, capsys, cache_path, monkeypatch):
    args = ["train", cache_path, "--method", "prograd", "--shots", "2", "--epochs", "4", "--batch-size", "8",
            "--n-ctx", "6", "--device", "cpu"]
    whole, resumed = trained_whole_and_resumed(capsys, monkeypatch, tmp_path, args, "ctx")
    assert torch.equal(whole, resumed)
    code, out, err = run_cli(capsys, "eval", tmp_path / "whole", cache_path)
    assert code == 0 and "top-1" in out, err
