"""KgCoOp: CoOp's learner with a penalty keeping the learned class text features near the hand-written prompt's;
its loss and gradients against the paper's formula written plainly, its recipe, and a whole run."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import relative, run_cli
from fastcoop.cache import extract_features
from fastcoop.config import Recipe
from fastcoop.methods import publish
from fastcoop.datasets import read_dataset
from fastcoop.errors import FastCoopError
from fastcoop.methods.kgcoop import hand_written_features, hand_written_template
from fastcoop.prompts import PromptLearner
from fastcoop.methods.kgcoop import KgCoOpLoss
from fastcoop.text_encoder import FastTextEncoder, reference_text_features
from fastcoop.text_tower import TextTower

PETS = ["Abyssinian", "american_bulldog", "basset_hound", "Birman"]


def test_the_published_kgcoop_recipe_is_the_default():
    """scripts/base2new_train.sh with configs/trainers/KgCoOp/vit_b16_ep100_ctxv1: M = 4 from 'a photo of a',
    batch 128, 100 epochs, λ = 8, CoOp's SGD and schedule; its hand-written prompts per dataset."""
    config = publish(Recipe(method="kgcoop"), num_classes=10, device="cpu")
    assert (config.n_ctx, config.init, config.batch_size, config.epochs, config.option("kg_weight")) == (
        4, "a photo of a", 128, 100, 8.0)
    assert (config.lr, config.momentum, config.weight_decay, config.warmup_epochs) == (0.002, 0.9, 5e-4, 1)
    assert hand_written_template("eurosat") == "a centered satellite photo of {}."
    assert hand_written_template("dtd") == "a photo of a {}, a type of texture."  # KgCoOp's, not CoOp's zsclip
    assert hand_written_template(None) == "a photo of a {}."
    with pytest.raises(FastCoopError, match="-o kg_weight is not an option of CoOp"):  # declared by KgCoOp only
        publish(Recipe(method="coop", options=(("kg_weight", 1.0),)), num_classes=10, device="cpu")


def test_kgcoop_loss_and_gradient_equal_the_papers_formula(tiny_vit):
    """CE(scale · cos(image, w)) + λ · (1 − mean_k cos(w_k, w_clip,k)), written out from the paper on the published
    77-token text computation, against fastcoop's loss on the fast text path; the hand-written features against
    the text encoder's own output for the filled-in template."""
    model, tokenizer = tiny_vit.model, tiny_vit.tokenizer
    template = hand_written_template("oxford_pets")
    anchor = hand_written_features(tiny_vit, PETS, template, "cpu")
    with torch.no_grad():
        theirs = model.encode_text(tokenizer([template.format(n.replace("_", " ")) for n in PETS])).float()
    assert relative(anchor, F.normalize(theirs, dim=-1)) <= 1e-6
    torch.manual_seed(0)
    learner = PromptLearner(model, tokenizer, PETS, n_ctx=None, init="a photo of a")
    images, labels = torch.randn(6, model.visual.output_dim), torch.tensor([0, 1, 2, 3, 1, 0])
    scale = model.logit_scale.exp().detach()

    encoder = FastTextEncoder(model, learner)
    ours, = KgCoOpLoss(encoder, scale, None, "reference", anchor, 8.0)([learner], images[None], labels[None], [6])[0]
    our_grad, = torch.autograd.grad(ours, learner.ctx)

    text = reference_text_features(TextTower.of(model), learner)
    text, clip_text = F.normalize(text, dim=-1), F.normalize(theirs, dim=-1)
    logits = scale * F.normalize(images, dim=-1) @ text.t()
    paper = F.cross_entropy(logits, labels) + 8.0 * (1 - torch.nn.CosineSimilarity(dim=1, eps=1e-7)(
        text, clip_text).mean())
    paper_grad, = torch.autograd.grad(paper, learner.ctx)
    assert relative(ours.detach(), paper.detach()) <= 1e-5 and relative(our_grad, paper_grad) <= 1e-4
    assert (8.0 * (1 - F.cosine_similarity(text, clip_text).mean())).item() > 1e-4  # the penalty is really in it


def test_a_kgcoop_run_trains_tests_base_and_new_and_records_its_recipe(tmp_path, capsys, tiny_vit, example_images):
    cache = extract_features(read_dataset(example_images), tmp_path / "f.h5", tiny_vit, shots=4, seeds=[1],
                             views=2, batch_size=32, workers=0, progress=False)
    args = ["train", cache, "--out", tmp_path / "run", "--method", "kgcoop", "--classes", "base", "--shots", "4",
            "--epochs", "2", "--device", "cpu"]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert (config["method"], config["kg_weight"], config["kg_template"], config["n_ctx"]) == (
        "kgcoop", 8.0, "a photo of a {}.", 4)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {"test", "test_new", "harmonic_mean"} <= set(results)
    code, _, err = run_cli(capsys, "train", cache, "--out", tmp_path / "coop", "-o", "kg_weight=2", "--shots", "4")
    assert code == 2 and err.strip() == "error: -o kg_weight is not an option of CoOp (CoOp's: none)"
