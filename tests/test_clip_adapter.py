"""CLIP-Adapter against a plain reference written from gaopengcuhk/CLIP-Adapter's clip_adapter.py (Adapter,
TextEncoder, CustomCLIP.forward) trained as its README says, with Dassl's TrainerX and CoOp's recipe: the recipe,
the adapter and logits, loss and gradient, a whole run against that loop, transfer to new classes, resume."""

import pytest
import torch
import torch.nn.functional as F

from conftest import relative, run_cli, trained_whole_and_resumed
from fastcoop.cache import FeatureCache, extract_features
from fastcoop.config import Recipe
from fastcoop.datasets import read_dataset
from fastcoop.methods import publish
from fastcoop.methods.clip_adapter import AdapterLoss, FeatureAdapter
from fastcoop.schedule import lr_at
from fastcoop.training import batches_per_epoch, train

PETS = ["Abyssinian", "american_bulldog", "basset_hound", "Birman"]


def _published_logits(model, tokenizer, adapter_fc, image_features, classnames, template, ratio=0.2):
    """CustomCLIP.forward after the image encoder: x = adapter(f); f = ratio · x + (1 − ratio) · f; the text
    encoder's features of the template with '_' as ' '; both normalised; logit_scale · f @ tᵀ."""
    x = adapter_fc(image_features)
    image_features = ratio * x + (1 - ratio) * image_features
    with torch.no_grad():
        text_features = model.encode_text(tokenizer([template.format(c.replace('_', ' ')) for c in classnames]))
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * image_features @ text_features.t()


def test_the_published_recipe_and_adapter(tiny_vit):
    recipe = publish(Recipe(method="clip-adapter", shots=16), 100, "cpu", "dtd")
    assert (recipe.batch_size, recipe.epochs, recipe.lr, recipe.weight_decay, recipe.momentum) == (32, 200, 0.002,
                                                                                                   5e-4, 0.9)
    assert (recipe.option("ratio"), recipe.option("reduction"), recipe.option("template")) == (0.2, 4, "{} texture.")
    assert publish(Recipe(method="clip-adapter", shots=1), 1000, "cpu", "imagenet").option("template") == \
        "a photo of a {}."  # its CUSTOM_TEMPLATES prompt alone, ImageNet's too
    adapter = FeatureAdapter(tiny_vit.model, tiny_vit.tokenizer, PETS, "a photo of a {}, a type of pet.", 0.2, 4)
    layers = list(adapter.fc)
    assert [type(layer) for layer in layers] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear, torch.nn.ReLU]
    assert layers[0].weight.shape == (8, 32) and layers[0].bias is None and layers[2].bias is None
    assert set(adapter.trainable()) == {"fc.0.weight", "fc.2.weight"}


def test_loss_and_gradient_equal_the_published_lines(tiny_vit):
    torch.manual_seed(0)
    template = "a photo of a {}, a type of pet."
    adapter = FeatureAdapter(tiny_vit.model, tiny_vit.tokenizer, PETS, template, 0.2, 4)
    images, labels = torch.randn(1, 9, 32), torch.randint(0, 4, (1, 9))
    scale = tiny_vit.model.logit_scale.exp().detach()
    ours, hits = AdapterLoss(scale, "reference")([adapter], images, labels, [8])
    our_grad = torch.autograd.grad(ours.sum(), list(adapter.trainable().values()))
    output = _published_logits(tiny_vit.model, tiny_vit.tokenizer, adapter.fc, images[0, :8], PETS, template)
    published = F.cross_entropy(output, labels[0, :8])
    published_grad = torch.autograd.grad(published, list(adapter.trainable().values()))
    assert relative(ours.detach(), published.detach()[None]) <= 1e-5
    assert all(relative(a, b) <= 1e-4 for a, b in zip(our_grad, published_grad))
    assert hits.item() == (output.argmax(-1) == labels[0, :8]).sum().item()


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory, tiny_vit, example_images):
    out = tmp_path_factory.mktemp("clip_adapter") / "f.h5"
    return extract_features(read_dataset(example_images), out, tiny_vit, shots=[4], seeds=[1], views=3,
                            batch_size=32, workers=0, progress=False)


@pytest.mark.slow
def test_a_run_equals_the_published_loop_and_carries_to_new_classes(cache_path, tiny_vit):
    """TrainerX: view e of every image, a permutation in batches, CE of CustomCLIP's logits, torch.optim.SGD
    (momentum 0.9, weight decay 5e-4) at the epoch's lr; the adapter, class-agnostic, then scores new classes."""
    recipe = Recipe(method="clip-adapter", shots=4, seed=1, epochs=3, batch_size=16, lr=0.05)
    with FeatureCache(cache_path) as cache:
        result = train(cache, tiny_vit, recipe, progress=False)
        rows = cache.rows("train", 4, 1)
        views, labels, names = cache.features("train", rows, slice(1, 4)).float(), cache.labels("train", rows), \
            cache.classnames
    torch.manual_seed(1)  # the adapter's start under the run's seed
    adapter = FeatureAdapter(tiny_vit.model, tiny_vit.tokenizer, names, "a photo of a {}.", 0.2, 4)
    start = [p.detach().clone() for p in adapter.trainable().values()]
    optimizer = torch.optim.SGD(adapter.fc.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(1)
    for epoch in range(3):
        optimizer.param_groups[0]["lr"] = lr_at(epoch, 3, 0.05, 1, 1e-5)
        order = torch.randperm(len(rows), generator=generator)
        for step in range(batches_per_epoch(len(rows), 16)):
            chosen = order[step * 16:(step + 1) * 16]
            logits = _published_logits(tiny_vit.model, tiny_vit.tokenizer, adapter.fc, views[epoch][chosen], names,
                                       "a photo of a {}.")
            loss = F.cross_entropy(logits, labels[chosen])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for name, tensor in adapter.trainable().items():
        torch.testing.assert_close(result.learner.trainable()[name], tensor.detach(), rtol=1e-4, atol=1e-6)
    assert (result.learner.fc[0].weight - start[0]).abs().max() > 1e-4


@pytest.mark.slow
def test_clip_adapter_resumes_and_runs_base_to_new(tmp_path, capsys, cache_path, monkeypatch):
    args = ["train", cache_path, "--method", "clip-adapter", "--shots", "4", "--epochs", "4", "--batch-size", "16",
            "--device", "cpu"]
    whole, resumed = trained_whole_and_resumed(capsys, monkeypatch, tmp_path, args, "fc.0.weight")
    assert torch.equal(whole, resumed)
    code, out, err = run_cli(capsys, *args, "--classes", "base", "--out", tmp_path / "b2n")
    assert code == 0 and "new" in out and "H " in out, err  # the adapter carries to the new classes
