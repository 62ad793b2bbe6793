"""TaskRes against plain references written from geekyutao/TaskRes's trainers/taskres.py and its scripts: the
recipe (train_regular.sh with configs/trainers/TaskRes/*), the classifier t' = T + α·x and its loss and gradient
(TaskResLearner.forward, CustomCLIP.forward, F.cross_entropy), a whole run against the published loop (TrainerX's
epochs over augmented images with Dassl's Adam and schedule), resume."""

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_kernel, relative, run_cli, trained_whole_and_resumed
from fastcoop.cache import FeatureCache, extract_features
from fastcoop.config import Recipe
from fastcoop.datasets import read_dataset
from fastcoop.errors import FastCoopError
from fastcoop.methods import publish
from fastcoop.methods.taskres import ResidualLoss, TaskResidual
from fastcoop.schedule import lr_at
from fastcoop.training import batches_per_epoch, train
from fastcoop.zeroshot import adapter_templates, zero_shot_prototypes

PETS = ["Abyssinian", "american_bulldog", "basset_hound", "Birman", "boxer"]


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory, tiny_vit, example_images):
    out = tmp_path_factory.mktemp("taskres") / "f.h5"
    return extract_features(read_dataset(example_images), out, tiny_vit, shots=[4], seeds=[1], views=3,
                            batch_size=32, workers=0, progress=False)


def test_the_published_taskres_recipe_by_dataset_and_shots():
    """train_regular.sh: adam_lr2e-3_B256_ep100 for 1, 2 and 4 shots, ep200 for 8 and 16; ImageNet's lr 2e-4;
    the scale 0.5, Flowers102's 1.0; Dassl's Adam weight decay 5e-4."""
    one = publish(Recipe(method="taskres", shots=1), 37, "cpu", "oxford_pets")
    assert (one.epochs, one.lr, one.batch_size, one.weight_decay, one.option("residual_scale")) == (100, 2e-3, 256,
                                                                                                    5e-4, 0.5)
    assert one.option("zs_templates") == "oxford_pets"
    assert [publish(Recipe(method="taskres", shots=s), 37, "cpu", "oxford_pets").epochs for s in (2, 4, 8, 16)] == [
        100, 100, 200, 200]
    imagenet = publish(Recipe(method="taskres", shots=16), 1000, "cpu", "imagenet")
    assert (imagenet.epochs, imagenet.lr) == (200, 2e-4)
    assert publish(Recipe(method="taskres", shots=4), 102, "cpu", "oxford_flowers").option("residual_scale") == 1.0
    given = publish(Recipe(method="taskres", lr=1e-3, options=(("residual_scale", 0.2),)), 1000, "cpu", "imagenet")
    assert (given.lr, given.option("residual_scale")) == (1e-3, 0.2)
    with pytest.raises(FastCoopError, match="TaskRes's residual_scale must be at least 0, not -0.5"):
        publish(Recipe(method="taskres", options=(("residual_scale", -0.5),)), 10, "cpu")


def _published_logits(features, base, residuals, alpha, logit_scale):
    """CustomCLIP.forward after the image encoder: text_features = base + α·x (TaskResLearner.forward), both
    normalised, logit_scale · image @ textᵀ."""
    image_features = features / features.norm(dim=-1, keepdim=True)
    text_features = base + alpha * residuals
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return logit_scale * image_features @ text_features.t()


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_kernel)])
def test_taskres_loss_and_gradient_equal_the_published_lines(tiny_vit, backend):
    torch.manual_seed(0)
    templates = adapter_templates("oxford_pets")
    learner = TaskResidual(tiny_vit.model, tiny_vit.tokenizer, PETS, templates, 0.5)
    torch.testing.assert_close(learner.base, zero_shot_prototypes(tiny_vit.model, tiny_vit.tokenizer, PETS,
                                                                  templates))
    with torch.no_grad():
        learner.text_feature_residuals.normal_(std=0.1)  # a trained residual: t' differs from T
    scale = tiny_vit.model.logit_scale.exp().detach()
    images, labels = torch.randn(1, 9, 32), torch.randint(0, 5, (1, 9))
    ours, hits = ResidualLoss(scale, backend)([learner], images, labels, [7])
    our_grad, = torch.autograd.grad(ours.sum(), learner.text_feature_residuals)
    output = _published_logits(images[0, :7], learner.base, learner.text_feature_residuals, 0.5, scale)
    published = F.cross_entropy(output, labels[0, :7])
    published_grad, = torch.autograd.grad(published, learner.text_feature_residuals)
    assert relative(ours.detach(), published.detach()[None]) <= 1e-5 and relative(our_grad, published_grad) <= 1e-4
    assert hits.item() == (output.argmax(-1) == labels[0, :7]).sum().item()


@pytest.mark.slow
def test_a_taskres_run_equals_the_published_loop(cache_path, tiny_vit):
    """TrainerX: each epoch a fresh augmentation of every image (the cache's view e), a permutation of the images
    in batches (the last partial batch dropped once there are 256), CE on CustomCLIP's logits, Dassl's Adam at the
    epoch's lr (constant warm-up epoch, cosine)."""
    recipe = Recipe(method="taskres", shots=4, seed=1, epochs=3, batch_size=20, lr=0.05)
    with FeatureCache(cache_path) as cache:
        result = train(cache, tiny_vit, recipe, progress=False)
        rows = cache.rows("train", 4, 1)
        views, labels = cache.features("train", rows, slice(1, 4)).float(), cache.labels("train", rows)
        names = cache.classnames
    learner = TaskResidual(tiny_vit.model, tiny_vit.tokenizer, names, adapter_templates("default"), 0.5)
    optimizer = torch.optim.Adam([learner.text_feature_residuals], lr=0.05, weight_decay=5e-4, betas=(0.9, 0.999))
    generator = torch.Generator().manual_seed(1)
    scale = tiny_vit.model.logit_scale.exp().detach()
    for epoch in range(3):
        optimizer.param_groups[0]["lr"] = lr_at(epoch, 3, 0.05, 1, 1e-5)
        order = torch.randperm(len(rows), generator=generator)
        for step in range(batches_per_epoch(len(rows), 20)):
            chosen = order[step * 20:(step + 1) * 20]
            logits = _published_logits(views[epoch][chosen], learner.base, learner.text_feature_residuals, 0.5, scale)
            loss = F.cross_entropy(logits, labels[chosen])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert result.history[0]["steps"] == 2 and learner.text_feature_residuals.abs().max() > 1e-3
    torch.testing.assert_close(result.learner.text_feature_residuals, learner.text_feature_residuals.detach(),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_taskres_resumes_to_the_uninterrupted_run_and_evaluates_as_published(tmp_path, capsys, cache_path,
                                                                            tiny_vit, monkeypatch):
    """Adam's moments and step counts are in the checkpoint: the resumed run ends bit for bit where the
    uninterrupted one does; eval's top-1 is the argmax of CustomCLIP's logits on the test features."""
    args = ["train", cache_path, "--method", "taskres", "--shots", "4", "--epochs", "4", "--batch-size", "16",
            "--device", "cpu"]
    whole, resumed = trained_whole_and_resumed(capsys, monkeypatch, tmp_path, args, "text_feature_residuals")
    assert torch.equal(whole, resumed)
    code, out, err = run_cli(capsys, "eval", tmp_path / "whole", cache_path)
    with FeatureCache(cache_path) as cache:
        test, labels, names = cache.features("test", view=0).float(), cache.labels("test"), cache.classnames
    base = zero_shot_prototypes(tiny_vit.model, tiny_vit.tokenizer, names, adapter_templates("default"))
    logits = _published_logits(test, base, whole, 0.5, tiny_vit.model.logit_scale.exp())
    assert code == 0 and f"top-1 {(logits.argmax(-1) == labels).float().mean().item():.2%}" in out, err


def test_the_enhanced_base_is_the_prompts_through_the_trained_projection(tmp_path, tiny_vit):
    """_get_enhanced_base_text_features: the file's state_dict weight, transposed, in place of text_projection in
    the TextEncoder; the same prompts (raw class names), averaged, not normalised. A file that is none: one line."""
    model, tokenizer = tiny_vit.model, tiny_vit.tokenizer
    torch.manual_seed(0)
    weight = torch.randn(32, model.text_projection.shape[0])  # an nn.Linear weight, D × width, as those files hold
    torch.save({"state_dict": {"weight": weight}}, tmp_path / "enhanced.pth")
    recipe = publish(Recipe(method="taskres", options=(("enhanced_base", str(tmp_path / "enhanced.pth")),)), 5,
                     "cpu", "oxford_pets")
    from fastcoop.methods import get

    learner = get("taskres").learner(model, tokenizer, PETS, recipe)
    templates = adapter_templates("oxford_pets")
    with torch.no_grad():
        expected = []
        for text in PETS:
            tokens = tokenizer([template.format(text) for template in templates])
            x = model.token_embedding(tokens) + model.positional_embedding
            x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
            expected.append((x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ weight.t()).mean(0))
    torch.testing.assert_close(learner.base, torch.stack(expected), rtol=1e-5, atol=1e-6)
    (tmp_path / "not.pth").write_text("no")
    with pytest.raises(FastCoopError, match="not a file of TaskRes's enhanced base"):
        publish(Recipe(method="taskres", options=(("enhanced_base", str(tmp_path / "not.pth")),)), 5, "cpu")
