import json

import pytest
from PIL import Image

from fastcoop.data import read_dataset
from fastcoop.errors import FastCoopError


def _jpg(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    return path


def test_imagefolder_flat_and_split(tmp_path):
    for name in ("golden_retriever/a.jpg", "golden_retriever/b.jpg", "cat/c.jpg"):
        _jpg(tmp_path / "flat" / name)
    data = read_dataset(tmp_path / "flat")
    assert data.layout == "imagefolder" and data.classnames == ["cat", "golden retriever"]
    assert [label for _, label in data.split("train")] == [0, 1, 1]
    for name in ("train/cat/a.jpg", "train/dog/b.jpg", "test/dog/c.jpg"):
        _jpg(tmp_path / "split" / name)
    data = read_dataset(tmp_path / "split")
    assert set(data.splits) == {"train", "test"} and data.split("test")[0][1] == 1


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
