"""Feature extraction: every image decoded once, all its views cut from the decoded image (views.py), encoded by
the frozen image encoder, written to HDF5 batch by batch.

Worker processes decode (and, with the 'pil' crop engine, crop) and hand over uint8 pixels (a quarter of
float32's bytes to move); with the 'device' engine the views are cut where the encoder runs. The tensor conversion
and CLIP normalisation run batched there, with the same operations in the same order as torchvision's ToTensor +
Normalize. Augmented views are seeded per (split, row, view), so a view does not depend on batching, workers or
processes.

The output is written as FILE.partial and renamed when complete, so a half-written file is never taken for a
finished one. Each batch is flushed with a row counter; the same command run again resumes after the last flushed
batch and gives the same file as an uninterrupted run (with another --batch-size too, as after running out of GPU
memory: the views are the same, and the features differ at most by the encoder's rounding at another batch
shape). A partial file made with other settings is refused, naming them. Under torchrun each rank encodes every
N-th batch and rank 0 writes them in order: the batches, and so the file, are those of a one-process run.
"""

import errno
import hashlib
import json
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import open_clip
import torch
from tqdm import tqdm

from fastcoop.cache.store import SCHEMA_VERSION, identity
from fastcoop.cache.encoder import ImageEncoder
from fastcoop.cache.views import AUGMENT_SEED, ENGINES, ImageViews, cut_views, split_eval_transform
from fastcoop.data import LabelledImages
from fastcoop.devices import autocast_dtype
from fastcoop.distributed import World
from fastcoop.errors import FastCoopError
from fastcoop.fewshot import sample_train_and_val, subset_key
from fastcoop.models import LoadedModel, preprocess_config
from fastcoop.schedule import published_epochs

CHUNK_BYTES = 1 << 20
STRING = h5py.string_dtype()


def auto_views(shots: list[int] | None, num_classes: int) -> int:
    """Augmented views per train image for a fresh view in every epoch of the longest published schedule that
    uses them."""
    return max(published_epochs(s, num_classes) for s in shots or [None])


def dataset_fingerprint(data: LabelledImages) -> str:
    """sha256 of class names and every (split, path, size, label): changes when any image or label changes."""
    digest = hashlib.sha256(json.dumps(data.classnames).encode())
    for split in sorted(data.splits):
        for path, label in data.splits[split]:
            digest.update(f"{split}\0{path}\0{os.path.getsize(path)}\0{label}\n".encode())
    return digest.hexdigest()


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


def feature_chunks(views: int, n: int, dim: int, images_per_batch: int) -> tuple[int, int, int]:
    """HDF5 chunks of a split's features: whole batches of images with all their views, of at least ~1 MB (fast
    whole-split reads)."""
    rows = max(images_per_batch, math.ceil(CHUNK_BYTES / (views * dim * 2)))
    return views, min(n, rows), dim


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


def extract_features(data: LabelledImages, out: str | Path, loaded: LoadedModel, *, splits=("train", "test"),
                     shots: int | list[int] | None = 16, seeds=(1, 2, 3), views: int | str = "auto",
                     batch_size: int = 256,
                     workers: int | None = None, device: str = "cpu", precision: str = "fp32",
                     skip_bad: bool = False, overwrite: bool = False, progress: bool = True,
                     world: World = World(), crops: str = "auto", verbose: bool = False,
                     encoder: str = "eager") -> Path:
    """Encode the chosen splits into `out`; resume an unfinished run; refuse to reuse a mismatched finished file.

    `shots`: a shot count or several (their subsets share the cached images), None for the whole train split.
    `views`: augmented views per train image besides the eval view; "auto" gives one per epoch of the longest
    published schedule among `shots`. `batch_size`: views per encoder call (an image's views stay in one batch).
    `crops`: where the augmented views are cut, 'pil' (in the decoding workers, the published computation) or
    'device' (where the encoder runs, equal to PIL's); 'auto' is 'device' on a GPU. `verbose`: the progress bar
    also shows each stage's share of the time, and the end says where it went. `encoder`: 'graph' replays the
    image encoder from a CUDA graph (encoder.ImageEncoder)."""
    out = Path(out)
    missing = [s for s in splits if s not in data.splits]
    if len(missing) == len(splits):
        data.split(missing[0])  # the clear error for a split the dataset lacks
    if missing and world.is_writer:
        warnings.warn(f"the dataset has no {', '.join(missing)} split; caching {', '.join(data.splits)} only")
    splits = [s for s in splits if s in data.splits]
    shot_list = None if shots is None or "train" not in splits else sorted({shots} if isinstance(shots, int)
                                                                            else set(shots))
    if views == "auto":
        views = auto_views(shot_list, len(data.classnames)) if "train" in splits else 0
    engine = crop_engine(crops, device) if views else "pil"
    pre = preprocess_config(loaded.model) | {"views": views, "augment_seed": AUGMENT_SEED,
                                             "augment": "RandomResizedCrop(0.08-1, bicubic)+HFlip"}
    if engine == "device":  # recorded only where it is not the published computation, PIL's
        pre["crops"] = "device"
    rows, subsets, short = plan_rows(data, splits, shot_list, list(seeds))
    attrs = {
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
    views_of = {split: 1 + (views if split == "train" else 0) for split in splits}
    job = _Job(loaded, pre, views_of, batch_size, default_workers(device) if workers is None else workers, device,
               precision, skip_bad, progress and world.is_writer, world, engine, verbose, encoder)
    partial = out.with_name(out.name + ".partial")
    plan, f = None, None
    if world.is_writer:
        try:
            plan, f = _open_for_writing(out, partial, attrs, overwrite, job, data, rows, subsets)
        except (FastCoopError, OSError) as exc:
            plan = _failure(exc, partial)
    plan = world.from_writer(plan)
    if isinstance(plan, str):
        raise FastCoopError(plan)
    if plan is None:  # a finished file with these settings exists
        return out
    if job.progress:
        job.announce(rows, plan)
    try:
        for split in splits:
            items = [data.split(split)[i] for i in rows[split]]
            job.run_split(f, split, items, plan[split])
        if f is not None:
            skipped = _drop_skipped(f, splits)
            if skipped:
                f.create_dataset("skipped", data=skipped, dtype=STRING)
            f.attrs["complete"] = True
    finally:
        if f is not None:
            f.close()
    if world.is_writer:
        os.replace(partial, out)
        if verbose and job.stages.seconds:
            tqdm.write(f"time: {job.stages.describe(seconds=True)}")
    world.from_writer(None)  # every rank returns once the file is in place
    return out


def _open_for_writing(out, partial, attrs, overwrite, job, data, rows, subsets):
    """(rows already encoded per split, the open partial file), or (None, None) when `out` is already done."""
    if out.exists():
        if _differences(out, attrs) == "unreadable":
            raise FastCoopError(f"{out} exists and is not a fastcoop feature cache; it is never replaced: choose "
                                "another --out")
        if _matches(out, attrs) and not overwrite:
            return None, None
        if not overwrite:
            raise FastCoopError(f"{out} exists and was made with other settings ({_differences(out, attrs)}); "
                                "choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    if partial.exists() and not _matches(partial, attrs):
        differences = _differences(partial, attrs)
        if not overwrite and differences != "unreadable":  # an unreadable one (a kill mid-write) cannot resume
            raise FastCoopError(f"{partial} is an unfinished cache made with other settings ({differences}); run "
                                "its command again to finish it, or pass --overwrite to start over")
        partial.unlink()
    f = h5py.File(partial, "a", rdcc_nbytes=64 * CHUNK_BYTES)  # a chunk being filled stays in memory
    if "schema_version" not in f.attrs:
        f.attrs.update(attrs | {"complete": False})
    done = {}
    for split, split_rows in rows.items():
        items = [data.split(split)[i] for i in split_rows]
        done[split] = job.prepare_split(f, split, items, subsets.get(split, {}))
        if 0 < done[split] < len(items) and job.progress:
            tqdm.write(f"resuming {partial}: {split} from image {done[split]} of {len(items)}")
    return done, f


def _failure(exc: Exception, partial: Path) -> str:
    if _disk_full(exc):
        return (f"the disk is full while writing {partial}; free space and run the same command again to resume")
    return str(exc) if isinstance(exc, FastCoopError) else f"cannot write {partial}: {exc}"


def _disk_full(exc: Exception) -> bool:
    return isinstance(exc, OSError) and (exc.errno == errno.ENOSPC or "No space left" in str(exc))


class _Job:
    """What every split's extraction shares: the model, its transforms, the batching and the writer."""

    def __init__(self, loaded, pre, views_of, batch_size, workers, device, precision, skip_bad, progress, world,
                 engine="pil", verbose=False, encoder="eager"):
        self.loaded, self.pre, self.views_of, self.batch_size = loaded, pre, views_of, batch_size
        self.workers, self.device, self.skip_bad, self.progress, self.world = workers, device, skip_bad, progress, world
        self.engine, self.verbose, self.stages = engine, verbose, Stages(synchronize=verbose)
        self.eval_image, normalize = split_eval_transform(loaded.preprocess)
        self.encoder = ImageEncoder(loaded.model, normalize, batch_size, device, autocast_dtype(precision),
                                    graph=encoder == "graph")

    def images_per_batch(self, split: str) -> int:
        return max(1, self.batch_size // self.views_of[split])

    def encode(self, pixels: torch.Tensor) -> "Features":
        """uint8 (images, views, 3, H, W) → float16 features (views, images, D), `batch_size` views per call. On a
        GPU they come back to pinned host memory asynchronously: the host goes on to the next batch meanwhile."""
        feats = self.encoder(pixels.to(self.device, non_blocking=True).flatten(0, 1))
        return Features(feats.view(len(pixels), pixels.shape[1], -1).transpose(0, 1))

    def prepare_split(self, f, split, items, subsets) -> int:
        """Create the split's datasets if new; return how many of its images are already written."""
        group = f.require_group(split)
        if "features" not in group:
            views, n = self.views_of[split], len(items)
            dim = self.feature_dim()
            group.create_dataset("features", (views, n, dim), dtype="float16",
                                 chunks=feature_chunks(views, n, dim, self.images_per_batch(split)))
            group.create_dataset("labels", data=np.array([label for _, label in items], dtype=np.int64))
            group.create_dataset("paths", data=[path for path, _ in items], dtype=STRING)
            group.create_dataset("readable", data=np.ones(n, dtype=bool))
            for key, subset in subsets.items():
                group.create_dataset(f"subsets/{key}", data=np.array(subset, dtype=np.int64))
            group.attrs["done"] = 0
        return int(group.attrs["done"])

    def feature_dim(self) -> int:
        dim = getattr(self.loaded.model.visual, "output_dim", None)
        return dim or self.encode(torch.zeros(1, 1, 3, *self.pre["size"], dtype=torch.uint8)).array().shape[-1]

    def announce(self, rows, done):
        """The work ahead before it starts: images, views, feature size, and a time from a probe of the encoder."""
        encodes = sum((len(rows[s]) - done[s]) * self.views_of[s] for s in rows)
        if not encodes:
            return
        on_gpu = self.device.startswith("cuda")
        probe = torch.zeros(1, min(self.batch_size, 32 if on_gpu else 4), 3, *self.pre["size"], dtype=torch.uint8)
        if on_gpu:
            self.encode(probe).array()  # the first call also starts cuBLAS and cuDNN
        start = time.perf_counter()
        dim = self.encode(probe).array().shape[-1]
        per_view = (time.perf_counter() - start) / probe.shape[1] / self.world.size
        parts = ", ".join(f"{s} {len(rows[s]) - done[s]} images × {self.views_of[s]} view(s)" for s in rows)
        size = encodes * dim * 2
        size = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
        tqdm.write(f"to encode: {parts} = {encodes:,} views, {size} of features; "
                   f"≈ {_duration(encodes * per_view)} at the encoder's speed on a {probe.shape[1]}-view probe")

    def run_split(self, f, split, items, start: int):
        """Encode rows start.. of a split: this rank's share of the batches, written in order by the writer."""
        n, per_image, world = len(items), self.views_of[split], self.world
        if start == n:
            return
        step = self.images_per_batch(split)
        batches = [list(range(lo, min(lo + step, n))) for lo in range(start, n, step)]
        engine = self.engine if per_image > 1 else "pil"  # nothing to cut without augmented views
        dataset = ImageViews([p for p, _ in items], self.eval_image, per_image - 1, split, self.pre["size"], engine)
        mine = batches[world.rank::world.size]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=mine, num_workers=min(self.workers, len(mine)),
                                             collate_fn=dataset.collate, pin_memory=self.device.startswith("cuda"))
        group = f[split] if f is not None else None
        bar = tqdm(total=n, initial=start, desc=f"encode {split}", unit="img", disable=not self.progress)
        writer = ThreadPoolExecutor(max_workers=1) if group is not None else None  # writes while the next encodes
        pending = None  # the write of the batch before
        try:
            with bar:
                batch_iter = iter(loader)
                for first in range(0, len(batches), world.size):
                    payload = None
                    if first + world.rank < len(batches):
                        with self.stages.timing("decode"):  # waiting for the workers
                            *pixels, rows, errors = next(batch_iter)
                        if engine == "device":
                            with self.stages.timing("crop", self.device):
                                pixels = [cut_views(*pixels, self.pre["size"], self.device)]
                        with self.stages.timing("encode", self.device):
                            features = self.encode(pixels[0])
                        # other ranks' features travel to the writer pickled, as arrays
                        payload = (int(rows[0]), int(rows[-1]) + 1, features.array() if world.size > 1 else features,
                                   list(errors))
                    gathered = world.gather_to_writer(payload)
                    with self.stages.timing("write"):  # waiting for the batch before to be written
                        failure = self._written(pending, f)
                    pending = None
                    if group is not None and failure is None:
                        pending = writer.submit(self._write, f, group, items, [p for p in gathered if p is not None],
                                                bar, per_image)
                    failure = world.from_writer(failure)
                    if failure:
                        raise FastCoopError(failure)
                failure = world.from_writer(self._written(pending, f))
                if failure:
                    raise FastCoopError(failure)
        finally:
            if writer is not None:
                writer.shutdown(wait=True)  # a write under way ends before the file closes (a resume starts there)

    @staticmethod
    def _written(pending, f) -> str | None:
        """Wait for a submitted write: its failure, or None."""
        if pending is None:
            return None
        try:
            return pending.result()
        except OSError as exc:
            return _failure(exc, Path(f.filename))

    def _write(self, f, group, items, payloads, bar, per_image) -> str | None:
        """Write gathered batches in row order; a decode error without --skip-bad stops before writing."""
        for lo, _, _, errors in payloads:
            bad = [i for i, e in enumerate(errors) if e]
            if bad and not self.skip_bad:
                return (f"cannot read image {items[lo + bad[0]][0]} ({errors[bad[0]]}); fix or remove it, "
                        "or pass --skip-bad")
        for lo, hi, feats, errors in payloads:
            write_rows(group, lo, hi, feats.array() if isinstance(feats, Features) else feats,
                       [i for i, e in enumerate(errors) if e])
            group.attrs["done"] = hi
            f.flush()
            bar.update(hi - lo)
        rate = bar.format_dict.get("rate")
        if rate:
            bar.set_postfix_str(f"{rate * per_image:,.0f} views/s"
                                + (f", {self.stages.describe()}" if self.verbose else ""), refresh=False)
        return None


class Features:
    """A batch's features on their way to the host: on a GPU copied into pinned memory without waiting, `array()`
    waits for that copy alone (the writer's thread calls it, so the host never waits for the device)."""

    def __init__(self, features: torch.Tensor):
        if features.is_cuda:
            self.host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
            self.host.copy_(features, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()
        else:
            self.host, self.copied = features.contiguous(), None

    def array(self) -> np.ndarray:
        if self.copied is not None:
            self.copied.synchronize()
        return self.host.numpy()


class Stages:
    """Seconds spent in each stage of extraction (waiting for decoded images, cutting views, encoding, waiting
    for the write before): the largest share is the stage the others wait on. `synchronize`: wait for the device
    at the end of each stage, so that its asynchronous work is counted where it was launched (costs a little
    overlap; for --verbose)."""

    def __init__(self, synchronize: bool = False):
        self.seconds: dict[str, float] = {}
        self.synchronize = synchronize

    @contextmanager
    def timing(self, stage: str, device: str = "cpu"):
        start = time.perf_counter()
        yield
        if self.synchronize and device.startswith("cuda"):
            torch.cuda.synchronize(device)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def describe(self, seconds: bool = False) -> str:
        """'decode 74%, encode 25%, write 1%' (with seconds: 'decode 0.5 s (74%), ...')."""
        total = sum(self.seconds.values()) or 1.0
        return ", ".join(f"{name} {t:.1f} s ({t / total:.0%})" if seconds else f"{name} {t / total:.0%}"
                         for name, t in self.seconds.items())


def write_rows(group: h5py.Group, lo: int, hi: int, feats: np.ndarray, bad: list[int]) -> None:
    """Rows lo..hi of a split's features; rows that could not be decoded are marked for removal."""
    group["features"][:, lo:hi] = feats
    if bad:
        readable = group["readable"][lo:hi]
        readable[bad] = False
        group["readable"][lo:hi] = readable


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def _differences(path: Path, attrs: dict) -> str:
    """How an existing file's identity differs from the one asked for, as 'name: file's → asked'."""
    try:
        with h5py.File(path, "r") as f:
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
            parts += [f"{k}: {a.get(k)} → {b.get(k)}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
        elif key == "dataset_fingerprint":
            parts.append("the images or labels")
        else:
            parts.append(f"{key}: {theirs[key]} → {ours[key]}")
    return "; ".join(parts)


def _matches(path: Path, attrs: dict) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return identity(f.attrs) == identity(attrs)
    except OSError:
        return False  # unreadable (e.g. killed mid-write): not a match


def _drop_skipped(f, splits) -> list[str]:
    """Remove rows whose image could not be decoded, remapping the few-shot subsets; return their paths."""
    skipped = []
    for split in splits:
        group = f[split]
        readable = group["readable"][()]
        del group["readable"]
        if readable.all():
            continue
        skipped += group["paths"].asstr()[()][~readable].tolist()
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
