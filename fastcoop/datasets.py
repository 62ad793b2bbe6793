"""The 15 datasets of the CoOp and CoCoOp papers, read from their folders as CoOp's DATASETS.md lays them out and
as CoOp's own dataset classes (its datasets/*.py) read them: the same class names in the same label order and the
same (image, label) pairs per split. Nine keep their splits in a split_zhou_<Name>.json; ImageNet, its four
variants and FGVCAircraft in files and folders of their own. Also `read_dataset`, which picks the reader for a
path: one of these folders (by its name or by the files in it), a split file, a CSV or an ImageFolder.

Where the published code takes a class folder's files in os.listdir's order (the filesystem's), they are read
sorted by name (data.image_files), so a folder reads the same on every machine. An incomplete folder is refused
with the first thing missing, never read as some other layout.
"""

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from fastcoop.classnames import spoken
from fastcoop.data import (LabelledImages, missing_images, image_files, read_coop_split, read_csv,
                           named_by_wnids, read_imagefolder, subfolders)
from fastcoop.errors import FastCoopError


@dataclass(frozen=True)
class CoopDataset:
    """One dataset as CoOp keeps it: `name` as its config is named (configs/datasets/<name>.yaml), `folder` its
    folder under $DATA, `paper_name` as the papers' tables name it, `split_file` the split file of the nine that
    have one, `image_dir` where its images are (relative to the folder), `test_only` for the domain-shift
    targets, which have only test images."""

    name: str
    folder: str
    paper_name: str
    split_file: str = ""
    image_dir: str = ""
    test_only: bool = False


DATASETS = {d.name: d for d in (
    CoopDataset("imagenet", "imagenet", "ImageNet", image_dir="images"),
    CoopDataset("caltech101", "caltech-101", "Caltech101", "split_zhou_Caltech101.json", "101_ObjectCategories"),
    CoopDataset("oxford_pets", "oxford_pets", "OxfordPets", "split_zhou_OxfordPets.json", "images"),
    CoopDataset("stanford_cars", "stanford_cars", "StanfordCars", "split_zhou_StanfordCars.json", ""),
    CoopDataset("oxford_flowers", "oxford_flowers", "Flowers102", "split_zhou_OxfordFlowers.json", "jpg"),
    CoopDataset("food101", "food-101", "Food101", "split_zhou_Food101.json", "images"),
    CoopDataset("fgvc_aircraft", "fgvc_aircraft", "FGVCAircraft", image_dir="images"),
    CoopDataset("sun397", "sun397", "SUN397", "split_zhou_SUN397.json", "SUN397"),
    CoopDataset("dtd", "dtd", "DTD", "split_zhou_DescribableTextures.json", "images"),
    CoopDataset("eurosat", "eurosat", "EuroSAT", "split_zhou_EuroSAT.json", "2750"),
    CoopDataset("ucf101", "ucf101", "UCF101", "split_zhou_UCF101.json", "UCF-101-midframes"),
    CoopDataset("imagenetv2", "imagenetv2", "ImageNetV2", image_dir="imagenetv2-matched-frequency-format-val",
                test_only=True),
    CoopDataset("imagenet_sketch", "imagenet-sketch", "ImageNet-Sketch", image_dir="images", test_only=True),
    CoopDataset("imagenet_a", "imagenet-adversarial", "ImageNet-A", image_dir="imagenet-a", test_only=True),
    CoopDataset("imagenet_r", "imagenet-rendition", "ImageNet-R", image_dir="imagenet-r", test_only=True),
)}
IMAGENET_VARIANTS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")  # domain generalisation's targets
CLASSNAMES_FILE = "classnames.txt"
FGVC_SPLITS = {"train": "images_variant_train.txt", "val": "images_variant_val.txt",
               "test": "images_variant_test.txt"}
IGNORED_FILES = ("README.txt",)  # ImageNet-A and -R ship one beside their class folders


def read_dataset(root: str | Path, layout: str = "auto", image_root: str | Path | None = None,
                 classnames_file: str | Path | None = None, dataset: str | None = None,
                 skip_missing: bool = False) -> LabelledImages:
    """Read a dataset: `dataset` names one of CoOp's (ROOT is its folder, or the $DATA folder holding it); else
    by `layout`, or, with 'auto', from what ROOT is: one of CoOp's dataset folders (by its name or the files in
    it), a split file, a CSV, or a folder of classes. Images a list names that are not there are refused, unless
    `skip_missing` (then they fail to decode, and `--skip-bad` records them)."""
    data = _read_dataset(Path(root), layout, image_root, classnames_file, dataset)
    if not skip_missing:
        data.refuse_missing()
    return data


def _read_dataset(root: Path, layout: str, image_root, classnames_file, dataset) -> LabelledImages:
    if not root.exists():
        raise FastCoopError(f"dataset path {root} does not exist")
    if dataset is not None:
        if layout not in ("auto", "coop"):
            raise FastCoopError(f"--dataset {dataset} reads CoOp's layout; leave --layout out (it is {layout})")
        spec = dataset_named(dataset)
        folder = root / spec.folder if root.name != spec.folder and (root / spec.folder).is_dir() else root
        if folder == root and root.name != spec.folder and root.is_dir() and not _has_a_mark_of(root, spec):
            raise FastCoopError(f"{root} has no {spec.folder}/ folder, where CoOp's DATASETS.md puts {spec.name} "
                                f"(or point at that folder itself)")
        return _read_coop_dataset(folder, spec, image_root)
    if layout in ("auto", "coop"):
        spec = recognise(root)
        if spec is not None and (layout == "auto" or spec.split_file):
            return _read_coop_dataset(root, spec, image_root)
    if layout == "auto":
        _refuse_data_folder(root)
        layout = _generic_layout(root)
    readers = {"imagefolder": lambda: read_imagefolder(root),
               "coop": lambda: read_coop_split(_find_split_file(root), image_root),
               "csv": lambda: read_csv(root, classnames_file)}
    if layout not in readers:
        raise FastCoopError(f"unknown layout '{layout}' (choose auto, imagefolder, coop or csv)")
    if layout == "csv" and root.is_dir():
        raise FastCoopError(f"--layout csv reads a .csv file; {root} is a folder")
    try:
        return readers[layout]()
    except FastCoopError as exc:
        raise FastCoopError(f"{exc}{_coop_hint(root)}") from None


def _coop_hint(root: Path) -> str:
    """Where a generic reader failed on one of CoOp's dataset folders, or on a folder inside one: say so."""
    for path, advice in ((root, "leave --layout out to read it as such"), (root.parent, f"point at {root.parent}")):
        spec = recognise(path) if path.is_dir() else None
        if spec is not None:
            return f" ({path} is CoOp's {spec.name} folder: {advice})"
    return ""


def dataset_named(name: str) -> CoopDataset:
    if name not in DATASETS:
        raise FastCoopError(f"unknown dataset '{name}' (CoOp's are {', '.join(DATASETS)})")
    return DATASETS[name]


def recognise(root: Path) -> CoopDataset | None:
    """The CoOp dataset a path holds — by its folder name, a split file's name, or the files inside — or None."""
    if root.is_file():
        return next((d for d in DATASETS.values() if d.split_file and d.split_file == root.name), None)
    by_name = next((d for d in DATASETS.values() if d.folder == root.name), None)
    if by_name is not None and _has_a_mark_of(root, by_name):
        return by_name
    for spec in DATASETS.values():
        if spec.split_file and (root / spec.split_file).is_file():
            return spec
    if (root / "variants.txt").exists() or any((root / f).exists() for f in FGVC_SPLITS.values()):
        return DATASETS["fgvc_aircraft"]
    for name in ("imagenetv2", "imagenet_a", "imagenet_r"):
        if (root / DATASETS[name].image_dir).is_dir():
            return DATASETS[name]
    images = root / "images"
    if images.is_dir() and (images / "train").is_dir() and (images / "val").is_dir():
        return DATASETS["imagenet"]
    if images.is_dir() and ((root / CLASSNAMES_FILE).is_file() or named_by_wnids(subfolders(images))):
        return DATASETS["imagenet_sketch"]
    return None


def _has_a_mark_of(root: Path, spec: CoopDataset) -> bool:
    """Whether a folder named as one of CoOp's holds anything of that dataset's layout (its split file, image
    folder or list files); a folder of someone's own data that only shares the name is read as what it is."""
    marks = [spec.split_file, spec.image_dir, "cars_train" if spec.name == "stanford_cars" else "",
             *((CLASSNAMES_FILE,) if spec.name.startswith("imagenet") else ()),
             *(("variants.txt", *FGVC_SPLITS.values()) if spec.name == "fgvc_aircraft" else ())]
    return any(mark and (root / mark).exists() for mark in marks)


# what CoOp's own datasets/*.py do without the split file (each then saves the split it drew), said when it is missing
_SPLITS_CLASS_FOLDERS = ("CoOp's code would split each class's images 50/20/30 % itself, at random, and save that "
                         "split; fastcoop reads {images} as a plain folder of class folders the same way (pass it as "
                         "ROOT), with its own fixed draw, not the published one")
_SPLITS_TRAIN_LIST = ("CoOp's code would split the dataset's official train list 80/20 into train and val itself, at "
                      "random; fastcoop does not read those lists: get the split file, so the images are the "
                      "published ones")
WITHOUT_SPLIT_FILE = {**dict.fromkeys(("caltech101", "dtd", "eurosat", "food101"), _SPLITS_CLASS_FOLDERS),
                      "oxford_flowers": ("CoOp's code would split imagelabels.mat's images 50/20/30 % per class "
                                         "itself, at random; get the split file, so the images are the published "
                                         "ones"),
                      **dict.fromkeys(("oxford_pets", "stanford_cars", "sun397", "ucf101"), _SPLITS_TRAIN_LIST)}


def _read_coop_dataset(folder: Path, spec: CoopDataset, image_root: str | Path | None = None) -> LabelledImages:
    folder = Path(folder)
    if folder.is_file() and spec.split_file:  # the split file itself
        folder = folder.parent
    if not folder.is_dir():
        raise FastCoopError(f"{folder} is not a folder (CoOp's {spec.name} is a folder '{spec.folder}')")
    if spec.split_file:
        split_file = folder / spec.split_file
        if not split_file.is_file():
            raise FastCoopError(f"{folder} has no {spec.split_file}, which holds {spec.name}'s splits (CoOp's "
                                f"DATASETS.md says where to get it); "
                                + WITHOUT_SPLIT_FILE[spec.name].format(images=folder / spec.image_dir))
        data = read_coop_split(split_file, image_root or folder / spec.image_dir)
    else:
        data = {"imagenet": _read_imagenet, "fgvc_aircraft": _read_fgvc_aircraft,
                "imagenetv2": _read_imagenetv2}.get(spec.name, _read_wnid_folders)(folder, spec)
    data.dataset = spec.name
    return data


def read_coop_dataset(folder: Path, spec: CoopDataset, image_root: str | Path | None = None) -> LabelledImages:
    """One of CoOp's datasets from its folder, read as its datasets/<name>.py reads it; incomplete → refused."""
    data = _read_coop_dataset(folder, spec, image_root)
    data.refuse_missing()
    return data


def _read_imagenet(folder: Path, spec: CoopDataset) -> LabelledImages:
    """CoOp's ImageNet: labels follow the sorted wnid folders of images/train, named by classnames.txt; its
    images/val folder is the test set (and, as the published code has it, the val set too)."""
    names = read_classnames(folder)
    images = _required_folder(folder / spec.image_dir, folder)
    train, test = (_required_folder(images / split, folder) for split in ("train", "val"))
    wnids = subfolders(train)
    if subfolders(test) != wnids:
        other = sorted(set(subfolders(test)) ^ set(wnids))
        raise FastCoopError(f"{test} and {train} hold different class folders ({other[0]} is in only one)")
    _check_named(wnids, names, train)
    train_items, test_items = _class_images(train, wnids), _class_images(test, wnids)
    return LabelledImages([spoken(names[w]) for w in wnids], {"train": train_items, "val": test_items,
                                                              "test": test_items}, "coop", class_ids=wnids)


def _read_fgvc_aircraft(folder: Path, spec: CoopDataset) -> LabelledImages:
    """CoOp's FGVCAircraft: labels follow the lines of variants.txt; each images_variant_<split>.txt line is
    '<image id> <variant>', the image images/<image id>.jpg."""
    variants = _lines(folder / "variants.txt", folder)
    label_of = {name: label for label, name in enumerate(variants)}
    images = _required_folder(folder / spec.image_dir, folder)
    root = images.resolve()
    splits, missing = {}, []
    for split, name in FGVC_SPLITS.items():
        items = []
        for number, line in enumerate(_lines(folder / name, folder), start=1):
            image, _, variant = line.partition(" ")
            if variant not in label_of:
                raise FastCoopError(f"line {number} of {folder / name} names variant '{variant}', which is not in "
                                    f"{folder / 'variants.txt'}")
            items.append((str(root / f"{image}.jpg"), label_of[variant]))
        missing += missing_images([path for path, _ in items], folder / name)
        splits[split] = items
    return LabelledImages([spoken(v) for v in variants], splits, "coop", missing=missing)


def _read_imagenetv2(folder: Path, spec: CoopDataset) -> LabelledImages:
    """CoOp's ImageNetV2 (test only): folder i of imagenetv2-matched-frequency-format-val holds class i, the i-th
    line of classnames.txt."""
    names = read_classnames(folder)
    images = _required_folder(folder / spec.image_dir, folder)
    wnids = list(names)
    expected = [str(i) for i in range(len(wnids))]
    present = set(subfolders(images))
    missing = [f for f in expected if f not in present]
    if missing:
        raise FastCoopError(f"{images} has no class folder {missing[0]} (classnames.txt names {len(wnids)} classes,"
                            f" folders 0..{len(wnids) - 1}; {len(missing)} missing)")
    extra = sorted(present - set(expected))
    if extra:
        raise FastCoopError(f"{images / extra[0]} is not a class of {folder / CLASSNAMES_FILE} "
                            f"({len(wnids)} lines: folders 0..{len(wnids) - 1})")
    return LabelledImages([spoken(names[w]) for w in wnids], {"test": _class_images(images, expected)}, "coop",
                          class_ids=wnids)


def _read_wnid_folders(folder: Path, spec: CoopDataset) -> LabelledImages:
    """CoOp's ImageNet-Sketch, -A and -R (test only): labels follow the sorted wnid folders (200 of them for A and
    R; their README.txt left out), named by classnames.txt."""
    names = read_classnames(folder)
    images = _required_folder(folder / spec.image_dir, folder)
    wnids = [name for name in subfolders(images) if name not in IGNORED_FILES]
    if not wnids:
        raise FastCoopError(f"{images} has no class folders")
    _check_named(wnids, names, images)
    return LabelledImages([spoken(names[w]) for w in wnids], {"test": _class_images(images, wnids)}, "coop",
                          class_ids=wnids)


def read_classnames(folder: Path) -> "OrderedDict[str, str]":
    """classnames.txt, 'wnid class name' per line, as CoOp's ImageNet.read_classnames reads it: the first word is
    the folder, the rest (joined by single spaces) the class name."""
    names = OrderedDict()
    path = folder / CLASSNAMES_FILE
    for number, line in enumerate(_lines(path, folder), start=1):
        wnid, _, name = line.partition(" ")
        if not name:
            raise FastCoopError(f"line {number} of {path} has no class name after '{wnid}'")
        names[wnid] = name
    return names


def _lines(path: Path, folder: Path) -> list[str]:
    """A text file's lines, stripped, blank ones left out; its absence is refused naming it."""
    if not path.is_file():
        raise FastCoopError(f"{folder} has no {path.name}, which CoOp's layout needs there")
    try:
        lines = [line.strip() for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise FastCoopError(f"cannot read {path}: {exc}") from None
    lines = [line for line in lines if line]
    if not lines:
        raise FastCoopError(f"{path} is empty")
    return lines


def _required_folder(path: Path, folder: Path) -> Path:
    if not path.is_dir():
        raise FastCoopError(f"{folder} has no folder {path.relative_to(folder)}, which CoOp's layout needs there")
    return path.resolve()


def _check_named(wnids: list[str], names: dict, images: Path) -> None:
    unnamed = [w for w in wnids if w not in names]
    if unnamed:
        raise FastCoopError(f"class folder {images / unnamed[0]} is not in {CLASSNAMES_FILE}"
                            + (f" ({len(unnamed)} folders are not)" if len(unnamed) > 1 else ""))


def _class_images(images: Path, folders: list[str]) -> list[tuple[str, int]]:
    """(path, label) of every image, class folder by class folder (label = place in `folders`), files sorted."""
    items = []
    for label, name in enumerate(folders):
        class_dir = images / name
        files = image_files(class_dir)
        if not files:
            raise FastCoopError(f"class folder {class_dir} has no images")
        prefix = str(class_dir)
        items += [(f"{prefix}/{file}", label) for file in files]
    return items


def _refuse_data_folder(root: Path) -> None:
    """$DATA itself, holding several of CoOp's dataset folders, is not one dataset: say which to give."""
    if not root.is_dir():
        return
    held = [d.folder for d in DATASETS.values() if (root / d.folder).is_dir()]
    if held:
        raise FastCoopError(f"{root} holds CoOp's dataset folders ({', '.join(held[:4])}"
                            + (", ..." if len(held) > 4 else "") + f"): give one, e.g. {root / held[0]} "
                            f"(`fastcoop datasets {root}` lists them)")


def _generic_layout(root: Path) -> str:
    if root.is_file():
        if root.suffix == ".json":
            return "coop"
        if root.suffix == ".csv":
            return "csv"
        raise FastCoopError(f"{root} is neither a CoOp split .json, a .csv nor a folder")
    if list(root.glob("split_zhou_*.json")):
        return "coop"
    return "imagefolder"


def _find_split_file(root: Path) -> Path:
    if root.is_file():
        return root
    found = sorted(root.glob("split_zhou_*.json"))
    if len(found) != 1:
        raise FastCoopError(f"expected one split_zhou_*.json in {root}, found {len(found)}")
    return found[0]

