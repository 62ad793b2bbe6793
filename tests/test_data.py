import json

import pytest
from PIL import Image

from conftest import TINY_VIT, run_cli
from fastcoop.cache import FeatureCache
from fastcoop.datasets import read_dataset
from fastcoop.errors import FastCoopError


def _jpg(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    return path


def test_imagefolder_flat_and_split(tmp_path):
    for name in ("golden_retriever/a.jpg", "golden_retriever/b.jpg", "cat/c.jpg"):
        _jpg(tmp_path / "flat" / name)
    data = read_dataset(tmp_path / "flat")
    assert data.layout == "flat" and data.classnames == ["cat", "golden retriever"]  # train only, until split
    assert [label for _, label in data.split("train")] == [0, 1, 1]
    for name in ("train/cat/a.jpg", "train/dog/b.jpg", "test/dog/c.jpg"):
        _jpg(tmp_path / "split" / name)
    data = read_dataset(tmp_path / "split")
    assert set(data.splits) == {"train", "test"} and data.split("test")[0][1] == 1
    assert data.layout == "imagefolder"


def test_coop_split_finds_image_root(tmp_path):
    _jpg(tmp_path / "images" / "x" / "a.jpg")
    _jpg(tmp_path / "images" / "y" / "b.jpg")
    split = {"train": [["x/a.jpg", 0, "sea_lion"], ["y/b.jpg", 1, "dog"]], "val": [], "test": [["y/b.jpg", 1, "dog"]]}
    (tmp_path / "split_zhou_Toy.json").write_text(json.dumps(split))
    data = read_dataset(tmp_path)
    assert data.layout == "coop" and data.classnames == ["sea lion", "dog"]
    assert data.split("train")[0][0].endswith("images/x/a.jpg") and set(data.splits) == {"train", "test"}


def test_csv_names_and_integer_labels(tmp_path):
    _jpg(tmp_path / "a.jpg")
    _jpg(tmp_path / "b.jpg")
    (tmp_path / "d.csv").write_text("path,label,split\na.jpg,cat,train\nb.jpg,dog,test\n")
    data = read_dataset(tmp_path / "d.csv")
    assert data.classnames == ["cat", "dog"] and data.split("test")[0][1] == 1
    (tmp_path / "i.csv").write_text("path,label\na.jpg,1\nb.jpg,0\n")
    (tmp_path / "names.txt").write_text("zebra\nhorse\n")
    data = read_dataset(tmp_path / "i.csv", classnames_file=tmp_path / "names.txt")
    assert data.classnames == ["zebra", "horse"] and [l for _, l in data.split("train")] == [1, 0]


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty_class", "has no images"),
    ("no_classes", "no class folders"),
    ("coop_label_gap", "without gaps"),
    ("coop_missing_file", "does not exist"),
    ("csv_out_of_range", "out of range"),
    ("csv_int_without_names", "class names file"),
    ("csv_missing_file", "does not exist"),
])
def test_broken_layouts_give_clear_errors(tmp_path, case, message):
    _jpg(tmp_path / "a.jpg")
    if case == "missing":
        root = tmp_path / "nope"
    elif case == "empty_class":
        _jpg(tmp_path / "f" / "cat" / "a.jpg")
        (tmp_path / "f" / "dog").mkdir()
        root = tmp_path / "f"
    elif case == "no_classes":
        root = tmp_path / "e"
        root.mkdir()
    elif case.startswith("coop"):
        rel = "a.jpg" if case == "coop_label_gap" else "gone.jpg"
        labels = [0, 2] if case == "coop_label_gap" else [0, 1]
        root = tmp_path / "split_zhou_X.json"
        root.write_text(json.dumps({"train": [["a.jpg", labels[0], "a"], [rel, labels[1], "b"]]}))
    else:
        root = tmp_path / "x.csv"
        rows = {"csv_out_of_range": "a.jpg,5", "csv_int_without_names": "a.jpg,0", "csv_missing_file": "gone.jpg,0"}
        root.write_text(f"path,label\n{rows[case]}\n")
        (tmp_path / "names.txt").write_text("one\ntwo\n")
    names = tmp_path / "names.txt" if case in ("csv_out_of_range", "csv_missing_file") else None
    with pytest.raises(FastCoopError, match=message):
        read_dataset(root, classnames_file=names)


def test_a_flat_folder_is_split_as_the_published_code_splits_it(tmp_path, capsys, example_images):
    """Dassl's read_and_split_data, written out as the published code runs it: the global random seeded, classes
    in sorted order, each class's images shuffled, round(50 %) train, round(20 %) val, the rest test."""
    import json
    import random
    import shutil

    flat = tmp_path / "flat"
    for class_dir in (example_images / "train").iterdir():
        shutil.copytree(class_dir, flat / class_dir.name)  # 6 images per class, no split folders
    code, out, err = run_cli(capsys, "cache", flat, "--out", tmp_path / "f.h5", "--model", TINY_VIT,
                             "--pretrained", "none", "--shots", "all", "--views", "0", "--workers", "0")
    assert code == 0, err
    assert "split each class 50% / 20% / 30% into train / val / test" in out
    split = json.loads((tmp_path / "f.split.json").read_text())
    random.seed(1)
    expected = {"train": [], "val": [], "test": []}
    for label, name in enumerate(sorted(p.name for p in flat.iterdir())):
        images = sorted(f"{name}/{p.name}" for p in (flat / name).iterdir())
        random.shuffle(images)
        n_train, n_val = round(len(images) * 0.5), round(len(images) * 0.2)
        for part, chosen in (("train", images[:n_train]), ("val", images[n_train:n_train + n_val]),
                             ("test", images[n_train + n_val:])):
            expected[part] += [[path, label, name.replace("_", " ")] for path in chosen]
    assert split == expected
    with FeatureCache(tmp_path / "f.h5") as cache:
        assert cache.splits == ["train", "test"]
        assert [len(cache.paths(s)) for s in ("train", "test")] == [12 * 3, 12 * 2]
    before = (tmp_path / "f.split.json").read_text()
    code, out, _ = run_cli(capsys, "cache", flat, "--out", tmp_path / "f.h5", "--model", TINY_VIT,
                           "--pretrained", "none", "--shots", "all", "--views", "0", "--workers", "0", "--overwrite")
    assert code == 0 and "using the split in" in out and (tmp_path / "f.split.json").read_text() == before
    code, out, _ = run_cli(capsys, "cache", flat, "--out", tmp_path / "f.h5", "--model", TINY_VIT,
                           "--pretrained", "none", "--shots", "all", "--views", "0", "--workers", "0")
    assert code == 0 and out.strip() == f"{tmp_path / 'f.h5'} holds this cache, finished: nothing to do (--overwrite " \
        "encodes it again)"


def test_asking_for_more_shots_than_a_class_has_warns_and_is_recorded(tmp_path, tiny_vit, example_images):
    import json

    from fastcoop.cache import extract_features

    with pytest.warns(UserWarning, match="12 of 12 classes have fewer than 8 train images"):
        path = extract_features(read_dataset(example_images), tmp_path / "f.h5", tiny_vit, shots=8, seeds=[1],
                                views=0, workers=0, progress=False)
    with FeatureCache(path) as cache:
        assert json.loads(cache.file.attrs["short_classes"])["red circle"] == 6
        assert len(cache.rows("train", 8, 1)) == 72  # every image of every class


def test_a_csv_row_that_is_wrong_is_refused_naming_its_line(tmp_path, capsys):
    """Each mistake → `file:line: what is wrong`, exit 2, nothing written: a row without a label, an unclosed
    quote (which would swallow the rows after it), a class name among indices (it would become a class of its
    own), a misspelled split (its image would be dropped), a row with more fields than the header."""
    (tmp_path / "a.jpg").write_bytes(b"")
    cases = {"path,label\na.jpg,cat\na.jpg\n": "3: too few fields for the header's path,label",
             'path,label\na.jpg,cat\n"a.jpg,dog\na.jpg,cat\n': "3: cannot read the row here (unexpected end of data",
             "path,label\na.jpg,0\na.jpg,1\na.jpg,cat\na.jpg,2\n": "4: label 'cat' is a class name where the other "
                                                                  "labels are indices",
             "path,label,split\na.jpg,cat,train\na.jpg,dog,trian\n": "3: split 'trian' is not one of train, val, test",
             "path,label\na.jpg,cat,x\n": "2: too many fields for the header's path,label",
             "path,label\n ,cat\n": "2: no path"}
    for i, (text, message) in enumerate(cases.items()):
        (tmp_path / f"{i}.csv").write_text(text)
        code, out, err = run_cli(capsys, "cache", tmp_path / f"{i}.csv", "--out", tmp_path / "f.h5")
        assert code == 2 and err.startswith(f"error: {tmp_path / f'{i}.csv'}:{message}") and not out, err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "f.h5").exists()


def test_a_split_left_empty_by_the_flat_split_is_left_out_with_a_warning(tmp_path, capsys, example_images):
    """Two images per class split 50/20/30 % leave val empty: cached without it, said, not a crash."""
    import shutil

    for class_dir in (example_images / "train").iterdir():
        (tmp_path / "flat" / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:2]:
            shutil.copy(image, tmp_path / "flat" / class_dir.name)
    with pytest.warns(UserWarning, match="no images in its val split; caching train, test only"):
        code, _, err = run_cli(capsys, "cache", tmp_path / "flat", "--out", tmp_path / "f.h5", "--model", TINY_VIT,
                               "--pretrained", "none", "--shots", "1", "--seeds", "1", "--views", "0", "--splits",
                               "train,val,test", "--workers", "0")
    assert code == 0, err
    with FeatureCache(tmp_path / "f.h5") as cache:
        assert cache.splits == ["train", "test"]
