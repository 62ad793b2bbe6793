"""The HDF5 feature store: its schema, and FeatureCache, the read side that training and evaluation use.

Layout (schema 1), readable with h5py alone:
    attrs: schema_version, complete, model, pretrained, open_clip_version, preprocessing (JSON),
           classnames (JSON list), dataset_fingerprint, splits (JSON list), views, subsets_requested (JSON),
           short_classes (JSON {class: images} for classes with fewer train images than the shots asked),
           dataset (the CoOp dataset's config name, or ''), class_ids (JSON list of the classes' WordNet IDs, or
           null)
    /<split>/features  float16 (views, N, D): view 0 is the eval transform, views 1.. are augmented (train only)
    /<split>/labels    int64 (N,)
    /<split>/paths     utf-8 strings (N,)
    /<split>/readable  bool (N,): False for an image that could not be decoded (`--skip-bad`); every reader
                       leaves those rows out, so they are never rewritten away (absent: all readable)
    /train/subsets/shots<S>_seed<R>  int64 row indices into /train, in the published sampler's order
    /val/subsets/shots<S>_seed<R>    int64 row indices into /val: the published code's few-shot val images
                                     (min(S, 4) per class), drawn after train's from the same seeded stream
    /skipped           utf-8 strings: images that could not be decoded (with --skip-bad)
"""

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from fastcoop.errors import FastCoopError
from fastcoop.fewshot import subset_key

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 1
READ_BYTES = 64 << 20  # FeatureCache.features reads whole chunks up to about this much at a time
IDENTITY_ATTRS = ("model", "pretrained", "preprocessing", "dataset_fingerprint", "splits", "subsets_requested")


def identity(attrs) -> dict:
    """What makes two caches interchangeable: model, weights, preprocessing, images and the subsets asked for."""
    return {key: attrs.get(key) for key in IDENTITY_ATTRS}


class FeatureCache:
    """A finished feature file, opened read-only; arrays come back as torch tensors. Opening and checking it
    imports no torch (the readers of arrays do), so that commands check their cache before loading torch."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise FastCoopError(f"{self.path} is a folder, not a feature cache file (.h5)")
        if not self.path.is_file():
            partial = self.path.with_name(self.path.name + ".partial")
            hint = " (an unfinished extraction exists: rerun `fastcoop cache` to finish it)" if partial.exists() else ""
            raise FastCoopError(f"feature cache {self.path} does not exist{hint}")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as exc:
            raise FastCoopError(f"{self.path} is not a readable HDF5 feature cache ({exc})") from exc
        attrs = self.file.attrs
        if attrs.get("schema_version") != SCHEMA_VERSION or not attrs.get("complete"):
            raise FastCoopError(f"{self.path} is not a complete fastcoop feature cache (schema {SCHEMA_VERSION})")
        self.classnames: list[str] = json.loads(attrs["classnames"])
        self.model: str = attrs["model"]
        self.pretrained: str = attrs["pretrained"]
        self.preprocessing: dict = json.loads(attrs["preprocessing"])
        self.dataset_fingerprint: str = attrs["dataset_fingerprint"]
        self.splits: list[str] = json.loads(attrs["splits"])
        self.dataset: str = attrs.get("dataset", "")
        self.class_ids: list[str] | None = json.loads(attrs.get("class_ids", "null"))
        self._unreadable: dict[str, np.ndarray | None] = {}

    @property
    def crop_scale(self) -> tuple[float, float]:
        """The augmented views' crop areas, as fractions of the image (`fastcoop cache --crop-scale`)."""
        found = re.search(r"RandomResizedCrop\(([\d.]+)-([\d.]+)", self.preprocessing.get("augment", ""))
        return (float(found[1]), float(found[2])) if found else (0.08, 1.0)

    def identity(self) -> dict:
        """The cache's identity as plain JSON values (run directories and sweeps record it)."""
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in identity(self.file.attrs).items()}

    def subsets(self) -> list[tuple[int, int]]:
        """The (shots, seed) pairs this cache holds."""
        group = self.file.get("train/subsets", {})
        pairs = [tuple(int(p) for p in key.removeprefix("shots").split("_seed")) for key in group]
        return sorted(pairs)

    def rows(self, split: str, shots: int | None = None, seed: int | None = None) -> np.ndarray:
        """Row indices of a split, or of a few-shot subset of the train split (or of the val split: the val images
        the published code draws for that subset)."""
        group = self._split(split)
        if shots is None:
            requested = json.loads(self.file.attrs.get("subsets_requested", "{}"))
            if split == "train" and requested.get("shots"):
                raise FastCoopError(f"{self.path} holds only the train images of its few-shot subsets, not the "
                                    "whole train split; for --shots all, cache it with `fastcoop cache ... "
                                    "--shots all`")
            return self._readable_rows(split)
        key = subset_key(shots, seed)
        if key in group.get("subsets", {}) and split in ("train", "val"):
            return self._kept(split, group["subsets"][key][()])
        if split == "val" and key in self.file.get("train/subsets", {}):
            raise FastCoopError(f"{self.path} has no few-shot val subset for {shots} shots, seed {seed}; cache "
                                "again (--overwrite) to record the val images the published code draws")
        held = ", ".join(f"{s} shots seed {r}" for s, r in self.subsets()) or "only the full split (--shots all)"
        raise FastCoopError(f"{self.path} has no {shots}-shot subset for seed {seed} (it has {held}); "
                            f"rerun `fastcoop cache` with --shots {shots} --seeds {seed}")

    def num_views(self, split: str) -> int:
        return self._split(split)["features"].shape[0]

    def num_images(self, split: str) -> int:
        return len(self._readable_rows(split))

    @property
    def feature_dim(self) -> int:
        return self.file[self.splits[0]]["features"].shape[2]

    def skipped(self) -> list[str]:
        """Images left out as unreadable (`fastcoop cache --skip-bad`)."""
        return self.file["skipped"].asstr()[()].tolist() if "skipped" in self.file else []

    def features(self, split: str, rows: np.ndarray | None = None, view: int | slice | None = None
                 ) -> "torch.Tensor":
        """float16 features: (views, n, D), (n, D) for one view (`view` an int), or the views a slice names; rows
        (in their order) default to the whole split. Rows are read by runs of the chunks that hold them, up to
        READ_BYTES at a time: a few-shot subset reads its share of a cache made for several shot counts and seeds,
        and holds no more than its own rows and one read in memory."""
        import torch

        data = self._split(split)["features"]
        views = slice(None) if view is None else view
        if rows is None and self._unreadable_mask(split) is None:
            return torch.from_numpy(data[views])
        if rows is None:
            rows = self._readable_rows(split)
        rows = np.asarray(rows, dtype=np.int64)
        placed = np.argsort(rows, kind="stable")  # where each row, in increasing order, goes in the result
        ordered = rows[placed]
        out = np.empty(data[views, :0].shape[:-2] + (len(rows), data.shape[2]), dtype=data.dtype)
        if not len(rows):
            return torch.from_numpy(out)
        per_chunk = data.chunks[1] if data.chunks else data.shape[1]
        chunk_bytes = out.itemsize * per_chunk * int(np.prod(out.shape[:-2])) * data.shape[2]
        # reads: runs of consecutive chunks holding wanted rows, each cut into pieces of at most READ_BYTES
        chunk = ordered // per_chunk
        run = np.concatenate([[0], np.cumsum(np.diff(chunk) > 1)])
        piece = (chunk - chunk[np.searchsorted(run, run)]) // max(1, READ_BYTES // chunk_bytes)
        cuts = np.flatnonzero((np.diff(run) != 0) | (np.diff(piece) != 0)) + 1
        for start, end in zip([0, *cuts], [*cuts, len(rows)]):
            lo = int(chunk[start]) * per_chunk
            block = data[views, lo:int(ordered[end - 1]) + 1]
            out[..., placed[start:end], :] = block[..., ordered[start:end] - lo, :]
        return torch.from_numpy(out)

    def labels(self, split: str, rows: np.ndarray | None = None) -> "torch.Tensor":
        import torch

        labels = self._split(split)["labels"][()]
        return torch.from_numpy(labels[self._readable_rows(split) if rows is None else rows])

    def paths(self, split: str, rows: np.ndarray | None = None) -> list[str]:
        paths = self._split(split)["paths"].asstr()[()]
        return paths[self._readable_rows(split) if rows is None else rows].tolist()

    def _unreadable_mask(self, split: str) -> np.ndarray | None:
        """True for the rows whose image could not be decoded; None when there are none."""
        if split not in self._unreadable:
            group = self._split(split)
            readable = group["readable"][()] if "readable" in group else None
            self._unreadable[split] = None if readable is None or readable.all() else ~readable
        return self._unreadable[split]

    def _kept(self, split: str, rows: np.ndarray) -> np.ndarray:
        """`rows` without those of unreadable images."""
        unreadable = self._unreadable_mask(split)
        return rows if unreadable is None else rows[~unreadable[rows]]

    def _readable_rows(self, split: str) -> np.ndarray:
        """Every row of a split but those of unreadable images: what the readers mean by the whole split."""
        return self._kept(split, np.arange(self._split(split)["labels"].shape[0]))

    def _split(self, split: str) -> h5py.Group:
        if split not in self.splits:
            raise FastCoopError(f"{self.path} has no '{split}' split (it has {', '.join(self.splits)})")
        return self.file[split]

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
