"""Tip-Adapter and Tip-Adapter-F on a cache: each piece against the published computation written plainly
(gaopengcuhk/Tip-Adapter main.py and utils.py), and the command."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import relative, run_cli
from fastcoop.methods.tip_adapter import (BATCH_SIZE, TipRecipe, cache_model, finetune, search, tip_logits, tip_recipe)


def _published_search(features, labels, keys, values, clip_weights, recipe):
    """utils.search_hp: β outer, α inner, cls_acc, a later setting only when strictly better."""
    (beta_scale, alpha_scale), (beta_steps, alpha_steps) = recipe.search_scale, recipe.search_step
    beta_list = [i * (beta_scale - 0.1) / beta_steps + 0.1 for i in range(beta_steps)]
    alpha_list = [i * (alpha_scale - 0.1) / alpha_steps + 0.1 for i in range(alpha_steps)]
    best_acc, best_beta, best_alpha = 0, 0, 0
    for beta in beta_list:
        for alpha in alpha_list:
            affinity = features @ keys.t()
            cache_logits = ((-1) * (beta - beta * affinity)).exp() @ values
            clip_logits = 100. * features @ clip_weights.t()
            tip = clip_logits + cache_logits * alpha
            acc = 100 * (tip.argmax(dim=1) == labels).float().sum().item() / len(labels)
            if acc > best_acc:
                best_acc, best_beta, best_alpha = acc, beta, alpha
    return best_beta, best_alpha, best_acc / 100


def _data(n=60, k=5, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    clip_weights = F.normalize(torch.randn(k, d, generator=g), dim=-1)
    labels = torch.arange(n) % k
    features = F.normalize(clip_weights[labels] * 0.3 + torch.randn(n, d, generator=g), dim=-1)
    return features, labels, clip_weights


def test_the_published_recipes():
    imagenet, eurosat = tip_recipe("imagenet"), tip_recipe("eurosat")
    assert len(imagenet.templates) == 7 and imagenet.search_scale == [7, 3] and imagenet.init_alpha == 1.17
    assert (eurosat.train_epoch, eurosat.templates) == (100, ["a centered satellite photo of {}."])
    assert (tip_recipe(None).templates, tip_recipe("my_photos").lr) == (["a photo of a {}."], 0.001)
    betas, alphas = imagenet.grid()
    assert len(betas) == 200 and len(alphas) == 20 and betas[0] == alphas[0] == 0.1 and betas[-1] < 7


@pytest.mark.parametrize("elements", [1 << 22, 500])  # one chunk of images; chunks of 9 or 10
def test_keys_logits_and_search_equal_the_published_computation(monkeypatch, elements):
    import fastcoop.methods.tip_adapter

    monkeypatch.setattr(fastcoop.methods.tip_adapter, "ELEMENTS_PER_CALL", {"cpu": elements, "cuda": elements})
    features, labels, clip_weights = _data()
    views = torch.randn(10, 20, 16)  # 10 augmented views of 20 few-shot images
    shot_labels = torch.arange(20) % 5
    keys, values = cache_model(views, shot_labels, 5)
    published_keys = views.mean(dim=0)
    published_keys /= published_keys.norm(dim=-1, keepdim=True)
    assert relative(keys, published_keys) <= 1e-6 and torch.equal(values, F.one_hot(shot_labels).float())
    plain = 100 * features @ clip_weights.t() + 2.0 * torch.exp(-3.0 * (1 - features @ keys.t())) @ values
    assert relative(tip_logits(features, keys, values, clip_weights, 2.0, 3.0), plain) <= 1e-5
    recipe = TipRecipe(["{}"], 1, 2, [7, 3], [30, 7], 0.001, 10, 2)
    ours = search(features, labels, keys, values, clip_weights, recipe)
    assert ours == pytest.approx(_published_search(features, labels, keys, values, clip_weights, recipe))
    uneven = [0, 2, 3, 5, 6, 7, 9, 11, 12, 14, 15, 16, 18]  # classes with 2 to 4 keys, in no order
    ours = search(features, labels, keys[uneven], values[uneven], clip_weights, recipe)
    assert ours == pytest.approx(_published_search(features, labels, keys[uneven], values[uneven], clip_weights,
                                                   recipe))


def test_a_search_that_gets_nothing_right_keeps_clip_alone():
    """utils.search_hp starts from best_acc = 0, best_beta = best_alpha = 0 and takes a setting only when strictly
    better: when no setting gets any image right, α = β = 0 (CLIP's logits alone), not the grid's first."""
    recipe = tip_recipe("caltech101")
    features, labels, clip_weights = _data()
    keys, values = cache_model(features[None, :20], labels[:20], 5)
    never = torch.full_like(labels, 5)  # a class no logit column stands for: no image is ever right
    assert search(features, never, keys, values, clip_weights, recipe) == (0.0, 0.0, 0.0)
    assert _published_search(features, never, keys, values, clip_weights, recipe) == (0, 0, 0)


def test_clips_classifier_is_renormalised_after_the_template_average(tiny_vit):
    """utils.clip_classifier: each template's feature normalised, their mean normalised again; Tip-Adapter's logits
    are 100 · f·w with no cosine after, so with several templates (ImageNet's) the second norm changes them."""
    from fastcoop.methods.tip_adapter import clip_classifier

    names, templates = ["red circle", "blue square"], ["a photo of a {}.", "itap of a {}.", "a bad photo of the {}."]
    ours = clip_classifier(tiny_vit, names, templates)
    published = []
    with torch.no_grad():
        for name in names:
            embeddings = tiny_vit.model.encode_text(tiny_vit.tokenizer([t.format(name) for t in templates])).float()
            embeddings /= embeddings.norm(dim=-1, keepdim=True)
            embedding = embeddings.mean(dim=0)
            embedding /= embedding.norm()
            published.append(embedding)
    assert relative(ours, torch.stack(published)) <= 1e-6
    assert torch.allclose(ours.norm(dim=-1), torch.ones(2))


def test_finetuning_equals_the_published_loop():
    """run_tip_adapter_F's loop: nn.Linear(weight = keys), AdamW(lr, eps=1e-4), CosineAnnealingLR over all
    batches stepped per batch, a shuffled loader of 256 without drop_last, fresh features each epoch."""
    features, labels, clip_weights = _data(n=300)
    keys, values = cache_model(torch.randn(3, 300, 16), labels, 5)
    recipe = TipRecipe(["{}"], 1.0, 1.17, [7, 3], [200, 20], 0.001, 10, 2)
    epoch_views = [torch.randn(300, 16), torch.randn(300, 16)]
    ours = finetune(keys, values, clip_weights, epoch_views, labels, recipe, seed=3)

    adapter = torch.nn.Linear(16, 300, bias=False)
    adapter.weight = torch.nn.Parameter(keys.clone())
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=recipe.lr, eps=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe.train_epoch * math.ceil(300 / BATCH_SIZE))
    generator = torch.Generator().manual_seed(3)
    for images in epoch_views:
        order = torch.randperm(300, generator=generator)
        for start in range(0, 300, BATCH_SIZE):
            rows = order[start:start + BATCH_SIZE]
            image_features = images[rows]
            image_features = image_features / image_features.norm(dim=-1, keepdim=True)
            affinity = adapter(image_features)
            cache_logits = ((-1) * (recipe.init_beta - recipe.init_beta * affinity)).exp() @ values
            tip = 100. * image_features @ clip_weights.t() + cache_logits * recipe.init_alpha
            loss = F.cross_entropy(tip, labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    assert relative(ours, adapter.weight.detach()) <= 1e-6 and not torch.equal(ours, keys)


@pytest.fixture(scope="module")
def split_cache(tmp_path_factory, tiny_vit, example_images):
    root = tmp_path_factory.mktemp("tip")
    import shutil

    for class_dir in (example_images / "train").iterdir():
        shutil.copytree(class_dir, root / "flat" / class_dir.name)
    from fastcoop.cli import main

    with pytest.raises(SystemExit) as done:
        main(["cache", str(root / "flat"), "--out", str(root / "f.h5"), "--model", str(tiny_vit.name), "--pretrained",
              "none", "--shots", "2", "--seeds", "1", "--views", "12", "--splits", "train,val,test", "--workers", "0"])
    assert done.value.code == 0
    with pytest.raises(SystemExit) as done:
        main(["cache", str(root / "flat"), "--out", str(root / "no-val.h5"), "--model", str(tiny_vit.name),
              "--pretrained", "none", "--shots", "2", "--seeds", "1", "--views", "12", "--workers", "0"])
    return root


def test_the_command_reports_zero_shot_tip_adapter_and_tip_adapter_f(tmp_path, capsys, split_cache):
    code, out, err = run_cli(capsys, "tip-adapter", split_cache / "f.h5", "--shots", "2", "--finetune", "--device",
                             "cpu", "--out", tmp_path / "tip.json")
    assert code == 0, err
    result = json.loads((tmp_path / "tip.json").read_text())
    assert set(result) >= {"zero_shot", "tip_adapter", "tip_adapter_f"}
    assert "Tip-Adapter: val" in out and "Tip-Adapter-F: val" in out
    betas, alphas = tip_recipe(None).grid()  # the example folder is no CoOp dataset: Caltech101's recipe
    for chosen in (result["tip_adapter"], result["tip_adapter_f"]):
        assert chosen["beta"] in betas and chosen["alpha"] in alphas and 0 <= chosen["test"] <= 1
    code, _, err = run_cli(capsys, "tip-adapter", split_cache / "no-val.h5", "--shots", "2", "--device", "cpu")
    assert code == 2 and "has no val split: cache it with --splits train,val,test" in err


def test_a_sweep_puts_tip_adapter_beside_its_runs_in_one_table_and_figure(tmp_path, capsys, split_cache):
    """`sweep --baselines`: Tip-Adapter and -F on each (shots, seed) of the runs, the numbers `fastcoop tip-adapter`
    gives, rows of the sweep's table and curves of its figure beside CoOp and the linear probe; asked of a cache
    without val, or with the base-to-new protocol, refused before any run trains."""
    args = ["--shots", "2", "--seeds", "1", "--epochs", "1", "--n-ctx", "2", "--device", "cpu"]
    out = tmp_path / "sweep"
    code, stdout, err = run_cli(capsys, "sweep", split_cache / "f.h5", "--out", out, *args,
                                "--baselines", "linear-probe,tip-adapter,tip-adapter-f")
    assert code == 0, err
    for row in ("| CoOp M2-unified-end |", "| linear probe |", "| Tip-Adapter |", "| Tip-Adapter-F |"):
        assert row in stdout
    summary = json.loads((out / "summary.json").read_text())
    code, _, err = run_cli(capsys, "tip-adapter", split_cache / "f.h5", "--shots", "2", "--finetune", "--device",
                           "cpu", "--out", tmp_path / "tip.json")
    alone = json.loads((tmp_path / "tip.json").read_text())
    (tip,), (tip_f,) = summary["baselines"]["Tip-Adapter"], summary["baselines"]["Tip-Adapter-F"]
    assert (tip["shots"], tip["seed"], tip_f["shots"], tip_f["seed"]) == (2, 1, 2, 1)
    for row, key in ((tip, "tip_adapter"), (tip_f, "tip_adapter_f")):
        assert {name: row[name] for name in alone[key]} == alone[key]
    assert f"| {100 * tip_f['test']:.2f} |" in stdout
    for refused, message in ((["--baselines", "tip-adapter"], "has no val split"),
                             (["--baselines", "tip-adaptor"], "--baselines takes linear-probe, tip-adapter"),
                             (["--baselines", "tip-adapter", "--classes", "base"], "--baselines run on all classes")):
        cache = split_cache / ("no-val.h5" if "val" in message else "f.h5")
        code, _, err = run_cli(capsys, "sweep", cache, "--out", tmp_path / "refused", *args, *refused)
        assert code == 2 and message in err and not (tmp_path / "refused").exists(), err
