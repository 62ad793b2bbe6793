"""CoOp's dataset folders read as CoOp's own dataset classes read them: miniatures of each layout without a split
file (ImageNet, its four variants, FGVCAircraft) and of those with one, compared with the published rules written
out in coop_layouts; incomplete folders refused; `fastcoop datasets`."""

import os
import random
import shutil
import subprocess
import sys

import pytest

import coop_layouts as coop
from conftest import run_cli
from fastcoop.datasets import DATASETS, read_dataset
from fastcoop.errors import FastCoopError
from fastcoop.fewshot import sample_train_and_val


def _as_read(data) -> dict:
    """fastcoop's reading in the published code's terms: split → [(real path, label, class name)]."""
    return {split: [(os.path.realpath(p), label, data.classnames[label]) for p, label in items]
            for split, items in data.splits.items()}


def _published(splits: dict) -> dict:
    return {split: [(os.path.realpath(p), label, name.replace("_", " ")) for p, label, name in items]
            for split, items in splits.items()}


def _same_few_shot(data, published: dict, shots: int, seed: int) -> None:
    """fastcoop's few-shot train (and val) rows select the images the published code's sampler selects."""
    labels = {split: [label for _, label in data.splits[split]] for split in ("train", "val") if split in data.splits}
    train, val = sample_train_and_val(labels["train"], labels.get("val", []), shots, seed)
    expected = coop.coop_few_shot(published, shots, seed)
    assert [os.path.realpath(data.splits["train"][i][0]) for i in train] == [p for p, _, _ in expected["train"]]
    if "val" in expected:
        assert [os.path.realpath(data.splits["val"][i][0]) for i in val] == [p for p, _, _ in expected["val"]]


def test_imagenet_as_coop_reads_it(tmp_path):
    rng = random.Random(0)
    folder = coop.make_imagenet(tmp_path, {"train": 7, "val": 3}, rng)
    data = read_dataset(folder)
    published = _published(coop.coop_imagenet(folder))
    assert data.dataset == "imagenet" and data.class_ids == sorted(coop.IMAGENET)
    assert data.classnames == coop.lab2cname(published["train"])
    assert data.classnames[:2] == ["tench", "goldfish"] and data.classnames.count("missile") == 2
    read = _as_read(data)
    assert read["train"] == published["train"] and read["test"] == published["test"]
    assert read["val"] == read["test"]  # the published ImageNet uses its test set as val
    for shots, seed in ((1, 1), (4, 2), (16, 3)):
        _same_few_shot(data, {"train": published["train"]}, shots, seed)


def test_fgvc_aircraft_as_coop_reads_it(tmp_path):
    folder = coop.make_fgvc_aircraft(tmp_path, random.Random(1))
    data = read_dataset(folder)
    published = _published(coop.coop_fgvc_aircraft(folder))
    assert data.dataset == "fgvc_aircraft" and data.class_ids is None
    assert data.classnames == coop.PRESETS["fgvc_aircraft"][:6] == coop.lab2cname(published["train"])
    assert _as_read(data) == published  # lines in the split files' order, labels by variants.txt
    for shots, seed in ((1, 1), (2, 2), (4, 3), (8, 1)):
        _same_few_shot(data, published, shots, seed)


@pytest.mark.parametrize("which", ["v2", "sketch", "a", "r"])
def test_imagenet_variants_as_coop_reads_them(tmp_path, which):
    folder = coop.make_imagenet_variant(tmp_path, which, random.Random(2))
    data = read_dataset(folder)
    if which == "v2":
        published = coop.coop_imagenetv2(folder)
    else:
        published = coop.coop_wnid_folders(folder, {"sketch": "images", "a": "imagenet-a", "r": "imagenet-r"}[which])
    published = _published(published)
    assert data.dataset == {"v2": "imagenetv2", "sketch": "imagenet_sketch", "a": "imagenet_a",
                            "r": "imagenet_r"}[which]
    assert list(data.splits) == ["test"] and _as_read(data) == published
    assert data.classnames == coop.lab2cname(published["test"])
    expected_ids = coop.VARIANT_SUBSET if which in ("a", "r") else list(coop.IMAGENET)
    assert data.class_ids == expected_ids and len(data.classnames) == len(expected_ids)


@pytest.mark.parametrize("name", ["caltech101", "eurosat", "stanford_cars", "oxford_pets"])
def test_split_file_datasets_read_their_own_image_folder(tmp_path, name):
    spec = DATASETS[name]
    names = coop.PRESETS[name][:4]
    folder = coop.make_split_dataset(tmp_path, spec.folder, spec.split_file, spec.image_dir, names,
                                     random.Random(3))
    published = _published(coop.coop_split(folder, spec.split_file, spec.image_dir))
    data = read_dataset(folder)
    assert data.dataset == name and _as_read(data) == published
    assert data.classnames == coop.lab2cname(published["train"])
    for shots, seed in ((1, 1), (2, 3), (4, 2)):
        _same_few_shot(data, published, shots, seed)
    assert read_dataset(folder / spec.split_file).dataset == name  # the split file alone


def test_recognised_by_files_by_name_and_from_data(tmp_path):
    rng = random.Random(4)
    coop.make_imagenet(tmp_path / "data", {"train": 2, "val": 1}, rng)
    coop.make_imagenet_variant(tmp_path / "data", "a", rng)
    coop.make_fgvc_aircraft(tmp_path / "data", rng)
    for folder, name in (("imagenet", "imagenet"), ("imagenet-adversarial", "imagenet_a"),
                         ("fgvc_aircraft", "fgvc_aircraft")):
        renamed = tmp_path / f"my-{folder}"
        shutil.copytree(tmp_path / "data" / folder, renamed)
        assert read_dataset(renamed).dataset == name  # by the files inside
        assert read_dataset(tmp_path / "data", dataset=name).dataset == name  # $DATA and --dataset
        assert read_dataset(renamed, dataset=name).splits == read_dataset(renamed).splits
    with pytest.raises(FastCoopError, match="holds CoOp's dataset folders .*give one, e.g."):
        read_dataset(tmp_path / "data")


def _broken(tmp_path, case):
    """A CoOp folder with one thing missing or wrong; (what to read, the message expected)."""
    rng = random.Random(5)
    data = tmp_path / "data"
    if case.startswith("imagenet"):
        folder = coop.make_imagenet(data, {"train": 2, "val": 1}, rng)
        if case == "imagenet_no_classnames":
            (folder / "classnames.txt").unlink()
            return folder, "has no classnames.txt"
        if case == "imagenet_wnid_not_named":
            lines = (folder / "classnames.txt").read_text().splitlines()
            (folder / "classnames.txt").write_text("\n".join(l for l in lines if not l.startswith("n01514859")))
            return folder, "class folder .*n01514859 is not in classnames.txt"
        if case == "imagenet_val_lacks_a_class":
            shutil.rmtree(folder / "images" / "val" / "n01443537")
            return folder, "hold different class folders \\(n01443537 is in only one\\)"
        if case == "imagenet_images_folder":  # its wnid folders, read as classes, would be named by wnid
            return folder / "images" / "train", "WordNet IDs"
        if case == "imagenet_no_val":
            shutil.rmtree(folder / "images" / "val")
            return folder, "has no folder images/val"
    if case.startswith("fgvc"):
        folder = coop.make_fgvc_aircraft(data, rng)
        if case == "fgvc_missing_images":
            for line in (folder / "images_variant_test.txt").read_text().splitlines()[:5]:
                (folder / "images" / (line.split(" ")[0] + ".jpg")).unlink()
            return folder, "images_variant_test.txt lists 5 images that do not exist: .*jpg, .*, \\.\\.\\."
        if case == "fgvc_no_variants":
            (folder / "variants.txt").unlink()
            return folder, "has no variants.txt"
        if case == "fgvc_unknown_variant":
            with open(folder / "images_variant_val.txt", "a") as f:
                f.write("1234567 Boeing 9000\n")
            return folder, "names variant 'Boeing 9000', which is not in"
        if case == "fgvc_as_a_flat_folder":  # what reading it as a folder of classes would do
            return folder, "a single class folder, 'images', holding every image.*is CoOp's fgvc_aircraft folder: leave"
        if case == "fgvc_images_folder":
            return folder / "images", "has no class folders .*is CoOp's fgvc_aircraft folder: point at"
    if case.startswith("variant"):
        which = case.split("_")[1]
        folder = coop.make_imagenet_variant(data, which, rng)
        if which == "v2":
            shutil.rmtree(folder / "imagenetv2-matched-frequency-format-val" / "3")
            return folder, "has no class folder 3"
        (folder / "classnames.txt").unlink()
        return folder, "has no classnames.txt"
    spec = DATASETS["dtd"]
    folder = coop.make_split_dataset(data, spec.folder, spec.split_file, spec.image_dir,
                                     coop.PRESETS["dtd"][:3], rng)
    (folder / spec.split_file).unlink()
    return folder, "has no split_zhou_DescribableTextures.json"


BROKEN = ["imagenet_no_classnames", "imagenet_wnid_not_named", "imagenet_val_lacks_a_class",
          "imagenet_images_folder", "imagenet_no_val", "fgvc_missing_images", "fgvc_no_variants",
          "fgvc_unknown_variant", "fgvc_as_a_flat_folder", "fgvc_images_folder", "variant_v2", "variant_a",
          "variant_sketch", "dtd_no_split_file"]


@pytest.mark.parametrize("case", BROKEN)
def test_incomplete_layouts_are_refused_before_any_work(tmp_path, capsys, case):
    root, message = _broken(tmp_path, case)
    layout = ["--layout", "imagefolder"] if case == "fgvc_as_a_flat_folder" else []
    code, out, err = run_cli(capsys, "cache", root, "--out", tmp_path / "c.h5", "--model", "no-such-model",
                             *layout)
    assert code == 2 and err.count("\n") == 1, err  # one line, before the (unknown) model is looked at
    import re

    assert re.search(message, err), err
    assert not list(tmp_path.glob("c.*"))  # nothing written


def test_fastcoop_datasets_lists_what_data_holds(tmp_path):
    rng = random.Random(6)
    data = tmp_path / "data"
    coop.make_imagenet(data, {"train": 3, "val": 2}, rng)
    coop.make_imagenet_variant(data, "r", rng)
    coop.make_fgvc_aircraft(data, rng)
    (data / "fgvc_aircraft" / "variants.txt").unlink()
    spec = DATASETS["eurosat"]
    coop.make_split_dataset(data, spec.folder, spec.split_file, spec.image_dir, coop.PRESETS["eurosat"][:3], rng)
    shutil.copytree(data / "imagenetv2" if (data / "imagenetv2").exists() else data / "imagenet-rendition",
                    data / "my-rendition-copy")  # found under its own name already: not counted twice
    bad = next((data / "eurosat" / "2750").rglob("*.jpg"))
    bad.write_bytes(b"")
    script = ("import sys; from fastcoop.cli import main\n"
              "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
              "    assert 'torch' not in sys.modules, 'torch imported'\n    raise\n")
    done = subprocess.run([sys.executable, "-c", script, "datasets", str(data), "--check-images"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "4 of CoOp's 15 datasets found" in out
    assert "| imagenet | imagenet | 12 | 36 | = test | 24 | 0 | ok |" in out
    assert "| imagenet_r | imagenet-rendition | 4 | – | – | 8 | 0 | ok |" in out
    assert "| eurosat | eurosat | 3 | 15 | 6 | 6 | 1 | 1 unreadable, e.g. 2750/" in out
    assert "| fgvc_aircraft | fgvc_aircraft | – | – | – | – | – | cannot be read (1) |" in out
    assert "(1) fgvc_aircraft: " in out and "has no variants.txt" in out
    assert "| imagenetv2 | – | – | – | – | – | – | missing |" in out
    assert f"fastcoop cache {data / 'imagenet'} --out imagenet.h5 --shots 1,2,4,8,16 --splits train,test" in out
    assert f"fastcoop cache {data / 'eurosat'} --out eurosat.h5 --shots 1,2,4,8,16 --splits train,val,test" in out
    assert f"fastcoop cache {data / 'imagenet-rendition'} --out imagenet_r.h5\n" in out + "\n"


@pytest.fixture(scope="module")
def imagenet_caches(tmp_path_factory, example_images):
    """A miniature ImageNet (the example's pictures under 12 real ImageNet classes) and its four variants, cached
    with the tiny model: ImageNet for 2 shots, seeds 1 and 2; the variants' test sets."""
    from conftest import TINY_VIT

    root = tmp_path_factory.mktemp("domain-shift")
    rng = random.Random(7)
    sources = [sorted((example_images / "train" / c).iterdir()) for c in sorted(os.listdir(example_images / "train"))]
    data = root / "data"
    coop.make_imagenet(data, {"train": 4, "val": 2}, rng, sources)
    for which in ("v2", "sketch", "a", "r"):
        coop.make_imagenet_variant(data, which, rng, sources=sources)
    from fastcoop.cli import main

    caches = {}
    for folder, name in (("imagenet", "imagenet"), ("imagenetv2", "imagenetv2"), ("imagenet-sketch", "sketch"),
                         ("imagenet-adversarial", "a"), ("imagenet-rendition", "r")):
        caches[name] = root / f"{name}.h5"
        with pytest.raises(SystemExit) as done:
            main(["cache", str(data / folder), "--out", str(caches[name]), "--model", TINY_VIT, "--pretrained",
                  "none", "--shots", "2", "--seeds", "1,2", "--views", "1", "--workers", "0"])
        assert done.value.code == 0
    return caches


@pytest.mark.slow
def test_a_run_on_imagenet_is_tested_on_its_variants_and_reported(tmp_path, capsys, imagenet_caches):
    import json

    import torch

    from fastcoop.cache import FeatureCache
    from fastcoop.run import load_run

    with FeatureCache(imagenet_caches["a"]) as cache:
        assert cache.dataset == "imagenet_a" and cache.splits == ["test"]
        assert cache.class_ids == coop.VARIANT_SUBSET and cache.classnames[-1] == "missile"
    for context in ("unified", "csc"):
        for seed in (1, 2):
            run_dir = tmp_path / f"{context}-{seed}"
            code, _, err = run_cli(capsys, "train", imagenet_caches["imagenet"], "--out", run_dir, "--shots", "2",
                                   "--seed", str(seed), "--n-ctx", "2", "--epochs", "1", "--device", "cpu",
                                   *(["--csc"] if context == "csc" else []))
            assert code == 0, err
            for target in ("imagenetv2", "sketch", "a", "r"):
                code, out, err = run_cli(capsys, "eval", run_dir, imagenet_caches[target])
                assert code == 0, err
        run = load_run(tmp_path / f"{context}-1")
        assert run.config["class_ids"] == sorted(coop.IMAGENET)
        from fastcoop.evaluate import run_on_classes

        with FeatureCache(imagenet_caches["a"]) as cache:
            on_a, _ = run_on_classes(run, cache, None)
        rows = [sorted(coop.IMAGENET).index(w) for w in coop.VARIANT_SUBSET]  # by wnid: the right 'missile'
        assert torch.equal(on_a.learner.ctx, run.learner.ctx[rows] if context == "csc" else run.learner.ctx)
    code, out, err = run_cli(capsys, "report", *(tmp_path / f"{c}-{s}" for c in ("unified", "csc") for s in (1, 2)))
    assert code == 0, err
    assert "Domain generalisation" in out and "Cross-dataset" not in out
    assert "| source | ImageNetV2 | ImageNet-Sketch | ImageNet-A | ImageNet-R | average |" in out
    evaluations = [json.loads((tmp_path / f"unified-{s}" / "evaluations.json").read_text()) for s in (1, 2)]
    results = [json.loads((tmp_path / f"unified-{s}" / "results.json").read_text()) for s in (1, 2)]
    targets = [sum(e[f"{t}.h5 test all"]["top1"] for e in evaluations) / 2 for t in ("imagenetv2", "sketch", "a", "r")]
    source = sum(r["test"]["top1"] for r in results) / 2
    std = lambda a, b: abs(a - b) / 2 ** 0.5  # noqa: E731  the sample std of two
    expected = (f"| imagenet.h5 | tiny-vit | coop | M2 unified | all | 2 | 1,2 | {100 * source:.2f} ± "
                f"{100 * std(*[r['test']['top1'] for r in results]):.2f} | "
                + " | ".join(f"{100 * t:.2f}" for t in targets) + f" | {100 * sum(targets) / 4:.2f} |")
    assert expected in out
    shutil.copytree(tmp_path / "unified-1", tmp_path / "copy-of-unified-1")  # one seed given twice is one sample
    with pytest.warns(UserWarning) as warned:
        code, again, err = run_cli(capsys, "report", *(tmp_path / f"unified-{s}" for s in (1, 2)),
                                   tmp_path / "copy-of-unified-1", tmp_path / "unified-1")
    assert code == 0 and expected in again, err
    assert [str(w.message) for w in warned] == [f"{tmp_path / 'copy-of-unified-1'} repeats {tmp_path / 'unified-1'} "
                                                "(same recipe, cache and seed 1): counted once"]
    del evaluations[1]["sketch.h5 test all"]  # seed 2 not tested on ImageNet-Sketch: that cell is seed 1's alone
    (tmp_path / "unified-2" / "evaluations.json").write_text(json.dumps(evaluations[1]))
    code, out, err = run_cli(capsys, "report", *(tmp_path / f"unified-{s}" for s in (1, 2)))
    sketch = evaluations[0]["sketch.h5 test all"]["top1"]
    assert code == 0 and f" | {100 * sketch:.2f} (seed 1) | " in out and " (partial) |" in out, out


def test_a_sweep_tests_every_run_on_the_caches_it_is_given(tmp_path, capsys, imagenet_caches):
    import json

    targets = ",".join(str(imagenet_caches[t]) for t in ("a", "r"))
    args = ["sweep", imagenet_caches["imagenet"], "--out", tmp_path / "s", "--shots", "2", "--seeds", "1,2",
            "--n-ctx", "2", "--epochs", "1", "--device", "cpu", "--eval-on", targets]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    for run in summary["runs"]:
        evaluations = json.loads((tmp_path / "s" / "coop-M2-unified-end" / f"2shot-seed{run['seed']}" /
                                  "evaluations.json").read_text())
        assert run["transfer"] == {"imagenet_a": evaluations["a.h5 test all"]["top1"],
                                   "imagenet_r": evaluations["r.h5 test all"]["top1"]}
    assert "| dataset | method | shots | source | ImageNet-A | ImageNet-R | average |" in out
    assert "| s | CoOp M2-unified-end | 2 |" in (tmp_path / "s" / "summary.md").read_text()
    code, _, err = run_cli(capsys, "sweep", imagenet_caches["imagenet"], "--out", tmp_path / "t", "--shots", "2",
                           "--eval-on", tmp_path / "none.h5")
    assert code == 2 and "does not exist" in err and not (tmp_path / "t").exists()
