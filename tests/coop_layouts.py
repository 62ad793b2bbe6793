"""Miniatures of CoOp's dataset folders (its DATASETS.md), for the readers' tests: real class names, several
classes, files created in a shuffled order (so that a listing in creation order is not sorted), and the published
code's rules for reading them written out from CoOp's datasets/*.py and Dassl's DatasetBase — independently of
fastcoop's readers, to compare against."""

import json
import os
import random
from collections import OrderedDict, defaultdict
from pathlib import Path

from PIL import Image

import fastcoop

PRESETS = json.loads((Path(fastcoop.__file__).parent / "presets" / "classnames.json").read_text())

# ImageNet's first ten classes and its two classes that CLIP's names both call "missile", by WordNet ID
IMAGENET = OrderedDict(zip(
    ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331", "n01498041", "n01514668",
     "n01514859", "n01518878", "n03773504", "n04008634"],
    [PRESETS["imagenet"][i] for i in (*range(10), 657, 744)]))
assert list(IMAGENET.values())[-2:] == ["missile", "missile"]
VARIANT_SUBSET = ["n01443537", "n01491361", "n01514859", "n04008634"]  # the classes ImageNet-A and -R keep


def image(path: Path, rng: random.Random, source: Path | None = None) -> None:
    """A small JPEG at `path` (a copy of `source` if given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if source is not None:
        path.write_bytes(source.read_bytes())
    else:
        Image.new("RGB", (8, 8), tuple(rng.randrange(256) for _ in range(3))).save(path)


def _shuffled_names(rng: random.Random, prefix: str, count: int, suffix: str) -> list[str]:
    names = [f"{prefix}_{rng.randrange(10 ** 6):06d}{suffix}" for _ in range(count)]
    rng.shuffle(names)
    return list(dict.fromkeys(names))


def _classnames_txt(folder: Path, wnids, rng: random.Random) -> None:
    lines = [f"{w} {IMAGENET[w]}" for w in wnids]
    rng.shuffle(lines)  # labels follow the sorted folders, not this file's order
    (folder / "classnames.txt").write_text("\n".join(lines) + "\n")


def make_imagenet(data: Path, per_class: dict[str, int], rng: random.Random, sources=None) -> Path:
    """imagenet/{classnames.txt, images/{train,val}/<wnid>/*.JPEG}; `sources` (class index → image files) lends
    real pictures."""
    folder = data / "imagenet"
    folder.mkdir(parents=True)
    _classnames_txt(folder, IMAGENET, rng)
    for label, wnid in enumerate(rng.sample(list(IMAGENET), len(IMAGENET))):
        index = list(IMAGENET).index(wnid)
        for split, count in per_class.items():
            for i, name in enumerate(_shuffled_names(rng, wnid, count, ".JPEG")):
                image(folder / "images" / split / wnid / name, rng,
                      sources[index][i % len(sources[index])] if sources else None)
    return folder


def make_imagenet_variant(data: Path, which: str, rng: random.Random, per_class: int = 2, sources=None) -> Path:
    """imagenetv2, imagenet-sketch, imagenet-adversarial or imagenet-rendition, each with its classnames.txt."""
    folder = data / {"v2": "imagenetv2", "sketch": "imagenet-sketch", "a": "imagenet-adversarial",
                     "r": "imagenet-rendition"}[which]
    folder.mkdir(parents=True)
    wnids = VARIANT_SUBSET if which in ("a", "r") else list(IMAGENET)
    if which == "v2":  # folder i is the i-th line: the file is in ImageNet's order here, as CoOp's is
        (folder / "classnames.txt").write_text("".join(f"{w} {IMAGENET[w]}\n" for w in IMAGENET))
    else:
        _classnames_txt(folder, IMAGENET, rng)  # the whole list, also for A and R
    images = folder / {"v2": "imagenetv2-matched-frequency-format-val", "sketch": "images", "a": "imagenet-a",
                       "r": "imagenet-r"}[which]
    for wnid in rng.sample(wnids, len(wnids)):
        index = list(IMAGENET).index(wnid)
        class_dir = images / (str(index) if which == "v2" else wnid)
        for i, name in enumerate(_shuffled_names(rng, "img", per_class, ".jpeg")):
            image(class_dir / name, rng, sources[index][i % len(sources[index])] if sources else None)
    if which in ("a", "r"):
        (images / "README.txt").write_text("the 200 classes of this set\n")
    return folder


def make_fgvc_aircraft(data: Path, rng: random.Random, classes: int = 6,
                       per_split: dict[str, int] = None) -> Path:
    """fgvc_aircraft/{variants.txt, images_variant_{train,val,test}.txt, images/<id>.jpg}."""
    per_split = per_split or {"train": 6, "val": 3, "test": 3}
    folder = data / "fgvc_aircraft"
    folder.mkdir(parents=True)
    variants = PRESETS["fgvc_aircraft"][:classes]
    assert any(" " in v for v in variants)  # "ERJ 135": the variant is the rest of a line, spaces included
    (folder / "variants.txt").write_text("".join(v + "\n" for v in variants))
    ids = iter(rng.sample(range(10 ** 6, 10 ** 7), classes * sum(per_split.values())))
    for split, count in per_split.items():
        lines = [f"{next(ids):07d} {v}" for v in variants for _ in range(count)]
        rng.shuffle(lines)
        (folder / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
        for line in lines:
            image(folder / "images" / f"{line.split(' ')[0]}.jpg", rng)
    return folder


def make_split_dataset(data: Path, folder_name: str, split_file: str, image_dir: str, classnames: list[str],
                       rng: random.Random) -> Path:
    """One of the nine with a split_zhou_<Name>.json, its images under `image_dir`."""
    folder = data / folder_name
    split = {}
    for part, count in (("train", 5), ("val", 2), ("test", 2)):
        split[part] = []
        for label, name in enumerate(classnames):
            for file in _shuffled_names(rng, part, count, ".jpg"):
                rel = f"{name}/{file}"
                image(folder / image_dir / rel, rng)
                split[part].append([rel, label, name])
        rng.shuffle(split[part])
    (folder / split_file).write_text(json.dumps(split))
    return folder


# ---- the published rules, from CoOp's datasets/*.py and Dassl's DatasetBase ----

def listdir_nohidden(path) -> list[str]:
    """Dassl's listdir_nohidden, sorted: the documented difference (the published code takes os.listdir's
    order)."""
    return sorted(f for f in os.listdir(path) if not f.startswith("."))


def read_classnames(text_file) -> OrderedDict:
    classnames = OrderedDict()
    with open(text_file) as f:
        for line in f.readlines():
            line = line.strip().split(" ")
            classnames[line[0]] = " ".join(line[1:])
    return classnames


def coop_imagenet(folder: Path) -> dict:
    classnames = read_classnames(folder / "classnames.txt")

    def read_data(split_dir):
        split_dir = folder / "images" / split_dir
        folders = sorted(f.name for f in os.scandir(split_dir) if f.is_dir())
        return [(str(split_dir / f / im), label, classnames[f]) for label, f in enumerate(folders)
                for im in listdir_nohidden(split_dir / f)]
    return {"train": read_data("train"), "test": read_data("val")}


def coop_imagenetv2(folder: Path) -> dict:
    classnames = read_classnames(folder / "classnames.txt")
    folders = list(classnames.keys())
    image_dir = folder / "imagenetv2-matched-frequency-format-val"
    return {"test": [(str(image_dir / str(label) / im), label, classnames[folders[label]])
                     for label in range(len(folders)) for im in listdir_nohidden(image_dir / str(label))]}


def coop_wnid_folders(folder: Path, image_dir: str) -> dict:
    """ImageNet-Sketch (image_dir 'images'), -A ('imagenet-a') and -R ('imagenet-r')."""
    classnames = read_classnames(folder / "classnames.txt")
    images = folder / image_dir
    folders = [f for f in listdir_nohidden(images) if f not in ["README.txt"]]
    return {"test": [(str(images / f / im), label, classnames[f]) for label, f in enumerate(folders)
                     for im in listdir_nohidden(images / f)]}


def coop_fgvc_aircraft(folder: Path) -> dict:
    classnames = [line.strip() for line in (folder / "variants.txt").read_text().splitlines(keepends=True)]
    cname2lab = {c: i for i, c in enumerate(classnames)}
    out = {}
    for split in ("train", "val", "test"):
        items = []
        for line in (folder / f"images_variant_{split}.txt").read_text().splitlines(keepends=True):
            line = line.strip().split(" ")
            classname = " ".join(line[1:])
            items.append((str(folder / "images" / (line[0] + ".jpg")), cname2lab[classname], classname))
        out[split] = items
    return out


def coop_split(folder: Path, split_file: str, image_dir: str) -> dict:
    split = json.loads((folder / split_file).read_text())
    return {part: [(str(folder / image_dir / p), int(label), name) for p, label, name in split[part]]
            for part in ("train", "val", "test")}


def generate_fewshot_dataset(items: list, num_shots: int) -> list:
    """Dassl's DatasetBase.generate_fewshot_dataset on the global random (repeat=False)."""
    tracker = defaultdict(list)
    for item in items:
        tracker[item[1]].append(item)
    dataset = []
    for _, group in tracker.items():
        dataset.extend(random.sample(group, num_shots) if len(group) >= num_shots else group)
    return dataset


def coop_few_shot(splits: dict, shots: int, seed: int) -> dict:
    """What CoOp's datasets hold after set_random_seed(seed): train sampled, then val with min(shots, 4)."""
    random.seed(seed)
    out = {"train": generate_fewshot_dataset(splits["train"], shots)}
    if "val" in splits:
        out["val"] = generate_fewshot_dataset(splits["val"], min(shots, 4))
    return out


def lab2cname(items: list) -> list[str]:
    """Dassl's get_lab2cname, then CoOp's prompt learner's name.replace('_', ' ')."""
    mapping = {label: name for _, label, name in items}
    return [mapping[label].replace("_", " ") for label in sorted(mapping)]
