"""Dataset readers: ImageFolder, CoOp split JSON and CSV, each giving (path, label) lists per split and class names."""

import csv
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from fastcoop.errors import FastCoopError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class LabelledImages:
    """Class names and, per split, a list of (absolute image path, integer label); `layout` says where they came
    from ('flat': a folder of classes without split folders, read as train only)."""

    classnames: list[str]
    splits: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    layout: str = ""

    def split(self, name: str) -> list[tuple[str, int]]:
        if name not in self.splits:
            raise FastCoopError(f"the dataset has no '{name}' split (it has: {', '.join(self.splits) or 'none'})")
        return self.splits[name]


def read_dataset(root: str | Path, layout: str = "auto", image_root: str | Path | None = None,
                 classnames_file: str | Path | None = None) -> LabelledImages:
    """Read a dataset by layout, or pick the layout from what ROOT is (auto)."""
    root = Path(root)
    if not root.exists():
        raise FastCoopError(f"dataset path {root} does not exist")
    if layout == "auto":
        layout = _guess_layout(root)
    readers = {"imagefolder": lambda: read_imagefolder(root),
               "coop": lambda: read_coop_split(_find_coop_split(root), image_root),
               "csv": lambda: read_csv(root, classnames_file)}
    if layout not in readers:
        raise FastCoopError(f"unknown layout '{layout}' (choose auto, imagefolder, coop or csv)")
    return readers[layout]()


def split_flat_folder(data: LabelledImages, train: float = 0.5, val: float = 0.2, seed: int = 1) -> LabelledImages:
    """Train/val/test splits for a folder of classes without them, made as the published code makes them for such
    datasets (Dassl's read_and_split_data): per class, in class order, the images shuffled by one random.Random —
    seeded here with the paper's first seed — then the first round(n·train) to train, the next round(n·val) to val,
    the rest to test. Files are taken in sorted order (the published code takes os.listdir's, the filesystem's)."""
    if not 0 < train < 1 or not 0 <= val < 1 or train + val >= 1:
        raise FastCoopError(f"--split-ratios {train},{val} must be train,val fractions with train + val < 1")
    rng = random.Random(seed)
    by_class: dict[int, list[str]] = {}
    for path, label in data.split("train"):
        by_class.setdefault(label, []).append(path)
    splits = {"train": [], "val": [], "test": []}
    for label in sorted(by_class):
        images = sorted(by_class[label])
        rng.shuffle(images)
        n_train, n_val = round(len(images) * train), round(len(images) * val)
        if n_train == 0 or n_val + n_train >= len(images):
            raise FastCoopError(f"class '{data.classnames[label]}' has {len(images)} images: too few to split "
                                f"{train:.0%} / {val:.0%} / {1 - train - val:.0%} into train, val and test")
        splits["train"] += [(p, label) for p in images[:n_train]]
        splits["val"] += [(p, label) for p in images[n_train:n_train + n_val]]
        splits["test"] += [(p, label) for p in images[n_train + n_val:]]
    return LabelledImages(data.classnames, splits, layout="coop")


def write_coop_split(data: LabelledImages, path: Path, image_root: Path) -> None:
    """The splits as a CoOp split file ({split: [[path relative to image_root, label, class name], ...]})."""
    split = {name: [[os.path.relpath(p, image_root), label, data.classnames[label]] for p, label in items]
             for name, items in data.splits.items()}
    Path(path).write_text(json.dumps(split, indent=1) + "\n")


def _guess_layout(root: Path) -> str:
    if root.is_file():
        if root.suffix == ".json":
            return "coop"
        if root.suffix == ".csv":
            return "csv"
        raise FastCoopError(f"{root} is neither a CoOp split .json, a .csv nor a folder")
    if list(root.glob("split_zhou_*.json")):
        return "coop"
    return "imagefolder"


def _find_coop_split(root: Path) -> Path:
    if root.is_file():
        return root
    found = sorted(root.glob("split_zhou_*.json"))
    if len(found) != 1:
        raise FastCoopError(f"expected one split_zhou_*.json in {root}, found {len(found)}")
    return found[0]


def read_imagefolder(root: Path) -> LabelledImages:
    """root/<class>/<image>, or root/<split>/<class>/<image> when root holds train/val/test folders."""
    root = Path(root)
    if not root.is_dir():
        raise FastCoopError(f"{root} is not a folder")
    split_dirs = {name: root / name for name in SPLIT_NAMES if (root / name).is_dir()}
    flat = not split_dirs
    if flat:  # every image is read as train; split_flat_folder makes val and test
        split_dirs = {"train": root}
    class_dirs = sorted({d.name for folder in split_dirs.values() for d in folder.iterdir() if d.is_dir()})
    if not class_dirs:
        raise FastCoopError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    labels = {name: i for i, name in enumerate(class_dirs)}
    data = LabelledImages([name.replace("_", " ") for name in class_dirs], layout="flat" if flat else "imagefolder")
    for split, folder in split_dirs.items():
        items = []
        for class_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
            images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise FastCoopError(f"class folder {class_dir} has no images")
            items += [(str(p.resolve()), labels[class_dir.name]) for p in images]
        data.splits[split] = items
    return data


def read_coop_split(split_file: Path, image_root: str | Path | None = None) -> LabelledImages:
    """CoOp's split_zhou_<Name>.json: {"train": [[relative_path, label, classname], ...], "val": ..., "test": ...}."""
    try:
        raw = json.loads(Path(split_file).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FastCoopError(f"cannot read split file {split_file}: {exc}") from exc
    if not isinstance(raw, dict) or not any(raw.get(s) for s in SPLIT_NAMES):
        raise FastCoopError(f"{split_file} has no train/val/test lists")
    rows = {s: raw[s] for s in SPLIT_NAMES if raw.get(s)}
    image_root = Path(image_root) if image_root else _find_image_root(Path(split_file).parent, rows)
    names: dict[int, str] = {}
    for split, entries in rows.items():
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[1], int)):
                raise FastCoopError(f"{split_file}: malformed {split} entry {entry!r}")
            _, label, classname = entry
            if names.setdefault(label, classname) != classname:
                raise FastCoopError(f"{split_file}: label {label} is both '{names[label]}' and '{classname}'")
    num_classes = max(names) + 1
    if min(names) < 0 or len(names) != num_classes:
        missing = sorted(set(range(num_classes)) - set(names))
        raise FastCoopError(f"{split_file}: labels must be 0..{num_classes - 1} without gaps "
                            f"(min {min(names)}, missing {missing[:5]})")
    data = LabelledImages([names[i].replace("_", " ") for i in range(num_classes)], layout="coop")
    for split, entries in rows.items():
        data.splits[split] = [(_existing(image_root / rel, split_file), label) for rel, label, _ in entries]
    return data


def _find_image_root(folder: Path, rows: dict) -> Path:
    """CoOp's datasets keep images in a dataset-specific subfolder (images/, jpg/, 2750/, ...): find the one that fits."""
    first = next(iter(rows.values()))[0][0]
    for candidate in [folder, *sorted(d for d in folder.iterdir() if d.is_dir())]:
        if (candidate / first).exists():
            return candidate
    raise FastCoopError(f"cannot find the image folder for {first} under {folder}; pass --image-root")


def read_csv(csv_file: Path, classnames_file: str | Path | None = None) -> LabelledImages:
    """CSV with header path,label[,split]; paths relative to the CSV; labels are class names or integers."""
    csv_file = Path(csv_file)
    with csv_file.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise FastCoopError(f"{csv_file} needs a header with columns path,label[,split]")
        rows = [(r["path"], r["label"].strip(), (r.get("split") or "train").strip()) for r in reader]
    if not rows:
        raise FastCoopError(f"{csv_file} lists no images")
    if classnames_file:
        classnames = [line.strip() for line in Path(classnames_file).read_text().splitlines() if line.strip()]
    elif all(label.isdigit() for _, label, _ in rows):
        raise FastCoopError(f"{csv_file} has integer labels: pass the class names file (one name per line)")
    else:
        classnames = sorted({label for _, label, _ in rows})
    index = {name: i for i, name in enumerate(classnames)}
    data = LabelledImages([n.replace("_", " ") for n in classnames], layout="csv")
    for line, (rel, label, split) in enumerate(rows, start=2):
        if label.isdigit() and label not in index:
            number = int(label)
            if number >= len(classnames):
                raise FastCoopError(f"{csv_file}:{line}: label {number} is out of range (0..{len(classnames) - 1})")
        elif label not in index:
            raise FastCoopError(f"{csv_file}:{line}: label '{label}' is not in the class names")
        else:
            number = index[label]
        data.splits.setdefault(split, []).append((_existing(csv_file.parent / rel, csv_file), number))
    return data


def _existing(path: Path, listed_in: Path) -> str:
    if not path.is_file():
        raise FastCoopError(f"{listed_in} lists {path}, which does not exist")
    return str(path.resolve())
