"""CoCoOp: the fast per-image prompts against the published per-image 77-token computation."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ctrl_c_after_epoch, relative, run_cli
from fastcoop.cache import FeatureCache, extract_features
from fastcoop.methods.cocoop import CoCoOpLearner, cocoop_logits
from fastcoop.datasets import read_dataset
from fastcoop.run import load_run
from fastcoop.schedule import lr_at
from fastcoop.config import Recipe
from fastcoop.methods import publish
from fastcoop.training import batches_per_epoch, train

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


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory, tiny_vit, example_images):
    out = tmp_path_factory.mktemp("cache") / "f.h5"
    return extract_features(read_dataset(example_images), out, tiny_vit, shots=4, seeds=[1, 2], views=4,
                            batch_size=64, workers=0, progress=False)


def _published_cocoop_training(cache_path, tiny_vit, seed, epochs, batch_size, lr):
    """trainers/cocoop.py's loop, step by step on the host: a permutation per epoch from one seeded generator, the
    epoch's view, per-image prompts through the published 77-token computation, cross-entropy, torch.optim.SGD
    over the context and the Meta-Net with the published schedule."""
    with FeatureCache(cache_path) as cache:
        rows = cache.rows("train", 4, seed)
        views, labels = cache.features("train", rows).float(), cache.labels("train", rows)
        torch.manual_seed(seed)
        learner = CoCoOpLearner(tiny_vit.model, tiny_vit.tokenizer, cache.classnames)
    optimizer = torch.optim.SGD(learner.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        optimizer.param_groups[0]["lr"] = lr_at(epoch, epochs, lr)
        order = torch.randperm(len(labels), generator=generator)
        for step in range(batches_per_epoch(len(labels), batch_size)):
            batch = order[step * batch_size:(step + 1) * batch_size]
            logits = cocoop_logits(tiny_vit.model, learner, views[1 + epoch][batch], "reference")
            loss = torch.nn.functional.cross_entropy(logits, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return learner


def test_cocoop_training_equals_the_published_loop(cache_path, tiny_vit):
    """fastcoop's CoCoOp run (fast per-image prompts, the schedule on the device) against the published loop: the
    context and every Meta-Net weight, fp32, a short schedule with warm-up and cosine decay."""
    config = Recipe(method="cocoop", shots=4, seed=1, epochs=3, batch_size=4, lr=0.05)
    with FeatureCache(cache_path) as cache:
        ours = train(cache, tiny_vit, config, progress=False).learner.trainable()
    theirs = _published_cocoop_training(cache_path, tiny_vit, 1, 3, 4, 0.05).trainable()
    assert list(ours) == ["ctx", "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight",
                          "meta_net.linear2.bias"]
    for name in theirs:
        assert relative(ours[name].detach(), theirs[name].detach()) <= 1e-5, name
    assert not torch.equal(ours["meta_net.linear2.bias"], torch.zeros_like(ours["meta_net.linear2.bias"]))


def test_cocoop_runs_stacked_equal_runs_alone(cache_path, tiny_vit):
    from fastcoop.training import train_stack

    configs = [Recipe(method="cocoop", shots=4, seed=seed, epochs=2, batch_size=3, lr=0.05)
               for seed in (1, 2)]
    with FeatureCache(cache_path) as cache:
        stacked = train_stack(cache, tiny_vit, configs, progress=False)
        alone = [train(cache, tiny_vit, config, progress=False) for config in configs]
    for together, by_itself in zip(stacked, alone):
        for name, tensor in by_itself.learner.trainable().items():
            assert relative(together.learner.trainable()[name].detach(), tensor.detach()) <= 1e-5, name


def test_the_published_cocoop_recipe_is_the_default():
    config = publish(Recipe(method="cocoop"), num_classes=10, device="cpu")
    assert (config.n_ctx, config.init, config.batch_size, config.epochs, config.lr) == (4, "a photo of a", 1, 10,
                                                                                          0.002)
    assert (config.warmup_epochs, config.warmup_lr, config.momentum, config.weight_decay) == (1, 1e-5, 0.9, 5e-4)
    assert publish(Recipe(method="cocoop", n_ctx=8), 10, "cpu").init is None  # M = 8 and 16: random, as published
    coop = publish(Recipe(), num_classes=10, device="cpu")
    assert (coop.n_ctx, coop.init, coop.batch_size, coop.epochs, coop.precision) == (16, None, 32, 200, "fp32")
    assert publish(Recipe(), 10, "cuda").precision == "bf16"


def test_cli_trains_evaluates_predicts_and_resumes_a_cocoop_run(tmp_path, capsys, cache_path, example_images):
    run_dir = tmp_path / "run"
    args = ["--method", "cocoop", "--shots", "4", "--epochs", "2", "--device", "cpu", "--batch-size", "4"]
    code, out, err = run_cli(capsys, "train", cache_path, "--out", run_dir, *args)
    assert code == 0, err
    prompt = load_file(run_dir / "prompt.safetensors")
    assert set(prompt) == {"ctx", "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight",
                           "meta_net.linear2.bias"}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["method"] == "cocoop" and config["train"]["n_ctx"] == 4
    results = json.loads((run_dir / "results.json").read_text())
    code, out, _ = run_cli(capsys, "eval", run_dir, cache_path)
    assert code == 0 and f"top-1 {results['test']['top1']:.2%}" in out  # the run's own test score, read back
    run = load_run(run_dir)
    for name, tensor in run.learner.trainable().items():
        assert torch.equal(tensor.detach(), prompt[name])
    image = next(p for p in sorted(example_images.rglob("*")) if p.suffix in (".png", ".jpg"))
    code, out, _ = run_cli(capsys, "predict", run_dir, image)
    assert code == 0 and out.strip()


def test_cocoop_evaluation_in_chunks_equals_one_call(cache_path, tiny_vit, monkeypatch):
    import fastcoop.methods.cocoop as cocoop

    torch.manual_seed(0)
    with FeatureCache(cache_path) as cache:
        learner = CoCoOpLearner(tiny_vit.model, tiny_vit.tokenizer, cache.classnames)
        images = cache.features("test", view=0).float()
    whole = cocoop_logits(tiny_vit.model, learner, images).argmax(-1)
    monkeypatch.setattr(cocoop, "PROMPTS_PER_CALL", 2 * learner.num_classes)  # 2 images per call
    assert torch.equal(cocoop.CoCoOpClassifier(tiny_vit.model, learner, None).predict(images), whole)


@pytest.mark.parametrize("option", [["--csc"], ["--position", "front"]])
def test_cocoop_refuses_coop_only_options_before_any_work(tmp_path, capsys, cache_path, option):
    code, _, err = run_cli(capsys, "train", cache_path, "--out", tmp_path / "run", "--method", "cocoop", *option,
                           "--shots", "4", "--device", "cpu")
    assert code == 2 and f"CoCoOp has no {option[0]}" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_an_interrupted_cocoop_run_resumes_to_the_uninterrupted_one(tmp_path, capsys, cache_path, monkeypatch):
    """Ctrl-C at the end of epoch 2 of 4 saves the context, the Meta-Net and the momentum of each; the same
    command then ends exactly where the uninterrupted run ends."""
    args = ["--method", "cocoop", "--shots", "4", "--epochs", "4", "--batch-size", "4", "--device", "cpu"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run_cli(capsys, "train", cache_path, "--out", whole, *args)[0] == 0
    with monkeypatch.context() as patch:
        ctrl_c_after_epoch(patch, 2)
        assert run_cli(capsys, "train", cache_path, "--out", resumed, *args, "--save-every", "1000")[0] == 130
    checkpoint = load_file(resumed / "checkpoint.safetensors")
    assert int(checkpoint["epochs_done"]) == 2 and "momentum.meta_net.linear1.weight" in checkpoint
    code, out, _ = run_cli(capsys, "train", cache_path, "--out", resumed, *args)
    assert code == 0 and "resuming" in out
    ours, theirs = load_file(resumed / "prompt.safetensors"), load_file(whole / "prompt.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
