"""The HDF5 file being written: FILE.partial, created or reopened to resume (refused when made with other settings),
each split's datasets, rows written batch by batch with a row counter, unreadable images' rows dropped at the end.
The layout is store.py's."""

import errno
import json
import math
from pathlib import Path

import h5py
import numpy as np

from fastcoop.cache.store import identity
from fastcoop.errors import FastCoopError, changed

CHUNK_BYTES = 1 << 20
STRING = h5py.string_dtype()


def _open(path: Path, mode: str, **options) -> h5py.File:
    """The file as the command writing it opens it: without HDF5's own file lock, an flock that the decoding workers
    forked while it is open would inherit and hold after a kill -9, failing the resume's open. The command holds
    the output's lock instead (fastcoop.outputs.held), which no child inherits."""
    return h5py.File(path, mode, locking=False, **options)


def feature_chunks(views: int, n: int, dim: int, images_per_batch: int) -> tuple[int, int, int]:
    """HDF5 chunks of a split's features: whole batches of images with all their views, of at least ~1 MB (fast
    whole-split reads)."""
    rows = max(images_per_batch, math.ceil(CHUNK_BYTES / (views * dim * 2)))
    return views, min(n, rows), dim


def check_replaceable(out: Path) -> None:
    """An existing `out` must be a feature cache (kept, or replaced with --overwrite); any other file is a user's,
    never replaced."""
    try:
        with _open(out, "r") as f:
            if "schema_version" in f.attrs:
                return
    except FileNotFoundError:
        return
    except OSError:
        pass
    raise FastCoopError(f"{out} exists and is not a fastcoop feature cache; it is never replaced: choose another "
                        "--out")


def open_for_writing(out: Path, partial: Path, attrs: dict, overwrite: bool, prepare) -> tuple[dict | None, object]:
    """(rows already written per split, the open partial file), or (None, None) when `out` is already done.
    `prepare(f)`: each split's datasets created where new, and how many rows of each are written (create_split)."""
    check_replaceable(out)
    if out.exists():
        if matches(out, attrs) and not overwrite:
            return None, None
        if not overwrite:
            raise FastCoopError(f"{out} exists and was made with other settings ({differences(out, attrs)}); "
                                "choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    if partial.exists() and not matches(partial, attrs):
        differ = differences(partial, attrs)
        if not overwrite and differ != "unreadable":  # an unreadable one (a kill mid-write) cannot resume
            raise FastCoopError(f"{partial} is an unfinished cache made with other settings ({differ}); run "
                                "its command again to finish it, or pass --overwrite to start over")
        partial.unlink()
    f = _open(partial, "a", rdcc_nbytes=64 * CHUNK_BYTES)  # a chunk being filled stays in memory
    if "schema_version" not in f.attrs:
        f.attrs.update(attrs | {"complete": False})
    return prepare(f), f


def create_split(f, split: str, items: list, subsets: dict, views: int, feature_dim, images_per_batch: int) -> int:
    """Create a split's datasets if new (`feature_dim()`: the features' size); return how many of its images are
    already written."""
    group = f.require_group(split)
    if "features" not in group:
        n, dim = len(items), feature_dim()
        group.create_dataset("features", (views, n, dim), dtype="float16",
                             chunks=feature_chunks(views, n, dim, images_per_batch))
        group.create_dataset("labels", data=np.array([label for _, label in items], dtype=np.int64))
        group.create_dataset("paths", data=[path for path, _ in items], dtype=STRING)
        group.create_dataset("readable", data=np.ones(n, dtype=bool))
        for key, subset in subsets.items():
            group.create_dataset(f"subsets/{key}", data=np.array(subset, dtype=np.int64))
        group.attrs["done"] = 0
    return int(group.attrs["done"])


def write_rows(group: h5py.Group, lo: int, hi: int, feats: np.ndarray, bad: list[int]) -> None:
    """Rows lo..hi of a split's features; rows whose image could not be decoded are marked unreadable."""
    group["features"][:, lo:hi] = feats
    if bad:
        readable = group["readable"][lo:hi]
        readable[bad] = False
        group["readable"][lo:hi] = readable


def finish(f, splits: list[str]) -> None:
    """Mark the file complete, listing the images that could not be decoded in /skipped. Their rows stay, marked
    unreadable, and every reader leaves them out (store.py): rewriting the datasets without them would leave the
    old bytes in the file and lose the chunking that partial reads rely on."""
    skipped = [path for split in splits
               for path in f[split]["paths"].asstr()[()][~f[split]["readable"][()]].tolist()]
    if skipped:
        f.create_dataset("skipped", data=skipped, dtype=STRING)
    f.attrs["complete"] = True


def failure(exc: Exception, partial: Path) -> str:
    """What a failure to write means for the user, in one line."""
    if isinstance(exc, OSError) and (exc.errno == errno.ENOSPC or "No space left" in str(exc)):
        return (f"the disk is full while writing {partial}; free space and run the same command again to resume")
    return str(exc) if isinstance(exc, FastCoopError) else f"cannot write {partial}: {exc}"


def differences(path: Path, attrs: dict) -> str:
    """How an existing file's identity differs from the one asked for, as 'name: file's → asked'."""
    try:
        with _open(path, "r") as f:
            theirs = identity(f.attrs)
    except OSError:
        return "unreadable"
    ours, parts = identity(attrs), []
    for key in ours:
        if theirs[key] == ours[key]:
            continue
        if key in ("preprocessing", "subsets_requested") and theirs[key]:  # JSON: name the fields that differ
            a, b = json.loads(theirs[key]), json.loads(ours[key])
            if key == "preprocessing":  # views cut by PIL record no engine
                a.setdefault("crops", "pil"), b.setdefault("crops", "pil")
            parts += changed(a, b)
        elif key == "dataset_fingerprint":
            parts.append("the images or labels")
        else:
            parts += changed({key: theirs[key]}, {key: ours[key]})
    return "; ".join(parts)


def matches(path: Path, attrs: dict) -> bool:
    try:
        with _open(path, "r") as f:
            return identity(f.attrs) == identity(attrs)
    except OSError:
        return False  # unreadable (e.g. killed mid-write): not a match
