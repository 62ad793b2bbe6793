"""Generic dataset readers: ImageFolder, CoOp split JSON and CSV, each giving (path, label) lists per split and
class names. CoOp's own dataset folders, and the choice of reader for a path, are in fastcoop.datasets."""

import csv
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from fastcoop.classnames import spoken
from fastcoop.errors import FastCoopError, first_few

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
IMAGE_NAME = re.compile(r"[^.].*\.(" + "|".join(s[1:] for s in IMAGE_SUFFIXES) + r")\Z", re.IGNORECASE | re.DOTALL)
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class LabelledImages:
    """Class names and, per split, a list of (absolute image path, integer label); `layout` says where they came
    from ('flat': a folder of classes without split folders, read as train only); `dataset` names the CoOp dataset
    read (its config name) and `class_ids` its classes' folder names (WordNet IDs) where it has them."""

    classnames: list[str]
    splits: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    layout: str = ""
    dataset: str = ""
    class_ids: list[str] | None = None
    missing: list[tuple[str, str]] = field(default_factory=list)  # (list file, image) for listed images not there

    def refuse_missing(self) -> None:
        """Refuse listed images that are not there, naming the first few and counting them (unless they are to be
        skipped: `fastcoop cache --skip-bad` records them as unreadable)."""
        if len(self.missing) == 1:
            raise FastCoopError(f"{self.missing[0][0]} lists {self.missing[0][1]}, which does not exist (--skip-bad "
                                "skips it)")
        if self.missing:
            raise FastCoopError(f"{self.missing[0][0]} lists {len(self.missing)} images that do not exist: "
                                f"{first_few([path for _, path in self.missing])} (--skip-bad skips them)")

    def split(self, name: str) -> list[tuple[str, int]]:
        if name not in self.splits:
            raise FastCoopError(f"the dataset has no '{name}' split (it has: {', '.join(self.splits) or 'none'})")
        return self.splits[name]


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


def read_imagefolder(root: Path) -> LabelledImages:
    """root/<class>/<image>, or root/<split>/<class>/<image> when root holds train/val/test folders. Folders named
    by WordNet IDs, or a single class holding every image, are refused: read as classes they would put a wnid or a
    folder name in every prompt."""
    root = Path(root)
    if not root.is_dir():
        raise FastCoopError(f"{root} is not a folder")
    split_dirs = {name: name for name in SPLIT_NAMES if (root / name).is_dir()}
    flat = not split_dirs
    if flat:  # every image is read as train; split_flat_folder makes val and test
        split_dirs = {"train": ""}
    class_dirs = sorted({name for folder in split_dirs.values() for name in subfolders(root / folder)})
    if not class_dirs:
        raise FastCoopError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    if named_by_wnids(class_dirs):
        raise FastCoopError(f"the class folders of {root} are WordNet IDs ({class_dirs[0]}, ...), not class names: "
                            "point at the dataset's folder as CoOp lays it out (with its classnames.txt), or name "
                            "the classes in a CSV (--layout csv --classnames FILE)")
    if len(class_dirs) == 1:
        raise FastCoopError(f"{root} has a single class folder, '{class_dirs[0]}', holding every image: a dataset "
                            "needs a folder per class")
    labels = {name: i for i, name in enumerate(class_dirs)}
    data = LabelledImages([spoken(name) for name in class_dirs], layout="flat" if flat else "imagefolder")
    for split, folder in split_dirs.items():
        split_root = os.path.join(str(root.resolve()), folder)
        items = []
        for name in subfolders(split_root):
            class_dir = os.path.join(split_root, name)
            images = image_files(class_dir)
            if not images:
                raise FastCoopError(f"class folder {root / folder / name} has no images")
            items += [(os.path.join(class_dir, image), labels[name]) for image in images]
        data.splits[split] = items
    return data


WNID = re.compile(r"n\d{8}")


def named_by_wnids(folders: list[str]) -> bool:
    """Whether folders are named by WordNet IDs (n01440764, ...): ImageNet's classes without their names."""
    return bool(folders) and all(WNID.fullmatch(name) for name in folders)


def subfolders(folder: str | Path) -> list[str]:
    """The names of a folder's subfolders, hidden ones left out, sorted."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


def image_files(folder: str | Path) -> list[str]:
    """The names of a folder's image files (by suffix; hidden files left out), sorted by name. The published code
    takes os.listdir's order, which is the filesystem's and differs between machines; sorted, a folder reads the
    same everywhere. Names alone are read (no stat per file): ImageNet's train split is 1.28 M of them."""
    return sorted(filter(IMAGE_NAME.match, os.listdir(folder)))


def missing_images(paths: list[str], listed_in: str | Path) -> list[tuple[str, str]]:
    """(listed_in, path) for each listed image that is not there. Existence is read from one listing per folder,
    far cheaper than a stat per image for a split of a million images."""
    listings: dict[str, set[str]] = {}
    missing = []
    for path in paths:
        folder, name = os.path.split(path)
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(folder))
            except OSError:
                listings[folder] = set()
        if name not in listings[folder]:
            missing.append((str(listed_in), path))
    return missing


def read_coop_split(split_file: Path, image_root: str | Path | None = None) -> LabelledImages:
    """CoOp's split_zhou_<Name>.json: {"train": [[relative_path, label, classname], ...], "val": ..., "test": ...}."""
    try:
        raw = json.loads(Path(split_file).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FastCoopError(f"cannot read split file {split_file}: {exc}") from exc
    if not isinstance(raw, dict) or not any(raw.get(s) for s in SPLIT_NAMES):
        raise FastCoopError(f"{split_file} has no train/val/test lists")
    rows = {s: raw[s] for s in SPLIT_NAMES if raw.get(s)}
    names: dict[int, str] = {}
    for split, entries in rows.items():
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                    and isinstance(entry[1], int)):
                raise FastCoopError(f"{split_file}: malformed {split} entry {entry!r}")
            _, label, classname = entry
            if names.setdefault(label, classname) != classname:
                raise FastCoopError(f"{split_file}: label {label} is both '{names[label]}' and '{classname}'")
    num_classes = max(names) + 1
    if min(names) < 0 or len(names) != num_classes:
        missing = sorted(set(range(num_classes)) - set(names))
        raise FastCoopError(f"{split_file}: labels must be 0..{num_classes - 1} without gaps "
                            f"(min {min(names)}, missing {missing[:5]})")
    image_root = Path(image_root) if image_root else _find_image_root(Path(split_file).parent, rows)
    if not image_root.is_dir():
        raise FastCoopError(f"the image folder {image_root} of {split_file} does not exist")
    data = LabelledImages([spoken(names[i]) for i in range(num_classes)], layout="coop")
    root = str(image_root.resolve())
    for split, entries in rows.items():
        data.splits[split] = [(os.path.normpath(os.path.join(root, rel)), label) for rel, label, _ in entries]
        data.missing += missing_images([path for path, _ in data.splits[split]], split_file)
    return data


def _find_image_root(folder: Path, rows: dict) -> Path:
    """A split file's image folder when none is named: the folder or a subfolder of it where the first image
    listed is."""
    first = next(iter(rows.values()))[0][0]
    for candidate in [folder, *sorted(d for d in folder.iterdir() if d.is_dir())]:
        if (candidate / first).exists():
            return candidate
    raise FastCoopError(f"cannot find the image folder for {first} under {folder}; pass --image-root")


SPLITS = ("train", "val", "test")


def _csv_rows(csv_file: Path) -> list[tuple[int, str, str, str]]:
    """The CSV's rows as (line, path, label, split), each checked: a missing field, an unclosed quote or an unknown
    split is refused naming its line."""
    rows = []
    with csv_file.open(newline="") as f:
        reader = csv.DictReader(f, strict=True)  # strict: an unclosed quote is an error, not the rest of the file
        try:
            if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
                raise FastCoopError(f"{csv_file} needs a header with columns path,label[,split]")
            line = reader.line_num  # where the last row read ends
            for row in reader:
                line = reader.line_num
                if None in row.values() or None in row:
                    raise FastCoopError(f"{csv_file}:{line}: {'too few' if None in row.values() else 'too many'} "
                                        f"fields for the header's {','.join(reader.fieldnames)}")
                path, label, split = row["path"].strip(), row["label"].strip(), (row.get("split") or "train").strip()
                if not path or not label:
                    raise FastCoopError(f"{csv_file}:{line}: no {'path' if not path else 'label'}")
                if split not in SPLITS:
                    raise FastCoopError(f"{csv_file}:{line}: split '{split}' is not one of {', '.join(SPLITS)}")
                rows.append((line, path, label, split))
        except csv.Error as exc:  # the row after the last one read (an unclosed quote runs to the end)
            raise FastCoopError(f"{csv_file}:{line + 1}: cannot read the row here ({exc}; an unclosed quote?)") \
                from None
    if not rows:
        raise FastCoopError(f"{csv_file} lists no images")
    return rows


def read_csv(csv_file: Path, classnames_file: str | Path | None = None) -> LabelledImages:
    """CSV with header path,label[,split]; paths relative to the CSV; labels are class names or integers."""
    csv_file = Path(csv_file)
    rows = _csv_rows(csv_file)
    if classnames_file:
        classnames = [line.strip() for line in Path(classnames_file).read_text().splitlines() if line.strip()]
    else:
        numbered = [label.isdigit() for _, _, label, _ in rows]
        if all(numbered):
            raise FastCoopError(f"{csv_file} has integer labels: pass the class names file (one name per line)")
        if any(numbered):  # a class index among names, or a name among indices: a typo, not a new class
            line, _, label, _ = rows[numbered.index(sum(numbered) < len(rows) / 2)]
            raise FastCoopError(f"{csv_file}:{line}: label '{label}' is a class "
                                f"{'index' if label.isdigit() else 'name'} where the other labels are "
                                f"{'names' if label.isdigit() else 'indices'}; label every row alike (indices with "
                                "--classnames)")
        classnames = sorted({label for _, _, label, _ in rows})
    index = {name: i for i, name in enumerate(classnames)}
    root = str(csv_file.parent.resolve())
    data = LabelledImages([spoken(n) for n in classnames], layout="csv")
    for line, rel, label, split in rows:
        if label.isdigit() and label not in index:
            number = int(label)
            if number >= len(classnames):
                raise FastCoopError(f"{csv_file}:{line}: label {number} is out of range (0..{len(classnames) - 1})")
        elif label not in index:
            raise FastCoopError(f"{csv_file}:{line}: label '{label}' is not in the class names")
        else:
            number = index[label]
        data.splits.setdefault(split, []).append((os.path.normpath(os.path.join(root, rel)), number))
    for items in data.splits.values():
        data.missing += missing_images([path for path, _ in items], csv_file)
    return data
