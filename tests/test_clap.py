"""ZS-LP and CLAP against plain references written from jusiro/CLAP's trainers/adapters.py: the zero-shot
prototypes (_get_base_text_features), the class multipliers (init_lagrangian_multipliers), the loss and its
gradient (forward_lp, F.cross_entropy, zero_shot_constraint), a whole run against the published loop
(TrainerXCostume.run_epoch with Dassl's SGD and schedule), the classifier, resume."""

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_kernel, relative, run_cli, trained_whole_and_resumed
from fastcoop.cache import FeatureCache, extract_features
from fastcoop.config import Recipe
from fastcoop.datasets import read_dataset
from fastcoop.methods import publish
from fastcoop.methods.clap import POOLED_VIEWS, ProbeLoss, ZeroShotProbe, class_multipliers
from fastcoop.zeroshot import adapter_templates
from fastcoop.schedule import lr_at
from fastcoop.training import batches_per_epoch, train

DTD = ["banded", "blotchy", "braided", "bubbly", "bumpy"]  # DTD's class names, as its dataset gives them


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory, tiny_vit, example_images):
    """3 augmented views (fewer than CLAP's 20: the runs warn and draw from these)."""
    out = tmp_path_factory.mktemp("clap") / "f.h5"
    return extract_features(read_dataset(example_images), out, tiny_vit, shots=[2, 4], seeds=[1], views=3,
                            batch_size=32, workers=0, progress=False)


def _clap_text_encoder(model, tokens):
    """CLAP's TextEncoder.forward on the tokenized prompts' embeddings: + positional embedding, the transformer,
    ln_final, the EOT row (argmax of the token ids) times text_projection."""
    x = model.token_embedding(tokens) + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection


def test_the_prototypes_start_at_clap_base_text_features(tiny_vit):
    """_get_base_text_features: for each class its prompts (the dataset's CUSTOM_TEMPLATES one; ImageNet's seven
    IMAGENET_TEMPLATES_SELECT before it) formatted with the class name as the dataset gives it, encoded, averaged
    with .mean(1) and not normalised."""
    model, tokenizer = tiny_vit.model, tiny_vit.tokenizer
    assert adapter_templates("dtd") == ["{} texture."]  # CLAP's, not KgCoOp's "a photo of a {}, a type of texture."
    imagenet = adapter_templates("imagenet")
    assert len(imagenet) == 8 and imagenet[0] == "itap of a {}." and imagenet[-1] == "a photo of a {}."
    for key in ("dtd", "imagenet"):
        templates = adapter_templates(key)
        probe = ZeroShotProbe(model, tokenizer, DTD, templates)
        with torch.no_grad():
            expected = torch.stack([_clap_text_encoder(model, tokenizer([t.format(name) for t in templates])).mean(0)
                                    for name in DTD])
        torch.testing.assert_close(probe.base, expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(probe.prototypes, probe.base) and probe.base.norm(dim=-1).sub(1).abs().min() > 1e-3
    recipe = publish(Recipe(method="clap", shots=4), 5, "cpu", "dtd")
    assert (recipe.batch_size, recipe.epochs, recipe.lr, recipe.weight_decay, recipe.momentum) == (256, 300, 0.1, 0.0,
                                                                                                   0.9)
    assert recipe.option("zs_templates") == "dtd" and publish(Recipe(method="zs-lp"), 5, "cpu", "mine").option(
        "zs_templates") == "default"


def _forward_lp(features, prototypes, logit_scale):
    image_features_norm = features / features.norm(dim=-1, keepdim=True)
    prototypes_norm = prototypes / prototypes.norm(dim=-1, keepdim=True)
    return image_features_norm @ prototypes_norm.t() * logit_scale


def _multipliers(features, labels, base, logit_scale):
    """init_lagrangian_multipliers with CONSTRAINT 'l2': the zero-shot logits' softmax, diag(Pᵀ · one-hot) over the
    class counts."""
    labels_one_hot = F.one_hot(labels)
    logits = _forward_lp(features, base, logit_scale)
    return torch.diag(torch.softmax(logits, -1).t() @ labels_one_hot.to(torch.float32)) / labels_one_hot.sum(0)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_kernel)])
def test_clap_loss_and_gradient_equal_the_published_lines(tiny_vit, backend):
    torch.manual_seed(0)
    probe = ZeroShotProbe(tiny_vit.model, tiny_vit.tokenizer, DTD, ["{} texture."])
    with torch.no_grad():
        probe.prototypes.add_(0.05 * torch.randn_like(probe.prototypes))  # away from T: the constraint is not 0
    scale = tiny_vit.model.logit_scale.exp().detach()
    pool, pool_labels = torch.randn(60, 32), torch.arange(60) % 5
    alpha = _multipliers(pool, pool_labels, probe.base, scale)
    torch.testing.assert_close(class_multipliers(probe.base, pool, pool_labels, scale), alpha)
    probe.register_buffer("multipliers", alpha, persistent=False)
    images, labels = torch.randn(1, 12, 32), torch.randint(0, 5, (1, 12))
    ours, hits = ProbeLoss(scale, backend, constrained=True)([probe], images, labels, [10])
    our_grad, = torch.autograd.grad(ours.sum(), probe.prototypes)
    output = _forward_lp(images[0, :10], probe.prototypes, scale)
    published = F.cross_entropy(output, labels[0, :10]) + torch.mean(
        alpha * (probe.prototypes - probe.base.clone()).pow(2).sum(-1))
    published_grad, = torch.autograd.grad(published, probe.prototypes)
    assert relative(ours.detach(), published.detach()[None]) <= 1e-5 and relative(our_grad, published_grad) <= 1e-4
    assert hits.item() == (output.argmax(-1) == labels[0, :10]).sum().item()
    constraint = (alpha * (probe.prototypes - probe.base).pow(2).sum(-1)).mean()
    assert constraint.item() > 1e-3 * published.item()  # the constraint is really in it


def _published_run(cache, tiny_vit, recipe, constrained: bool):
    """TrainerXCostume.run_epoch as the published code runs it, on the same pool and draws: the pool of the
    train features' augmented passes (here the cache's 3 views, view-major), each epoch a shuffle of the pool
    and as many batches of 256 as the loader over the images has; forward_lp, cross-entropy (+ the constraint),
    torch.optim.SGD (momentum 0.9, no weight decay) at the epoch's lr (constant warm-up epoch, cosine)."""
    rows = cache.rows("train", recipe.shots, recipe.seed)
    views = cache.features("train", rows, slice(1, 4)).float()
    pool, labels = views.reshape(-1, views.shape[-1]), cache.labels("train", rows).repeat(len(views))
    probe = ZeroShotProbe(tiny_vit.model, tiny_vit.tokenizer, cache.classnames, adapter_templates("default"))
    scale = tiny_vit.model.logit_scale.exp().detach()
    alpha = _multipliers(pool, labels, probe.base, scale)
    optimizer = torch.optim.SGD([probe.prototypes], lr=recipe.lr, momentum=0.9, weight_decay=0.0)
    generator = torch.Generator().manual_seed(recipe.seed)
    steps, batch = batches_per_epoch(len(rows), 256), min(256, len(pool))
    for epoch in range(recipe.epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch, recipe.epochs, recipe.lr, 1, 1e-5)
        order = torch.randperm(len(pool), generator=generator)
        for step in range(steps):
            chosen = order[step * batch:(step + 1) * batch]
            loss = F.cross_entropy(_forward_lp(pool[chosen], probe.prototypes, scale), labels[chosen])
            if constrained:
                loss = loss + torch.mean(alpha * (probe.prototypes - probe.base).pow(2).sum(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return probe.prototypes.detach()


@pytest.mark.parametrize("method", ["clap", "zs-lp"])
def test_a_run_equals_the_published_loop_on_the_pooled_views(cache_path, tiny_vit, method):
    recipe = Recipe(method=method, shots=4, seed=1, epochs=4, lr=0.5)
    with FeatureCache(cache_path) as cache, pytest.warns(UserWarning, match=f"pools {POOLED_VIEWS} augmented"):
        result = train(cache, tiny_vit, recipe, progress=False)
        published = _published_run(cache, tiny_vit, result.recipe, constrained=method == "clap")
    assert result.augmentation["pooled_views"] == 3 and result.history[0]["steps"] == 1
    assert not torch.equal(result.learner.prototypes, result.learner.base)
    torch.testing.assert_close(result.learner.prototypes, published, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_clap_through_the_commands_resumes_to_the_uninterrupted_run(tmp_path, capsys, cache_path, tiny_vit,
                                                                    monkeypatch, example_images):
    """train (interrupted after epoch 2, resumed), eval against forward_lp's argmax on the test features, predict
    among a subset of its classes (the prototypes carry over to names they have a row for) and among others
    (refused)."""
    args = ["train", cache_path, "--method", "clap", "--shots", "4", "--epochs", "5", "--device", "cpu"]
    whole, resumed = trained_whole_and_resumed(capsys, monkeypatch, tmp_path, args, "prototypes")
    assert torch.equal(whole, resumed)
    code, out, err = run_cli(capsys, "eval", tmp_path / "whole", cache_path)
    with FeatureCache(cache_path) as cache:
        test, labels = cache.features("test", view=0).float(), cache.labels("test")
    top1 = (_forward_lp(test, whole, tiny_vit.model.logit_scale.exp()).argmax(-1) == labels).float().mean().item()
    assert code == 0 and f"top-1 {top1:.2%}" in out, err
    image = next((example_images / "test").rglob("*.jpg"))
    with FeatureCache(cache_path) as cache:
        names = cache.classnames
    code, out, err = run_cli(capsys, "predict", tmp_path / "whole", image, "--classes", f"{names[3]},{names[1]}")
    assert code == 0 and out.count("%") == 2, err
    code, _, err = run_cli(capsys, "predict", tmp_path / "whole", image, "--classes", f"{names[3]},zebra")
    assert code == 2 and "learned a row per class (prototypes) and has none for 'zebra'" in err


@pytest.mark.slow
def test_report_shows_a_probe_run_without_a_prompt(tmp_path, capsys, cache_path):
    code, _, err = run_cli(capsys, "train", cache_path, "--method", "zs-lp", "--shots", "4", "--epochs", "2",
                           "--out", tmp_path / "run", "--device", "cpu")
    assert code == 0, err
    code, out, err = run_cli(capsys, "report", tmp_path / "run")
    assert code == 0 and "| zs-lp | all | 4 | – | – | – | – | 2 | 1 |" in out, out
