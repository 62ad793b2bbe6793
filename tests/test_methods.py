"""Methods as plug-ins: the registry, a method from a file (examples/own_method.py) run like the built-in ones, the
Python API, and the built-in methods' runs equal, bit for bit on the CPU, to those of the code before the move."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_VIT, run_cli
from fastcoop import methods
from fastcoop.cache import FeatureCache, extract_features
from fastcoop.config import Recipe
from fastcoop.datasets import read_dataset
from fastcoop.errors import FastCoopError
from fastcoop.example import make_example_images
from fastcoop.models import load_model
from fastcoop.training import train_stack

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "own_method.py"
BEFORE = Path(__file__).parent / "data" / "methods_before_plugins.safetensors"


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory, tiny_vit, example_images):
    out = tmp_path_factory.mktemp("methods") / "f.h5"
    return extract_features(read_dataset(example_images), out, tiny_vit, shots=[2, 4], seeds=[1, 2], views=2,
                            batch_size=32, workers=0, progress=False)


def test_built_in_runs_equal_the_runs_before_methods_were_plug_ins(tmp_path):
    """Learned tensors and per-epoch losses saved by the code before fastcoop.methods existed (the same cache and
    recipes, one CPU thread): CoOp unified and class-specific (stacked), KgCoOp, CoCoOp."""
    torch.set_num_threads(1)  # the saved numbers' thread count (conftest restores the test's)
    loaded = load_model(TINY_VIT, "none")
    images = make_example_images(tmp_path / "ex", train_per_class=6, test_per_class=3, size=48)
    path = extract_features(read_dataset(images), tmp_path / "f.h5", loaded, shots=[2, 4], seeds=[1, 2], views=2,
                            batch_size=32, workers=0, progress=False)
    cases = {
        "coop": [Recipe(shots=4, seed=1, epochs=3, n_ctx=3, batch_size=5, lr=0.05),
                 Recipe(shots=2, seed=2, epochs=2, n_ctx=2, csc=True, position="middle", batch_size=5, lr=0.05)],
        "kgcoop": [Recipe(method="kgcoop", shots=4, seed=2, epochs=2, batch_size=8, lr=0.05)],
        "cocoop": [Recipe(method="cocoop", shots=2, seed=1, epochs=2, lr=0.01)]}
    before = load_file(BEFORE)
    with FeatureCache(path) as cache, pytest.warns(UserWarning, match="augmented views"):
        for name, recipes in cases.items():
            for i, result in enumerate(train_stack(cache, loaded, recipes, progress=False)):
                for key, tensor in result.learner.trainable().items():
                    assert torch.equal(tensor.detach().float(), before[f"{name}.{i}.{key}"]), (name, i, key)
                losses = torch.tensor([h["loss"] for h in result.history], dtype=torch.float64)
                assert torch.equal(losses, before[f"{name}.{i}.loss"]), (name, i)


def test_the_registry_names_methods_and_refuses_what_is_no_method(tmp_path):
    assert methods.names()[:3] == ["coop", "cocoop", "kgcoop"]
    assert [methods.get(name).title for name in ("coop", "cocoop", "kgcoop")] == ["CoOp", "CoCoOp", "KgCoOp"]
    with pytest.raises(FastCoopError, match="no method 'coopp'; the registered ones are coop, cocoop, kgcoop, "):
        methods.check_spec("coopp")
    with pytest.raises(FastCoopError, match="no file"):
        methods.check_spec(str(tmp_path / "mine.py") + ":Mine")
    (tmp_path / "mine.py").write_text("from fastcoop.methods.coop import CoOp\n\n"
                                      "class NoLoss:\n    pass\n\n"
                                      "class Half(CoOp):\n    name, title = '', 'Half'\n\n"
                                      "from fastcoop.methods import Method\n\n"
                                      "class Empty(Method):\n    name, title = 'empty', 'Empty'\n\n"
                                      "    def learner(self, model, tokenizer, classnames, recipe):\n"
                                      "        return None\n")
    for cls, message in (("Missing", "defines no class Missing"),
                         ("NoLoss", "not a fastcoop.methods.Method subclass"),
                         ("Half", "Half does not define name"),
                         ("Empty", "Empty does not define loss, classifier")):
        with pytest.raises(FastCoopError, match=message):
            methods.get(f"{tmp_path / 'mine.py'}:{cls}")
    (tmp_path / "broken.py").write_text("import no_such_module\n")
    with pytest.raises(FastCoopError, match="importing .*broken.py failed: ModuleNotFoundError"):
        methods.get(f"{tmp_path / 'broken.py'}:Broken")


def test_fastcoop_methods_lists_the_registry_and_a_methods_declarations(capsys):
    code, out, _ = run_cli(capsys, "methods")
    assert code == 0 and out.strip() == methods.method_table()
    code, out, _ = run_cli(capsys, "methods", "kgcoop")
    assert code == 0 and "-o kg_weight=VALUE  λ, the weight of the distance to the hand-written prompt (published: " \
        "8.0)" in out and "batch_size 128, epochs 100" in out
    code, out, _ = run_cli(capsys, "methods", "cocoop")
    assert code == 0 and "fixed: csc False, position 'end'" in out


def test_bad_method_arguments_are_one_line_before_torch_loads(tmp_path, capsys, cache_path):
    import subprocess
    import sys

    code = ("import sys; from fastcoop.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('torch' in sys.modules, file=sys.stderr); raise\n")
    done = subprocess.run([sys.executable, "-c", code, "train", str(cache_path), "--out", str(tmp_path / "r"),
                           "--method", "coopp"], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"error: --method: no method 'coopp'; the registered ones are "
                                        f"{', '.join(methods.BUILT_IN)}, or give your own as FILE.py:ClassName",
                                        "False"]
    for args, message in ((["--method", "cocoop", "-o", "kg_weight=2"], "-o kg_weight is not an option of CoCoOp"),
                          (["--method", "kgcoop", "-o", "kg_weight=-1"], "KgCoOp's kg_weight must be at least 0"),
                          (["--method", "kgcoop", "-o", "kg_weight=much"], "KgCoOp's kg_weight takes a float"),
                          (["--method", "kgcoop", "-o", "kg_weight"], "-o takes NAME=VALUE, not 'kg_weight'"),
                          (["--method", f"{EXAMPLE}:Nothing"], "defines no class Nothing")):
        code, _, err = run_cli(capsys, "train", cache_path, "--out", tmp_path / "run", "--shots", "4", *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_example_method_trains_stacks_resumes_sweeps_and_reports(tmp_path, capsys, cache_path, monkeypatch):
    """examples/own_method.py through every command, with no change outside its file: `train` (then eval and
    predict read it), a sweep beside CoOp whose runs stack and are resumed after an interrupt, equal to its runs
    trained alone, and `report`."""
    from conftest import ctrl_c_after_epoch

    spec = f"{EXAMPLE}:LearnedTemperature"
    args = ["--shots", "2", "--epochs", "3", "--device", "cpu"]
    code, out, err = run_cli(capsys, "train", cache_path, "--out", tmp_path / "alone", "--method", spec, *args,
                             "--seed", "2", "-o", "temperature_init=0.02")
    assert code == 0, err
    config = json.loads((tmp_path / "alone" / "config.json").read_text())
    assert config["method"] == "CoOp + learned temperature" and config["train"]["temperature_init"] == 0.02
    learned = load_file(tmp_path / "alone" / "prompt.safetensors")
    assert set(learned) == {"ctx", "log_scale"} and learned["log_scale"].item() != pytest.approx(torch.log(
        torch.tensor(1 / 0.02)).item(), abs=1e-6)  # the temperature learned
    code, out, err = run_cli(capsys, "eval", tmp_path / "alone", cache_path)
    assert code == 0 and "top-1" in out, err

    sweep = ["sweep", cache_path, "--out", tmp_path / "sweep", "--method", f"{spec},coop", "--n-ctx", "2",
             "--shots", "2,4", "--seeds", "2", "--epochs", "3", "-o", "temperature_init=0.02", "--device", "cpu",
             "--baselines", "none"]
    with monkeypatch.context() as patched:
        ctrl_c_after_epoch(patched, 2)
        code, _, err = run_cli(capsys, *sweep)
    assert code == 130 and "interrupted" in err
    code, out, err = run_cli(capsys, *sweep)
    assert code == 0, err
    assert "CoOp + learned temperature M2-unified-end: 2 runs stacked" in out
    assert "| CoOp + learned temperature M2-unified-end |" in out and "| CoOp M2-unified-end |" in out
    run = tmp_path / "sweep" / "coop-temperature-M2-unified-end" / "2shot-seed2"
    code, _, err = run_cli(capsys, "train", cache_path, "--out", tmp_path / "m2", "--method", spec, "--n-ctx", "2",
                           *args, "--seed", "2", "-o", "temperature_init=0.02")
    assert code == 0, err
    ours, alone = load_file(run / "prompt.safetensors"), load_file(tmp_path / "m2" / "prompt.safetensors")
    assert ours.keys() == alone.keys() and all(torch.equal(ours[k], alone[k]) for k in alone)
    assert json.loads((run / "results.json").read_text())["resumed_at_epoch"] in (1, 2)  # the look before the stop
    code, out, err = run_cli(capsys, "report", tmp_path / "sweep")
    assert code == 0 and "| CoOp + learned temperature M2-unified-end |" in out, err


def test_the_python_api_trains_evaluates_and_saves_a_run(tmp_path, cache_path, tiny_vit, capsys):
    import fastcoop

    with fastcoop.open_cache(cache_path) as cache:
        run = fastcoop.train(cache, method="kgcoop", shots=4, seed=1, epochs=2, loaded=tiny_vit,
                             options=(("kg_weight", 2.0),))
        scores = run.evaluate(cache)
        new = fastcoop.train(cache, shots=4, classes="base", epochs=1, loaded=tiny_vit).evaluate(classes="new")
        run.save(tmp_path / "run")
        with pytest.raises(FastCoopError, match="holds a run already"):
            run.save(tmp_path / "run")
    assert len(run.history) == 2 and run.recipe.option("kg_weight") == 2.0 and new["images"] > 0
    code, out, err = run_cli(capsys, "eval", tmp_path / "run", cache_path)
    assert code == 0 and f"top-1 {scores['top1']:.2%}" in out, err
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test"] == scores


def test_the_readme_method_table_is_the_registrys():
    from fastcoop.methods import method_table

    assert method_table() in (ROOT / "README.md").read_text()


def test_an_installed_package_registers_a_method_by_entry_point(tmp_path, monkeypatch):
    """A distribution on the path whose entry point in the group fastcoop.methods names a class: its name is
    registered beside the built-in ones and loads as they do."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "__init__.py").write_text(EXAMPLE.read_text())
    info = tmp_path / "mine-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mine\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fastcoop.methods]\ncoop-temperature = mine:LearnedTemperature\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert methods.names() == [*methods.BUILT_IN, "coop-temperature"]
    assert methods.check_spec("coop-temperature") == "coop-temperature"
    assert methods.get("coop-temperature").title == "CoOp + learned temperature"
