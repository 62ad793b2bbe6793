"""The one resolver: which implementation runs each op, for each device and option; what a run records of it."""

import ast
import copy
import dataclasses
import json
from pathlib import Path

import pytest

import fastcoop.kernels as kernels
from conftest import run_cli
import torch

from fastcoop.backends import REFERENCE, Backends, resolve
from fastcoop.config import Recipe, parse_impl_detail
from fastcoop.cache import extract_features
from fastcoop.datasets import read_dataset
from fastcoop.errors import FastCoopError


@pytest.fixture
def triton_interpreted(monkeypatch):
    monkeypatch.setattr(kernels, "TRITON", True)
    monkeypatch.setattr(kernels, "INTERPRET", True)


@pytest.fixture
def triton_compiled(monkeypatch):
    monkeypatch.setattr(kernels, "TRITON", True)
    monkeypatch.setattr(kernels, "INTERPRET", False)


def test_gpu_defaults_are_every_kernel_but_the_opt_in_mlp(triton_compiled):
    assert resolve("cuda") == Backends(loss="triton", attention="triton", add_norm="triton", activation="triton",
                                       mlp="reference", text="fast", step="graph", eval_dtype="bf16")
    assert resolve("cuda:1", detail=(("add_norm", "reference"), ("activation", "reference"), ("step", "eager"))
                   ) == Backends(loss="triton", attention="triton", eval_dtype="bf16")
    assert resolve("cuda", detail=(("attention", "flex"), ("mlp", "triton"))).attention == "flex"
    assert resolve("cuda", detail=(("mlp", "triton"),)).mlp == "triton"
    assert resolve("cuda", detail=(("attention", "grid"),)).attention == "grid"
    assert resolve("cuda", "reference") == REFERENCE == Backends(text="reference")  # every op's reference


def test_cpu_runs_the_references_and_the_interpreted_kernels_only_when_asked(triton_compiled, monkeypatch):
    assert resolve("cpu") == Backends()  # every reference
    with pytest.raises(FastCoopError, match="--impl-detail attention=triton needs a GPU with Triton"):
        resolve("cpu", detail=(("attention", "triton"),))
    with pytest.raises(FastCoopError, match="--impl-detail mlp=triton needs a GPU with Triton"):
        resolve("cpu", detail=(("mlp", "triton"),))
    with pytest.raises(FastCoopError, match="FlexAttention has no CPU backward"):
        resolve("cpu", detail=(("attention", "flex"),))
    with pytest.raises(FastCoopError, match="step=graph needs a CUDA GPU"):
        resolve("cpu", detail=(("step", "graph"),))
    with pytest.raises(FastCoopError, match="--impl takes fast or reference"):
        resolve("cpu", "quick")
    monkeypatch.setattr(kernels, "INTERPRET", True)  # the tests' interpreter: the loss kernel runs on CPU tensors
    assert resolve("cpu") == Backends(loss="triton")
    assert resolve("cpu", detail=(("attention", "triton"), ("mlp", "triton"))) == Backends(
        loss="triton", attention="triton", mlp="triton")


def test_the_detail_is_parsed_and_checked_before_torch_loads():
    assert parse_impl_detail("attention=flex, step=eager") == (("attention", "flex"), ("step", "eager"))
    assert parse_impl_detail("") == ()
    with pytest.raises(FastCoopError, match="unknown op 'norm'; the ops are loss, attention"):
        parse_impl_detail("norm=triton")
    with pytest.raises(FastCoopError, match="attention takes grid or triton or flex, not 'fast'"):
        parse_impl_detail("attention=fast")


def test_without_triton_every_op_is_its_reference(monkeypatch):
    monkeypatch.setattr(kernels, "TRITON", False)
    assert resolve("cuda") == Backends(step="graph", eval_dtype="bf16")  # CUDA graphs need no Triton
    with pytest.raises(FastCoopError, match="needs a GPU with Triton"):
        resolve("cuda", detail=(("attention", "triton"),))


def test_kernels_that_cannot_serve_the_models_modules_are_decided_against_once(triton_compiled, tiny_vit, tiny_rn):
    """A kernel is chosen for a tower only when it serves every module it would run (never a per-call fallback):
    the QuickGELU kernel for OpenAI's activation only; a tower the fast path cannot run exactly gets the reference
    text path and the encoder ops' references, and asking for a kernel it cannot run is an error."""
    from fastcoop.text_tower import TextTower

    vit, rn = TextTower.of(tiny_vit.model), TextTower.of(tiny_rn.model)
    quick = [type(block.mlp.gelu).__name__ == "QuickGELU" for block in vit.blocks]
    assert resolve("cuda", tower=vit).activation == ("triton" if all(quick) else "reference")
    exact_gelu = replace_activations(vit, torch.nn.GELU())
    assert resolve("cuda", tower=exact_gelu).activation == "reference"
    with pytest.raises(FastCoopError, match="activation=triton cannot run this model: its activation is not"):
        resolve("cuda", detail=(("activation", "triton"),), tower=exact_gelu)
    from fastcoop.prompts import PromptLearner
    from fastcoop.text_encoder import FastTextEncoder

    model = copy.deepcopy(tiny_vit.model)
    for block in TextTower.of(model).blocks:
        block.mlp.gelu = torch.nn.GELU()
    learner = PromptLearner(model, tiny_vit.tokenizer, ["cat", "dog"], n_ctx=2)
    with pytest.raises(ValueError, match="activation=triton cannot run this model"):  # a record made without it
        FastTextEncoder(model, learner, Backends(activation="triton"))
    bidirectional = dataclasses.replace(rn, attn_mask=None)
    with pytest.warns(UserWarning, match="not exact for it .its attention is bidirectional"):
        chosen = resolve("cuda", tower=bidirectional)
    assert (chosen.text, chosen.attention, chosen.add_norm, chosen.loss, chosen.step) == (
        "reference", "grid", "reference", "triton", "graph")
    with pytest.raises(FastCoopError, match="attention=triton runs on the fast text path only"):
        resolve("cuda", detail=(("text", "reference"), ("attention", "triton")))


def replace_activations(tower, activation):
    """A copy of `tower` whose MLPs run `activation`."""
    blocks = copy.deepcopy(tower.blocks)
    for block in blocks:
        block.mlp.gelu = activation
    return dataclasses.replace(tower, blocks=blocks)


def test_the_encoder_and_the_loss_run_what_the_record_names(tiny_vit, monkeypatch):
    """Each op's kernel is called exactly when the record names it (here on CPU, under the interpreter)."""
    from fastcoop import kernels
    from fastcoop import text_encoder
    from fastcoop.prompts import PromptLearner

    learner = PromptLearner(tiny_vit.model, tiny_vit.tokenizer, ["cat", "dog"], n_ctx=2)
    calls = []
    for name in ("add_layer_norm_kernel", "mlp_kernel"):
        module = getattr(text_encoder, name)
        real = getattr(module, name.replace("_kernel", "_triton"))
        monkeypatch.setattr(module, real.__name__, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    attention = text_encoder.prefix_attention_triton
    monkeypatch.setattr(text_encoder, "prefix_attention_triton", lambda *a: calls.append("attention") or attention(*a))
    text_encoder.FastTextEncoder(tiny_vit.model, learner, Backends())()
    assert calls == []
    text_encoder.FastTextEncoder(tiny_vit.model, learner, Backends(attention="triton", add_norm="triton",
                                                                   mlp="triton"))()
    assert set(calls) == {"attention", "add_layer_norm_kernel", "mlp_kernel"}
    loss_calls = []
    triton_loss = kernels.kernel.cosine_ce_triton
    monkeypatch.setattr(kernels.kernel, "cosine_ce_triton", lambda *a: loss_calls.append(1) or triton_loss(*a))
    import torch
    x, t, y = torch.randn(4, 8), torch.randn(3, 8), torch.tensor([0, 1, 2, 0])
    kernels.cosine_ce(x, t, torch.tensor(10.0), y, backend="reference")
    assert loss_calls == []
    kernels.cosine_ce(x, t, torch.tensor(10.0), y, backend="triton")
    assert loss_calls == [1]


def test_a_run_records_its_implementations_and_verbose_prints_them(tmp_path, capsys, tiny_vit, example_images):
    cache = extract_features(read_dataset(example_images), tmp_path / "f.h5", tiny_vit, shots=2, seeds=[1],
                             views=1, workers=0, progress=False)
    code, out, err = run_cli(capsys, "train", cache, "--out", tmp_path / "run", "--shots", "2", "--n-ctx", "2",
                             "--epochs", "1", "--device", "cpu", "--verbose")
    assert code == 0, err
    expected = resolve("cpu")
    assert f"implementations: {expected.describe()}" in out
    assert "time: imports " in out and "(first epoch " in out and "graph capture 0.0 s" in out  # no graph on CPU
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["backends"] == vars(expected)
    runtime = config["runtime"]  # what was asked, beside what ran (and the CPU threads used)
    assert (runtime["device"], runtime["impl"], runtime["impl_detail"]) == ("cpu", "fast", []) and runtime["threads"]


def test_only_the_cli_and_the_pipeline_import_the_training_loop():
    """Reading, evaluating or reporting a run never imports fastcoop.training."""
    root = Path(__file__).parent.parent
    importers = set()
    for path in [*(root / "fastcoop").glob("**/*.py"), *(root / "cache").glob("*.py"), *(root / "kernels").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if "fastcoop.training" in names:
                importers.add(path.name)
    assert importers <= {"cli.py", "api.py", "pipeline.py"}, importers


def test_tritons_cache_key_is_made_in_the_background_for_a_cuda_run():
    """The hash Triton makes at a process's first kernel launch is made by a thread instead, and cached for it."""
    from triton.runtime.cache import triton_key

    from fastcoop.kernels import hash_triton_in_background

    assert hash_triton_in_background("cpu") is None
    triton_key.cache_clear()
    thread = hash_triton_in_background("cuda")
    thread.join()
    assert triton_key.cache_info().currsize == 1


@pytest.mark.parametrize("config", ["tiny-vit.json", "tiny-bidirectional.json"])
def test_the_record_is_what_ran(tmp_path, example_images, monkeypatch, config):
    """One resolver decides the text path and the step too: a tower the fast path cannot run exactly is recorded
    as the reference path and only the reference computation runs; a CPU run is recorded eager and captures
    nothing. Checked by counting what the training actually called."""
    import warnings

    import fastcoop.training as train_module
    from fastcoop.cache import FeatureCache
    from fastcoop import text_encoder
    from fastcoop.models import load_model

    loaded = load_model(str(Path(__file__).parent / "configs" / config), "none")
    cache = extract_features(read_dataset(example_images), tmp_path / "f.h5", loaded, shots=2, seeds=[1], views=1,
                             workers=0, progress=False)
    called = {"fast": 0, "reference": 0, "graph": 0}

    def counted(name, fn):
        def call(*args, **kwargs):
            called[name] += 1
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(text_encoder.FastTextEncoder, "__init__",
                        counted("fast", text_encoder.FastTextEncoder.__init__))
    monkeypatch.setattr(text_encoder, "reference_text_features",
                        counted("reference", text_encoder.reference_text_features))
    monkeypatch.setattr(train_module, "graphed_or_eager", counted("graph", lambda step: step))
    with FeatureCache(cache) as opened, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train_module.train(opened, loaded, Recipe(shots=2, n_ctx=2, epochs=1),
                                    progress=False)
    ran = "reference" if called["reference"] else "fast"
    assert result.backends.text == ran == ("reference" if "bidirectional" in config else "fast")
    assert (called["fast"] == 0) == (ran == "reference")
    assert result.backends.step == "eager" and called["graph"] == 0
