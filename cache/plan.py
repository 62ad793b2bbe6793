"""What a cache holds, decided before any image is read: the rows and few-shot subsets of each split, the
augmented views per image, the decode workers, and the identity the file records (what a resume or a reuse must
match)."""

import hashlib
import json
import os
import warnings

import numpy as np
import open_clip

from fastcoop.cache.store import SCHEMA_VERSION
from fastcoop.cache.crops import COOP_SCALE
from fastcoop.cache.views import AUGMENT_SEED, ENGINES
from fastcoop.data import LabelledImages
from fastcoop.errors import FastCoopError
from fastcoop.fewshot import sample_train_and_val, subset_key
from fastcoop.models import LoadedModel, preprocess_config
from fastcoop.schedule import published_epochs


def augment_name(scale: tuple[float, float]) -> str:
    """The augmentation as the cache records it (store.FeatureCache.crop_scale reads the scale back)."""
    return f"RandomResizedCrop({scale[0]:g}-{scale[1]:g}, bicubic)+HFlip"


def auto_views(shots: list[int] | None, num_classes: int) -> int:
    """Augmented views per train image for a fresh view in every epoch of the longest published schedule that
    uses them."""
    return max(published_epochs(s, num_classes) for s in shots or [None])


def dataset_fingerprint(data: LabelledImages) -> str:
    """sha256 of class names and every (split, path, size, label): changes when any image or label changes (an
    image listed but not there, which --skip-bad skips, counts as size -1)."""
    digest = hashlib.sha256(json.dumps(data.classnames).encode())
    for split in sorted(data.splits):
        for path, label in data.splits[split]:
            digest.update(f"{split}\0{path}\0{_size(path)}\0{label}\n".encode())
    return digest.hexdigest()


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return -1


def plan_rows(data: LabelledImages, splits: list[str], shots: list[int] | None, seeds: list[int]):
    """Which images of each split to encode; the few-shot subsets (every shot count × seed) of each split as row
    indices into its cached rows — train's, and val's where val is cached, drawn as the published code draws them
    (fewshot.sample_train_and_val); the classes with fewer train images than the most shots asked."""
    rows = {split: list(range(len(data.split(split)))) for split in splits}
    if shots is None or "train" not in splits:
        return rows, {}, {}
    labels = [label for _, label in data.split("train")]
    val_labels = [label for _, label in data.split("val")] if "val" in splits else []
    counts = np.bincount(labels, minlength=len(data.classnames))
    short = {data.classnames[c]: int(n) for c, n in enumerate(counts) if n < max(shots)}
    if short:
        fewest = min(short, key=short.get)
        warnings.warn(f"{len(short)} of {len(data.classnames)} classes have fewer than {max(shots)} train images "
                      f"(fewest: '{fewest}', {short[fewest]}); their subsets hold every image they have "
                      "(recorded in the cache as short_classes)")
    picked = {(s, seed): sample_train_and_val(labels, val_labels, s, seed) for s in shots for seed in seeds}
    rows["train"] = sorted(set().union(*(train for train, _ in picked.values())))
    position = {index: row for row, index in enumerate(rows["train"])}
    subsets = {"train": {subset_key(s, seed): [position[i] for i in train] for (s, seed), (train, _) in picked.items()}}
    if "val" in splits:
        subsets["val"] = {subset_key(s, seed): val for (s, seed), (_, val) in picked.items()}
    return rows, subsets, short


def crop_engine(crops: str, device: str) -> str:
    """'auto' → 'device' on a GPU (the views cut where the encoder runs), 'pil' on the CPU (where PIL's own
    crops cost the cores no more)."""
    if crops not in ("auto", *ENGINES):
        raise FastCoopError(f"--crops takes auto, {', '.join(ENGINES)}, not '{crops}'")
    return ("device" if device.startswith("cuda") else "pil") if crops == "auto" else crops


def default_workers(device: str) -> int:
    """Decode-and-crop workers, from the cores this process may use, shared among torchrun's processes on the
    node. Encoding on a GPU: one per core but one (the process feeding the GPU keeps it), at most 32, since the
    crops are what limits extraction there. On the CPU, where the encoder needs the cores too: one per core, at
    most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(32, share - 1)) if device.startswith("cuda") else min(8, share)


def cache_attrs(data: LabelledImages, loaded: LoadedModel, splits: list[str], shot_list: list[int] | None,
                seeds, views: int, engine: str, subsets: dict, short: dict,
                scale: tuple[float, float] = COOP_SCALE) -> dict:
    """The file's attributes: what it was made from and how (its identity: store.IDENTITY_ATTRS), and what it
    holds."""
    pre = preprocess_config(loaded.model) | {"views": views, "augment_seed": AUGMENT_SEED,
                                             "augment": augment_name(scale)}
    if engine == "device":  # recorded only where it is not the published computation, PIL's
        pre["crops"] = "device"
    return {
        "schema_version": SCHEMA_VERSION, "model": loaded.name, "pretrained": loaded.pretrained,
        "open_clip_version": open_clip.__version__, "preprocessing": json.dumps(pre, sort_keys=True),
        "classnames": json.dumps(data.classnames), "dataset_fingerprint": dataset_fingerprint(data),
        "splits": json.dumps(splits), "views": views,
        "subsets_requested": json.dumps({"shots": shot_list[0] if shot_list and len(shot_list) == 1 else shot_list,
                                         "seeds": sorted(seeds) if shot_list else None}
                                        | ({"val_shots": "min(shots, 4)"} if subsets.get("val") else {})),
        "short_classes": json.dumps(short), "dataset": data.dataset,
        "class_ids": json.dumps(data.class_ids),
    }
