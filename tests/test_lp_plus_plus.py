"""LP++ against a plain reference written from FereshteShakeri/FewShot-CLIP-Strong-Baseline's
methods/linear_probe_p2.py (LinearProbe_P2.forward, calculate_lr_w, calculate_init_alpha, calculate_lr_alpha) and
utils.clip_classifier: the text classifier, the start and step sizes, a whole run's 300 full-batch epochs with the
α update every 10th on the summed gradient, the classifier, resume."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.linalg import eigh

from conftest import run_cli, trained_whole_and_resumed
from fastcoop.cache import FeatureCache, extract_features
from fastcoop.config import Recipe
from fastcoop.datasets import read_dataset
from fastcoop.methods import publish
from fastcoop.methods.lp_plus_plus import BlendedProbe
from fastcoop.methods.tip_adapter import tip_recipe
from fastcoop.training import train


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory, tiny_vit, example_images):
    out = tmp_path_factory.mktemp("lpp") / "f.h5"
    return extract_features(read_dataset(example_images), out, tiny_vit, shots=[4], seeds=[1], views=2,
                            batch_size=32, workers=0, progress=False)


def _clip_weights(model, tokenizer, classnames, template):
    """utils.clip_classifier: per class its templates' features normalised, averaged, normalised; D × K."""
    with torch.no_grad():
        weights = []
        for classname in classnames:
            classname = classname.replace('_', ' ')
            class_embeddings = model.encode_text(tokenizer([t.format(classname) for t in template])).float()
            class_embeddings /= class_embeddings.norm(dim=-1, keepdim=True)
            class_embedding = class_embeddings.mean(dim=0)
            class_embedding /= class_embedding.norm()
            weights.append(class_embedding)
        return torch.stack(weights, dim=1)


def _published_lp_plus_plus(features, labels, shots, text_weights, bias, epochs):
    """LinearProbe_P2.forward on normalised features, its classifier's bias started at `bias` (nn.Linear's), with
    no val selection (the last epoch)."""
    num_classes = text_weights.shape[1]
    one_hot = F.one_hot(labels, num_classes).float()
    centroids = one_hot.t() @ features  # compute_centroids: the sum per class
    classifier = torch.nn.Linear(features.shape[1], num_classes, bias=True)
    classifier.weight.data, classifier.bias.data = centroids.clone(), bias.clone()
    ff_t = (features.T @ features).double().numpy()
    w, _ = eigh(ff_t)
    lr_temp = (4 * features.shape[0]) / max(w)  # calculate_lr_w
    ftT = features @ text_weights
    alpha_tilde = ((one_hot / one_hot.sum(0, keepdim=True)).t() @ ftT).double() * shots  # compute_centroids_alpha
    final_init_alpha_mean = torch.mean(250 / shots * alpha_tilde)  # calculate_init_alpha
    alpha_vec = (final_init_alpha_mean * torch.ones(1, num_classes)).float().requires_grad_(True)
    lr_alpha = features.shape[0] / (max(torch.sum(torch.pow(ftT, 2), dim=0)) * 4)  # calculate_lr_alpha
    optimizer = torch.optim.SGD(classifier.parameters(), float(lr_temp), momentum=0.9)
    for epoch in range(epochs):
        vision_logits = classifier(features)
        text_logits = features @ text_weights
        logits = vision_logits + torch.ones(features.shape[0], 1) @ alpha_vec * text_logits
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (epoch + 1) % 10 == 0:
            alpha_vec.data -= lr_alpha * alpha_vec.grad.data
    return classifier.weight.detach(), classifier.bias.detach(), alpha_vec.detach()[0], lr_temp, lr_alpha


def test_the_recipe_text_classifier_and_start(tiny_vit):
    recipe = publish(Recipe(method="lp++", shots=16), 37, "cpu", "oxford_pets")
    assert (recipe.epochs, recipe.lr, recipe.weight_decay, recipe.option("templates")) == (300, 1.0, 0.0,
                                                                                           "oxford_pets")
    names = ["Abyssinian", "american_bulldog", "basset_hound"]
    templates = tip_recipe("imagenet").templates[:5]
    probe = BlendedProbe(tiny_vit.model, tiny_vit.tokenizer, names, templates)
    torch.testing.assert_close(probe.text_weights, _clip_weights(tiny_vit.model, tiny_vit.tokenizer, names,
                                                                 templates).t())


def test_a_run_equals_the_published_loop(cache_path, tiny_vit):
    """30 full-batch epochs (three α updates, each on the gradient summed since the start) on the cache's first
    augmented view, against LinearProbe_P2.forward with the same start of b."""
    recipe = Recipe(method="lp++", shots=4, seed=1, epochs=30)
    with FeatureCache(cache_path) as cache:
        result = train(cache, tiny_vit, recipe, progress=False)
        rows = cache.rows("train", 4, 1)
        features = F.normalize(cache.features("train", rows, slice(1, 2))[0].float(), dim=-1)
        labels, names = cache.labels("train", rows), cache.classnames
    text_weights = _clip_weights(tiny_vit.model, tiny_vit.tokenizer, names, tip_recipe(None).templates)
    torch.manual_seed(1)  # the run's start of b: nn.Linear's, under the run's seed
    bias = BlendedProbe(tiny_vit.model, tiny_vit.tokenizer, names, tip_recipe(None).templates).bias.detach()
    weight, b, alpha, lr_w, lr_alpha = _published_lp_plus_plus(features, labels, 4, text_weights, bias, 30)
    learner = result.learner
    assert result.history[0]["steps"] == 1 and result.history[0]["lr"] == 1.0
    assert learner.lr_w.item() == pytest.approx(lr_w, rel=1e-5)
    assert learner.lr_alpha.item() == pytest.approx(lr_alpha.item(), rel=1e-5)
    torch.testing.assert_close(learner.weight, weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(learner.bias, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(learner.alpha, alpha, rtol=1e-4, atol=1e-6)
    assert np.ptp(alpha.numpy()) > 0  # α moved apart by class


@pytest.mark.slow
def test_lp_plus_plus_resumes_to_the_uninterrupted_run(tmp_path, capsys, cache_path, monkeypatch):
    args = ["train", cache_path, "--method", "lp++", "--shots", "4", "--epochs", "25", "--device", "cpu"]
    whole, resumed = trained_whole_and_resumed(capsys, monkeypatch, tmp_path, args, "alpha")
    assert torch.equal(whole, resumed)
    code, out, err = run_cli(capsys, "eval", tmp_path / "whole", cache_path)
    assert code == 0 and "top-1" in out, err
