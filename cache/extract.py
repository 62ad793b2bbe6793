"""Feature extraction: every image decoded once, encoded by the frozen image encoder, written to HDF5 in batches.

The output is written as FILE.partial and renamed when complete, so a half-written file is never taken for a
finished one. Each batch is flushed with a row counter; the same command run again resumes after the last flushed
batch, and since augmented views are seeded per (split, row, view) the result equals an uninterrupted run's.
"""

import hashlib
import json
import os
import warnings
import zlib
from contextlib import nullcontext
from pathlib import Path

import h5py
import numpy as np
import open_clip
import torch
from PIL import Image
from torchvision import transforms
from tqdm import tqdm

from fastcoop.cache.store import SCHEMA_VERSION, identity
from fastcoop.data import LabelledImages
from fastcoop.devices import autocast_dtype
from fastcoop.errors import FastCoopError
from fastcoop.fewshot import sample_few_shot, subset_key
from fastcoop.models import LoadedModel, preprocess_config

AUGMENT_SEED = 0
STRING = h5py.string_dtype()


def augment_transform(pre: dict) -> transforms.Compose:
    """CoOp's training augmentation: random resized crop (scale 0.08-1, bicubic), horizontal flip, CLIP norm."""
    return transforms.Compose([
        transforms.RandomResizedCrop(pre["size"], scale=(0.08, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(pre["mean"], pre["std"]),
    ])


class ImageViews(torch.utils.data.Dataset):
    """Decodes each image once and returns its eval view plus `views` augmented views, or a decode error."""

    def __init__(self, paths, eval_transform, augment, views, split, first_row, size):
        self.paths, self.eval_transform, self.augment = paths, eval_transform, augment
        self.views, self.split, self.first_row, self.size = views, split, first_row, size

    def __len__(self):
        return len(self.paths) - self.first_row

    def __getitem__(self, i):
        row = self.first_row + i
        try:
            with Image.open(self.paths[row]) as image:
                image = image.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            return torch.zeros(1 + self.views, 3, *self.size), row, f"{type(exc).__name__}: {exc}"
        tensors = [self.eval_transform(image)]
        for view in range(1, 1 + self.views):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(zlib.crc32(f"{AUGMENT_SEED}/{self.split}/{row}/{view}".encode()))
                tensors.append(self.augment(image))
        return torch.stack(tensors), row, ""


def dataset_fingerprint(data: LabelledImages) -> str:
    """sha256 of class names and every (split, path, size, label): changes when any image or label changes."""
    digest = hashlib.sha256(json.dumps(data.classnames).encode())
    for split in sorted(data.splits):
        for path, label in data.splits[split]:
            digest.update(f"{split}\0{path}\0{os.path.getsize(path)}\0{label}\n".encode())
    return digest.hexdigest()


def plan_rows(data: LabelledImages, splits: list[str], shots: int | None, seeds: list[int]):
    """Which images of each split to encode, and the few-shot subsets as row indices into the cached train rows."""
    rows = {split: list(range(len(data.split(split)))) for split in splits}
    subsets = {}
    if shots is not None and "train" in splits:
        labels = [label for _, label in data.split("train")]
        picked = {seed: sample_few_shot(labels, shots, seed) for seed in seeds}
        rows["train"] = sorted(set().union(*picked.values()))
        position = {index: row for row, index in enumerate(rows["train"])}
        subsets = {subset_key(shots, seed): [position[i] for i in chosen] for seed, chosen in picked.items()}
    return rows, subsets


def extract_features(data: LabelledImages, out: str | Path, loaded: LoadedModel, *, splits=("train", "test"),
                     shots: int | None = 16, seeds=(1, 2, 3), views: int = 0, batch_size: int = 128,
                     workers: int = 4, device: str = "cpu", precision: str = "fp32", skip_bad: bool = False,
                     overwrite: bool = False, progress: bool = True) -> Path:
    """Encode the chosen splits into `out`; resume an unfinished run; refuse to reuse a mismatched finished file."""
    out = Path(out)
    missing = [s for s in splits if s not in data.splits]
    if len(missing) == len(splits):
        data.split(missing[0])  # the clear error for a split the dataset lacks
    if missing:
        warnings.warn(f"the dataset has no {', '.join(missing)} split; caching {', '.join(data.splits)} only")
    splits = [s for s in splits if s in data.splits]
    pre = preprocess_config(loaded.model) | {"views": views, "augment_seed": AUGMENT_SEED,
                                             "augment": "RandomResizedCrop(0.08-1, bicubic)+HFlip"}
    rows, subsets = plan_rows(data, splits, shots, list(seeds))
    attrs = {
        "schema_version": SCHEMA_VERSION, "model": loaded.name, "pretrained": loaded.pretrained,
        "open_clip_version": open_clip.__version__, "preprocessing": json.dumps(pre, sort_keys=True),
        "classnames": json.dumps(data.classnames), "dataset_fingerprint": dataset_fingerprint(data),
        "splits": json.dumps(splits), "views": views,
        "subsets_requested": json.dumps({"shots": shots, "seeds": sorted(seeds) if shots else None}),
    }
    if out.exists():
        if _matches(out, attrs) and not overwrite:
            return out
        if not overwrite:
            raise FastCoopError(f"{out} exists and was made with another model, weights, preprocessing, dataset or "
                                "subsets; choose another --out or pass --overwrite")
    partial = out.with_name(out.name + ".partial")
    if partial.exists() and not _matches(partial, attrs | {"batch_size": batch_size}):
        partial.unlink()  # our own unfinished file, from another command: start over
    with h5py.File(partial, "a") as f:
        if "schema_version" not in f.attrs:
            f.attrs.update(attrs | {"batch_size": batch_size, "complete": False})
        for split in splits:
            _extract_split(f, data, split, rows[split], subsets if split == "train" else {}, loaded, pre, views,
                           batch_size, workers, device, precision, skip_bad, progress)
        skipped = _drop_skipped(f, splits)
        if skipped:
            f.create_dataset("skipped", data=skipped, dtype=STRING)
        del f.attrs["batch_size"]
        f.attrs["complete"] = True
    os.replace(partial, out)
    return out


def _matches(path: Path, attrs: dict) -> bool:
    try:
        with h5py.File(path, "r") as f:
            same_batches = "batch_size" not in attrs or f.attrs.get("batch_size") == attrs["batch_size"]
            return identity(f.attrs) == identity(attrs) and same_batches
    except OSError:
        return False  # unreadable (e.g. killed mid-write): not a match


def _extract_split(f, data, split, rows, subsets, loaded, pre, views, batch_size, workers, device, precision,
                   skip_bad, progress):
    items = [data.split(split)[i] for i in rows]
    split_views = 1 + (views if split == "train" else 0)
    group = f.require_group(split)
    if "features" not in group:
        dim = _feature_dim(loaded, pre, device)
        group.create_dataset("features", (split_views, len(items), dim), dtype="float16",
                             chunks=(1, min(len(items), 4096), dim))
        group.create_dataset("labels", data=np.array([label for _, label in items], dtype=np.int64))
        group.create_dataset("paths", data=[path for path, _ in items], dtype=STRING)
        group.create_dataset("readable", data=np.ones(len(items), dtype=bool))
        for key, subset in subsets.items():
            group.create_dataset(f"subsets/{key}", data=np.array(subset, dtype=np.int64))
        group.attrs["done"] = 0
    done = int(group.attrs["done"])
    if done == len(items):
        return
    dataset = ImageViews([p for p, _ in items], loaded.preprocess, augment_transform(pre), split_views - 1, split,
                         done, pre["size"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         persistent_workers=False, pin_memory=device.startswith("cuda"))
    dtype = autocast_dtype(precision)
    autocast = torch.autocast("cuda", dtype=dtype) if dtype and device.startswith("cuda") else nullcontext()
    with tqdm(total=len(items), initial=done, desc=f"encode {split}", unit="img", disable=not progress) as bar:
        for images, batch_rows, errors in loader:
            bad = [i for i, e in enumerate(errors) if e]
            if bad and not skip_bad:
                i = bad[0]
                bar.close()
                raise FastCoopError(f"cannot read image {items[batch_rows[i]][0]} ({errors[i]}); "
                                    "fix or remove it, or pass --skip-bad")
            with torch.no_grad(), autocast:
                flat = images.to(device, non_blocking=True).flatten(0, 1)
                feats = loaded.model.encode_image(flat).float().view(len(images), split_views, -1)
            lo, hi = int(batch_rows[0]), int(batch_rows[-1]) + 1
            group["features"][:, lo:hi] = feats.transpose(0, 1).cpu().numpy().astype(np.float16)
            if bad:
                readable = group["readable"][lo:hi]
                readable[bad] = False
                group["readable"][lo:hi] = readable
            group.attrs["done"] = hi
            f.flush()
            bar.update(hi - lo)


def _feature_dim(loaded, pre, device) -> int:
    with torch.no_grad():
        return loaded.model.encode_image(torch.zeros(1, 3, *pre["size"], device=device)).shape[-1]


def _drop_skipped(f, splits) -> list[str]:
    """Remove rows whose image could not be decoded, remapping the few-shot subsets; return their paths."""
    skipped = []
    for split in splits:
        group = f[split]
        readable = group["readable"][()]
        del group["readable"]
        if readable.all():
            continue
        paths = group["paths"][()]
        skipped += [p.decode() if isinstance(p, bytes) else p for p in paths[~readable]]
        keep = np.flatnonzero(readable)
        new_row = np.full(len(readable), -1)
        new_row[keep] = np.arange(len(keep))
        for name in ("features", "labels", "paths"):
            values = group[name][()][..., keep, :] if name == "features" else group[name][()][keep]
            del group[name]
            group.create_dataset(name, data=values, dtype=STRING if name == "paths" else values.dtype)
        for key in list(group.get("subsets", {})):
            mapped = new_row[group["subsets"][key][()]]
            del group["subsets"][key]
            group.create_dataset(f"subsets/{key}", data=mapped[mapped >= 0])
    return skipped
