import json

import pytest
import torch

from conftest import TINY_VIT, run_cli
from fastcoop.cache import FeatureCache, extract_features
from fastcoop.datasets import read_dataset
from fastcoop.classifiers import prompt_text_features
from fastcoop.predict import predict_images
from fastcoop.run import load_run, with_classnames
from fastcoop.schedule import lr_at, published_epochs
from fastcoop.config import Recipe, Runtime
from fastcoop.training import batches_per_epoch, train


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory, tiny_vit, example_images):
    out = tmp_path_factory.mktemp("cache") / "f.h5"
    return extract_features(read_dataset(example_images), out, tiny_vit, shots=4, seeds=[1, 2], views=2,
                            batch_size=32, workers=0, progress=False)


def test_published_schedule():
    # CoOp's scripts: rn50_ep50 for 1 shot, rn50_ep100 for 2 and 4, rn50 (200 epochs) for 8 and 16; ImageNet 50
    assert [published_epochs(s, 100) for s in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert [published_epochs(s, 1000) for s in (1, 2, 4, 8, 16)] == [50] * 5
    assert lr_at(0, 200, 0.002) == 1e-5
    assert lr_at(1, 200, 0.002) == pytest.approx(0.002)
    assert lr_at(101, 200, 0.002) == pytest.approx(0.001)
    assert batches_per_epoch(100, 32) == 3 and batches_per_epoch(20, 32) == 1


@pytest.mark.parametrize("csc, position", [(False, "end"), (True, "front")])
def test_fast_and_reference_training_end_with_the_same_context(cache_path, tiny_vit, csc, position):
    """50 steps (48 train images / batch 16 = 3 steps × 17 epochs), same seed and batches, fp32."""
    contexts = {}
    for path in ("fast", "reference"):
        recipe = Recipe(shots=4, seed=1, n_ctx=4, csc=csc, position=position, epochs=17, batch_size=16, lr=0.05)
        with FeatureCache(cache_path) as cache:
            result = train(cache, tiny_vit, recipe, Runtime(impl=path), progress=False)
        assert sum(r["steps"] for r in result.history) == 51
        contexts[path] = result.learner.ctx.detach()
    fast, ref = contexts["fast"], contexts["reference"]
    assert (fast - ref).norm() <= 1e-4 * ref.norm()


def test_bf16_on_request_on_the_cpu(cache_path, tiny_vit):
    """The CPU keeps fp32 unless bf16 is asked for; then the text encoder really runs bf16: the context and the
    epochs' losses differ from fp32's by rounding, not more."""
    runs = {}
    for precision in ("auto", "bf16"):
        recipe = Recipe(shots=4, seed=1, n_ctx=4, epochs=5, batch_size=16, lr=0.05, precision=precision)
        with FeatureCache(cache_path) as cache:
            result = train(cache, tiny_vit, recipe, Runtime(device="cpu"), progress=False)
        runs[result.recipe.precision] = result
    fp32, bf16 = (runs[p].learner.ctx.detach() for p in ("fp32", "bf16"))
    losses = [[epoch["loss"] for epoch in runs[p].history] for p in ("fp32", "bf16")]
    assert 0 < (bf16 - fp32).norm() <= 5e-2 * fp32.norm()
    assert losses[0] != losses[1] and all(abs(a - b) <= 3e-3 * a for a, b in zip(*losses))


@pytest.mark.slow
def test_training_learns(cache_path, tiny_vit):
    config = Recipe(shots=4, seed=2, n_ctx=4, csc=True, epochs=60, batch_size=16)
    with FeatureCache(cache_path) as cache:
        result = train(cache, tiny_vit, config, progress=False)
    first, last = result.history[0], result.history[-1]
    assert last["loss"] < first["loss"]
    assert last["train_acc"] > 3 / 12  # chance is 1/12


def test_cli_train_eval_predict_roundtrip(tmp_path, capsys, cache_path, example_images):
    run_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", cache_path, "--out", run_dir, "--shots", "4", "--seed", "1",
                             "--n-ctx", "4", "--epochs", "3", "--device", "cpu", "--impl", "reference")
    assert code == 0, err
    assert {p.name for p in run_dir.iterdir()} == {"prompt.safetensors", "config.json", "metrics.jsonl",
                                                    "results.json", "curve.png"}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["epochs"] == 3 and config["model"] == TINY_VIT and len(config["classnames"]) == 12
    assert config["runtime"]["impl"] == "reference" and config["backends"]["text"] == "reference"  # recorded
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] > 0 and results["train_seconds"] > 0 and results["setup_seconds"] > 0
    code, out, _ = run_cli(capsys, "eval", run_dir, cache_path)
    assert code == 0 and f"top-1 {results['test']['top1']:.2%}" in out
    # a saved run reloads to identical predictions
    run_a, run_b = load_run(run_dir), load_run(run_dir)
    torch.testing.assert_close(*(prompt_text_features(run.loaded.model, run.learner) for run in (run_a, run_b)),
                               rtol=0, atol=0)
    image = str(next((example_images / "test" / "red_circle").iterdir()))
    assert predict_images(run_a, [image]) == predict_images(run_b, [image])
    code, out, _ = run_cli(capsys, "predict", run_dir, image, "--top-k", "2")
    assert code == 0 and out.count("%") == 2
    # among other class names: the learned context on them, as a run on those classes computes it
    names = ["red circle", "zebra", "golden retriever"]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    expected = predict_images(with_classnames(run_a, names), [image], top_k=3)[0]
    for given in (",".join(names), tmp_path / "names.txt"):
        code, out, err = run_cli(capsys, "predict", run_dir, image, "--classes", given, "--top-k", "3")
        assert code == 0 and out.strip() == f"{image}: " + ", ".join(f"{n} {p:.1%}" for n, p in expected), err
    code, _, err = run_cli(capsys, "predict", run_dir, image, "--classes", "zebra")
    assert code == 2 and "--classes takes two or more different class names" in err


def test_zeroshot_cli(capsys, cache_path, tmp_path):
    code, out, _ = run_cli(capsys, "zeroshot", cache_path)
    assert code == 0 and "one template" in out
    code, out, _ = run_cli(capsys, "zeroshot", cache_path, "--templates", "imagenet")
    assert code == 0 and "80 templates" in out
    cupl = tmp_path / "cupl.json"
    with FeatureCache(cache_path) as cache:
        cupl.write_text(json.dumps({name: [f"a {name}.", f"a picture of a {name}"] for name in cache.classnames}))
    code, out, _ = run_cli(capsys, "zeroshot", cache_path, "--cupl", cupl)
    assert code == 0 and "CuPL" in out


@pytest.mark.parametrize("args, message", [
    (["train", "{cache}", "--out", "{tmp}/r", "--shots", "8"], "no 8-shot subset"),
    (["train", "{cache}", "--out", "{tmp}/r", "--n-ctx", "0"], "--n-ctx"),
    (["train", "{cache}", "--out", "{tmp}/r", "--shots", "4", "--init", " ".join(["word"] * 75)], "tokens"),
    (["zeroshot", "{cache}", "--template", "a photo"], "must contain '{}'"),
    (["eval", "{tmp}", "{cache}"], "not a fastcoop run directory"),
    (["train", "{tmp}/missing.h5", "--out", "{tmp}/r"], "does not exist"),
    (["zeroshot", "{cache}", "--templates", "no-such-set"], "no built-in templates"),
    (["train", "{cache}", "--out", "{tmp}/r", "--shots", "4", "--impl-detail", "attention=flex", "--device", "cpu"],
     "GPU only"),
    (["train", "{cache}", "--out", "{tmp}/r", "--impl-detail", "attention=fast"], "attention takes grid or triton or flex"),
    (["train", "{cache}", "--out", "{tmp}/r", "--impl-detail", "norm=triton"], "unknown op 'norm'"),
    (["zeroshot", "{cache}", "--cupl", "{tmp}/missing.json"], "cannot read CuPL file"),
])
def test_cli_errors(capsys, tmp_path, cache_path, args, message):
    code, _, err = run_cli(capsys, *[a.format(cache=cache_path, tmp=tmp_path) for a in args])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_run_dir_from_another_cache_is_refused(capsys, tmp_path, tiny_vit, example_images, cache_path):
    other = extract_features(read_dataset(example_images), tmp_path / "other.h5", tiny_vit, shots=4, seeds=[1],
                             batch_size=32, workers=0, progress=False)
    run_dir = tmp_path / "run"
    base = ["--out", run_dir, "--shots", "4", "--n-ctx", "2", "--epochs", "1"]
    assert run_cli(capsys, "train", cache_path, *base)[0] == 0
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    code, _, err = run_cli(capsys, "train", other, *base)
    assert code == 2 and "holds a finished run made with other settings (feature cache: " in err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_cached_training_follows_the_published_steps_on_pixels(cache_path, tiny_vit):
    """One epoch of fastcoop on cached views against the published step re-encoding the same augmented images
    (same batches and views); they differ only by the float16 rounding of the cached features."""
    from fastcoop.cache.views import ImageViews, model_input, split_eval_transform
    from fastcoop.models import preprocess_config
    from fastcoop.prompts import PromptLearner
    from fastcoop.reference import published_step

    config = Recipe(shots=4, seed=1, n_ctx=4, epochs=2, batch_size=16, warmup_epochs=0)
    with FeatureCache(cache_path) as cache:
        result = train(cache, tiny_vit, config, progress=False)
        rows = cache.rows("train", 4, 1)
        paths, labels = cache.paths("train"), cache.labels("train", rows)
        classnames = cache.classnames
    pre = preprocess_config(tiny_vit.model)
    eval_image, normalize = split_eval_transform(tiny_vit.preprocess)
    views = ImageViews(paths, eval_image, 2, "train", pre["size"])
    torch.manual_seed(1)
    learner = PromptLearner(tiny_vit.model, tiny_vit.tokenizer, classnames, n_ctx=4)
    optimizer = torch.optim.SGD([learner.ctx], lr=0.002, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(1)  # the loop's batch order: a permutation per epoch
    for epoch in range(2):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch, 2, 0.002, warmup_epochs=0)
        order = torch.randperm(48, generator=generator)
        for step in range(3):
            batch = order[step * 16:(step + 1) * 16]  # epoch e: augmented view e of every image
            images = model_input(torch.stack([views[int(rows[r])][0][1 + epoch] for r in batch]), normalize)
            published_step(tiny_vit.model, learner, images, labels[batch], optimizer)
    ours, theirs = result.learner.ctx.detach(), learner.ctx.detach()
    assert (ours - theirs).norm() <= 1e-3 * theirs.norm()


@pytest.mark.slow
def test_predict_and_eval_refuse_bad_input(capsys, tmp_path, cache_path, tiny_rn, example_images):
    run_dir = tmp_path / "run"
    assert run_cli(capsys, "train", cache_path, "--out", run_dir, "--shots", "4", "--n-ctx", "2", "--epochs", "1")[0] == 0
    code, _, err = run_cli(capsys, "predict", run_dir, tmp_path / "nope.jpg")
    assert code == 2 and "cannot read image" in err and "nope.jpg" in err
    other_model = extract_features(read_dataset(example_images), tmp_path / "rn.h5", tiny_rn, shots=4, seeds=[1],
                                   batch_size=32, workers=0, progress=False)
    code, _, err = run_cli(capsys, "eval", run_dir, other_model)
    assert code == 2 and "would not match" in err


def test_non_finite_loss_stops_and_keeps_last_good_context(capsys, tmp_path, cache_path):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", cache_path, "--out", run_dir, "--shots", "4", "--n-ctx", "2",
                           "--epochs", "5", "--lr", "1e38")
    assert code == 2 and "non-finite" in err
    from safetensors.torch import load_file

    ctx = load_file(run_dir / "prompt.safetensors")["ctx"]
    assert torch.isfinite(ctx).all()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 1


def test_report_averages_seeds_and_interpret_reads_back_the_init_words(capsys, tmp_path, cache_path):
    for seed in (1, 2):
        args = ["train", cache_path, "--out", tmp_path / f"s{seed}", "--shots", "4", "--seed", seed,
                "--init", "a photo of a", "--epochs", "1"]  # one warm-up epoch at lr 1e-5: the context barely moves
        assert run_cli(capsys, *args)[0] == 0
    code, out, _ = run_cli(capsys, "report", tmp_path / "s1", tmp_path / "s2")
    table = [line for line in out.splitlines() if line.startswith("| f.h5")]
    accs = [json.loads((tmp_path / f"s{s}" / "results.json").read_text())["test"]["top1"] for s in (1, 2)]
    assert code == 0 and len(table) == 1 and "| 1,2 |" in table[0]
    assert f"{100 * sum(accs) / 2:.2f} ± " in table[0]
    code, out, _ = run_cli(capsys, "interpret", tmp_path / "s1", "--top-k", "1")
    lines = out.splitlines()
    assert code == 0 and "nearest to each context vector" in lines[0] and "distance" in lines[0]
    assert [line.split(": ")[1].split(" (")[0] for line in lines[1:]] == ["a", "photo", "of", "a"]
    code, _, err = run_cli(capsys, "report", tmp_path)  # the folder of the runs: say to pass the runs
    assert code == 2 and f"{tmp_path} is not a run but holds 2: pass them ({tmp_path}/*), e.g. {tmp_path / 's1'} " \
        f"{tmp_path / 's2'}" in err


def _views_per_epoch(cache, tiny_vit, monkeypatch, epochs):
    """Train `epochs` epochs; return the feature block each epoch trained on, and the run's result."""
    from fastcoop.step import TrainStep

    seen = []
    load_view = TrainStep.load_view
    monkeypatch.setattr(TrainStep, "load_view",
                        lambda self, run, features: (seen.append(features.clone()), load_view(self, run, features)))
    config = Recipe(shots=4, seed=1, n_ctx=2, epochs=epochs, batch_size=16)
    return seen, train(cache, tiny_vit, config, progress=False)


@pytest.mark.parametrize("epochs", [5, 3])  # as many views as epochs; more (the run reads only those it uses)
def test_epoch_e_trains_on_view_e(tmp_path, tiny_vit, example_images, monkeypatch, recwarn, epochs):
    path = extract_features(read_dataset(example_images), tmp_path / "f.h5", tiny_vit, shots=4, seeds=[1],
                            views=5, batch_size=64, workers=0, progress=False)
    with FeatureCache(path) as cache:
        cached = cache.features("train", cache.rows("train", 4, 1)).float()
        seen, result = _views_per_epoch(cache, tiny_vit, monkeypatch, epochs=epochs)
    assert [torch.equal(block, cached[1 + e]) for e, block in enumerate(seen)] == [True] * epochs
    assert not any(torch.equal(seen[a], seen[b]) for a in range(epochs) for b in range(a))  # no view twice
    assert result.augmentation == {"cached_views": 5, "distinct_views_per_image": epochs,
                                   "fresh_view_every_epoch": True}
    assert not [w for w in recwarn if "augmented views" in str(w.message)]


def test_too_few_views_cycle_with_a_warning_and_a_record(tmp_path, capsys, cache_path, tiny_vit, monkeypatch):
    with FeatureCache(cache_path) as cache:  # 2 augmented views
        cached = cache.features("train", cache.rows("train", 4, 1)).float()
        with pytest.warns(UserWarning, match="2 augmented views per image for 5 epochs") as caught:
            seen, result = _views_per_epoch(cache, tiny_vit, monkeypatch, epochs=5)
    assert len([w for w in caught if "augmented views" in str(w.message)]) == 1  # said once
    assert [int(torch.equal(block, cached[1 + e % 2])) for e, block in enumerate(seen)] == [1] * 5
    assert result.augmentation == {"cached_views": 2, "distinct_views_per_image": 2, "fresh_view_every_epoch": False}
    run_dir = tmp_path / "run"
    with pytest.warns(UserWarning, match="2 augmented views per image for 3 epochs"):
        code, _, _ = run_cli(capsys, "train", cache_path, "--out", run_dir, "--shots", "4", "--n-ctx", "2",
                             "--epochs", "3")
    assert code == 0
    for name in ("config.json", "results.json"):
        assert json.loads((run_dir / name).read_text())["augmentation"]["distinct_views_per_image"] == 2


def test_a_cache_without_augmented_views_trains_on_the_eval_view_and_says_so(tmp_path, tiny_vit, example_images,
                                                                            monkeypatch):
    path = extract_features(read_dataset(example_images), tmp_path / "f.h5", tiny_vit, shots=4, seeds=[1],
                            views=0, batch_size=64, workers=0, progress=False)
    with FeatureCache(path) as cache:
        cached = cache.features("train", cache.rows("train", 4, 1)).float()
        with pytest.warns(UserWarning, match="no augmented views"):
            seen, result = _views_per_epoch(cache, tiny_vit, monkeypatch, epochs=2)
    assert all(torch.equal(block, cached[0]) for block in seen)
    assert result.augmentation["distinct_views_per_image"] == 0


def test_auto_views_cache_one_view_per_published_epoch(tmp_path, tiny_vit, example_images):
    from fastcoop.cache.plan import auto_views

    assert [auto_views([s], 100) for s in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert auto_views([1, 2, 4], 100) == 100 and auto_views(None, 100) == 50  # the longest schedule; 'all'
    assert auto_views([1, 16], 1000) == 50
    path = extract_features(read_dataset(example_images), tmp_path / "f.h5", tiny_vit, splits=["train"], shots=1,
                            seeds=[1], batch_size=64, workers=0, progress=False)  # views default: auto
    with FeatureCache(path) as cache:
        assert cache.num_views("train") == 1 + 50


@pytest.mark.parametrize("csc, position", [(False, "end"), (False, "middle"), (True, "front")])
def test_runs_trained_stacked_equal_runs_trained_alone(cache_path, tiny_vit, csc, position):
    """Seeds 1 and 2 in one stack (one text-encoder pass per step for both) against each alone: fp32, a short
    full schedule with warm-up and cosine decay."""
    from fastcoop.training import train_stack

    configs = [Recipe(shots=4, seed=seed, n_ctx=3, csc=csc, position=position, epochs=4, batch_size=16,
                           lr=0.05) for seed in (1, 2)]
    with FeatureCache(cache_path) as cache:
        stacked = train_stack(cache, tiny_vit, configs, progress=False)
        alone = [train(cache, tiny_vit, config, progress=False) for config in configs]
    for together, by_itself in zip(stacked, alone):
        theirs = by_itself.learner.ctx.detach()
        assert (together.learner.ctx.detach() - theirs).norm() <= 1e-5 * theirs.norm()
        assert [r["loss"] for r in together.history] == pytest.approx([r["loss"] for r in by_itself.history],
                                                                      rel=1e-5)
    assert not torch.equal(stacked[0].learner.ctx, stacked[1].learner.ctx)


def test_commands_on_cached_features_leave_the_image_tower_unread(tmp_path, capsys, tiny_vit, example_images,
                                                                  monkeypatch):
    """With weights from a checkpoint, train, eval, zeroshot and interpret fill only what is outside the image
    tower; cache and predict, which encode images, load it whole."""
    import fastcoop.models as models

    ckpt = tmp_path / "tiny.pt"
    torch.save(tiny_vit.model.state_dict(), ckpt)
    calls = []
    load_rest = models._load_all_but_image_tower
    monkeypatch.setattr(models, "_load_all_but_image_tower", lambda *args: calls.append(load_rest(*args)) or calls[-1])

    def command(*args) -> list:
        calls.clear()
        code, _, err = run_cli(capsys, *args)
        assert code == 0, err
        return list(calls)

    cache, run = tmp_path / "f.h5", tmp_path / "run"
    assert command("cache", example_images, "--out", cache, "--model", TINY_VIT, "--pretrained", ckpt, "--shots",
                   "2", "--seeds", "1", "--views", "1", "--workers", "0") == []
    assert command("train", cache, "--out", run, "--shots", "2", "--n-ctx", "2", "--epochs", "1") == [True]
    assert command("eval", run, cache) == [True]
    assert command("zeroshot", cache) == [True]
    assert command("interpret", run, "--top-k", "1") == [True]
    image = read_dataset(example_images).split("test")[0][0]
    assert command("predict", run, image, "--top-k", "1") == []


def test_profile_writes_a_trace_of_a_few_steps_and_trains_the_same(tmp_path, capsys, cache_path):
    """`train --profile`: a Chrome trace of the steps after the first epoch; the run itself is the same."""
    import json

    from safetensors.torch import load_file

    args = ["--shots", "4", "--n-ctx", "2", "--epochs", "3", "--device", "cpu"]
    assert run_cli(capsys, "train", cache_path, "--out", tmp_path / "plain", *args)[0] == 0
    code, _, err = run_cli(capsys, "train", cache_path, "--out", tmp_path / "profiled", *args,
                           "--profile", tmp_path / "trace.json")
    assert code == 0, err
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert any("aten::" in e.get("name", "") for e in events)
    assert torch.equal(load_file(tmp_path / "plain" / "prompt.safetensors")["ctx"],
                       load_file(tmp_path / "profiled" / "prompt.safetensors")["ctx"])


@pytest.fixture(scope="module")
def protocol_cache(tmp_path_factory, tiny_vit, example_images):
    """1-, 2- and 4-shot subsets of seeds 1 and 2: runs of different sizes and schedules."""
    out = tmp_path_factory.mktemp("protocol") / "f.h5"
    return extract_features(read_dataset(example_images), out, tiny_vit, splits=["train"], shots=[1, 2, 4],
                            seeds=[1, 2], views=2, batch_size=32, workers=0, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["coop", "cocoop", "kgcoop"])
def test_runs_of_different_schedules_stacked_equal_each_run_alone(protocol_cache, tiny_vit, method):
    """The protocol's shape in one stack: runs of 1, 2 and 4 shots (other batch sizes and steps per epoch) and two
    seeds, each with its own epochs; each leaves the stack when its schedule is over and ends, bit for bit on the
    CPU, where it would alone."""
    from fastcoop.training import train_stack

    recipe = dict(method=method, n_ctx=3, batch_size=5 if method == "coop" else 2, lr=0.05)
    configs = [Recipe(shots=4, seed=1, epochs=3, **recipe), Recipe(shots=1, seed=2, epochs=2, **recipe),
               Recipe(shots=2, seed=1, epochs=5, **recipe), Recipe(shots=4, seed=2, epochs=4, **recipe)]
    with FeatureCache(protocol_cache) as cache:
        stacked = train_stack(cache, tiny_vit, configs, progress=False)
        alone = [train(cache, tiny_vit, config, progress=False) for config in configs]
    assert len({r.history[0]["steps"] for r in stacked}) == 3  # the runs' epochs really differ in length
    for together, by_itself in zip(stacked, alone):
        for name, tensor in by_itself.learner.trainable().items():
            assert torch.equal(together.learner.trainable()[name], tensor), name
        assert [r["loss"] for r in together.history] == [r["loss"] for r in by_itself.history]
        assert [r["train_acc"] for r in together.history] == [r["train_acc"] for r in by_itself.history]
        assert together.checkpoint.epochs_done == together.recipe.epochs


@pytest.mark.slow
@pytest.mark.parametrize("method", ["coop", "kgcoop"])
def test_prompt_variants_stacked_equal_each_run_alone(protocol_cache, tiny_vit, method):
    """A sweep's variants in one stack: unified and class-specific contexts of two lengths, the class name at the
    end, the middle and the front, with different shot counts and schedules; every per-token op runs once over
    all their packed rows, the attention once per layout; each run ends, bit for bit on the CPU, where it would
    alone."""
    from fastcoop.training import train_stack

    recipe = dict(method=method, batch_size=5, lr=0.05)
    configs = [Recipe(shots=4, seed=1, epochs=2, n_ctx=3, **recipe),
               Recipe(shots=2, seed=2, epochs=3, n_ctx=3, csc=True, **recipe),
               Recipe(shots=4, seed=2, epochs=1, n_ctx=2, position="middle", **recipe),
               Recipe(shots=1, seed=1, epochs=3, n_ctx=3, position="front", **recipe),
               Recipe(shots=4, seed=2, epochs=2, n_ctx=3, **recipe)]  # a second run of the first layout
    with FeatureCache(protocol_cache) as cache:
        stacked = train_stack(cache, tiny_vit, configs, progress=False)
        alone = [train(cache, tiny_vit, config, progress=False) for config in configs]
    for together, by_itself in zip(stacked, alone):
        assert together.learner.layout == by_itself.learner.layout
        assert torch.equal(together.learner.ctx, by_itself.learner.ctx), together.recipe
        assert [r["loss"] for r in together.history] == [r["loss"] for r in by_itself.history]
        assert [r["train_acc"] for r in together.history] == [r["train_acc"] for r in by_itself.history]


def test_cocoop_runs_of_other_prompts_are_not_stacked(protocol_cache, tiny_vit):
    from fastcoop.training import train_stack

    configs = [Recipe(method="cocoop", shots=1, seed=1, epochs=1, n_ctx=n) for n in (2, 3)]
    with FeatureCache(protocol_cache) as cache, pytest.raises(ValueError, match="differ only in their seed"):
        train_stack(cache, tiny_vit, configs, progress=False)


@pytest.mark.slow
def test_a_stack_resumes_each_run_from_its_own_epoch(protocol_cache, tiny_vit, monkeypatch):
    """Runs of a stack saved at different epochs (an interrupted protocol) go on together, each from its own
    checkpoint, and end equal to the runs trained without a stop."""
    from fastcoop.training import train_stack

    monkeypatch.setattr("fastcoop.training.REPORT_SECONDS", 0.0)  # a checkpoint after every epoch
    configs = [Recipe(shots=shots, seed=1, n_ctx=3, epochs=4, batch_size=5, lr=0.05)
               for shots in (4, 1)]
    with FeatureCache(protocol_cache) as cache:
        checkpoints = [{}, {}]
        uninterrupted = train_stack(cache, tiny_vit, configs, progress=False, on_report=lambda results: [
            saved.setdefault(r.checkpoint.epochs_done, r.checkpoint) for saved, r in zip(checkpoints, results)
            if r.checkpoint])
        resumed = train_stack(cache, tiny_vit, configs, progress=False,
                              resumes=[checkpoints[0][1], checkpoints[1][3]])
    for run, (theirs, ours) in enumerate(zip(uninterrupted, resumed)):
        assert torch.equal(ours.learner.ctx, theirs.learner.ctx), run
        assert ours.history == [dict(r, seconds=ours.history[i]["seconds"]) for i, r in enumerate(theirs.history)]


@pytest.mark.parametrize("init, n_ctx, message", [
    ("a photo of a", 8, "--init 'a photo of a' is 4 token(s), which set M = 4; --n-ctx 8 contradicts it: give one "
                        "of them"),
    ("", None, "--init has no words"), ("  ", 4, "--init has no words")])
def test_context_words_that_contradict_m_or_say_nothing_are_refused(capsys, cache_path, tmp_path, init, n_ctx,
                                                                     message):
    """Given words set M; a different --n-ctx beside them, or words that are none, is a mistake to name, not a
    silent choice of one (M = 4) or the other (a random context of 16). The same words with their own M train."""
    common = ["train", cache_path, "--shots", "4", "--epochs", "1", "--device", "cpu"]
    code, _, err = run_cli(capsys, *common, "--out", tmp_path / "r", "--init", init,
                           *(["--n-ctx", str(n_ctx)] if n_ctx else []))
    assert code == 2 and err.strip() == f"error: {message}"
    assert not (tmp_path / "r" / "config.json").exists()
    code, _, err = run_cli(capsys, *common, "--out", tmp_path / "ok", "--init", "a photo of a", "--n-ctx", "4")
    assert code == 0, err


def test_a_run_records_the_cpu_threads_it_used_and_threads_overrides(tmp_path, capsys, monkeypatch, cache_path):
    import json

    import torch

    monkeypatch.setattr("fastcoop.machine.others_running", lambda: 5)  # a busy machine: one thread
    before = torch.get_num_threads()
    try:
        code, out, err = run_cli(capsys, "train", cache_path, "--out", tmp_path / "busy", "--shots", "4", "--n-ctx",
                                 "2", "--epochs", "1", "--device", "cpu", "--verbose")
        assert code == 0, err
        assert "CPU threads: 1 (" in out and "5 other thread(s)" in out
        assert json.loads((tmp_path / "busy" / "config.json").read_text())["runtime"]["threads"] == 1
        code, _, err = run_cli(capsys, "train", cache_path, "--out", tmp_path / "asked", "--shots", "4", "--n-ctx",
                               "2", "--epochs", "1", "--device", "cpu", "--threads", "3")
        assert code == 0, err
        assert json.loads((tmp_path / "asked" / "config.json").read_text())["runtime"]["threads"] == 3
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
