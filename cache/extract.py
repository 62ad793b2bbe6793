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

import json
import os
import signal
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fastcoop.cache import writer
from fastcoop.cache.crops import COOP_SCALE
from fastcoop.cache.encoder import ImageEncoder
from fastcoop.cache.plan import auto_views, cache_attrs, crop_engine, dataset_fingerprint, default_workers, plan_rows
from fastcoop.cache.views import ImageViews, cut_views, split_eval_transform
from fastcoop.data import LabelledImages
from fastcoop.devices import autocast_dtype
from fastcoop.distributed import World
from fastcoop.errors import FastCoopError
from fastcoop.models import LoadedModel

__all__ = ["auto_views", "dataset_fingerprint", "default_workers", "extract_features"]


def extract_features(data: LabelledImages, out: str | Path, loaded: LoadedModel, *, splits=("train", "test"),
                     shots: int | list[int] | None = 16, seeds=(1, 2, 3), views: int | str = "auto",
                     batch_size: int = 256,
                     workers: int | None = None, device: str = "cpu", precision: str = "fp32",
                     skip_bad: bool = False, overwrite: bool = False, progress: bool = True,
                     world: World = World(), crops: str = "auto", verbose: bool = False,
                     encoder: str = "eager", crop_scale: tuple[float, float] = COOP_SCALE,
                     on_start=None) -> Path:
    """Encode the chosen splits into `out`; resume an unfinished run; refuse to reuse a mismatched finished file.

    `shots`: a shot count or several (their subsets share the cached images), None for the whole train split.
    `views`: augmented views per train image besides the eval view; "auto" gives one per epoch of the longest
    published schedule among `shots`. `batch_size`: views per encoder call (an image's views stay in one batch).
    `crops`: where the augmented views are cut, 'pil' (in the decoding workers, the published computation) or
    'device' (where the encoder runs, equal to PIL's); 'auto' is 'device' on a GPU. `verbose`: the progress bar
    also shows each stage's share of the time, and the end says where it went. `encoder`: 'graph' replays the
    image encoder from a CUDA graph (encoder.ImageEncoder). `crop_scale`: the augmented views' crop areas as
    fractions of the image (CoOp's 0.08–1; Tip-Adapter's own code crops at 0.5–1). `on_start()`: called (by the
    writing process) once every check has passed and there is work to do, so that what a caller says of it
    never comes before an error."""
    out = Path(out)
    splits = _present(data, splits, world)
    shot_list = None if shots is None or "train" not in splits else sorted({shots} if isinstance(shots, int)
                                                                            else set(shots))
    if views == "auto":
        views = auto_views(shot_list, len(data.classnames)) if "train" in splits else 0
    engine = crop_engine(crops, device) if views else "pil"
    rows, subsets, short = plan_rows(data, splits, shot_list, list(seeds))
    attrs = cache_attrs(data, loaded, splits, shot_list, seeds, views, engine, subsets, short, crop_scale)
    views_of = {split: 1 + (views if split == "train" else 0) for split in splits}
    job = _Job(loaded, json.loads(attrs["preprocessing"]), views_of, batch_size,
               default_workers(device) if workers is None else workers, device, precision, skip_bad,
               progress and world.is_writer, world, engine, verbose, encoder, crop_scale)
    partial = out.with_name(out.name + ".partial")
    plan, f = None, None
    if world.is_writer:
        try:
            plan, f = writer.open_for_writing(out, partial, attrs, overwrite,
                                              lambda f: job.prepare_splits(f, data, rows, subsets))
        except (FastCoopError, OSError) as exc:
            plan = writer.failure(exc, partial)
    plan = world.from_writer(plan)
    if isinstance(plan, str):
        raise FastCoopError(plan)
    if plan is None:  # a finished file with these settings exists
        return out
    if on_start is not None and world.is_writer:
        on_start()
    if job.progress:
        job.announce(rows, plan)
    try:
        for split in splits:
            job.run_split(f, split, [data.split(split)[i] for i in rows[split]], plan[split])
        if f is not None:
            writer.finish(f, splits)
    finally:
        if f is not None:
            f.close()
    if world.is_writer:
        os.replace(partial, out)
        if verbose and job.stages.seconds:
            tqdm.write(f"time: {job.stages.describe(seconds=True)}")
    world.from_writer(None)  # every rank returns once the file is in place
    return out


def _present(data: LabelledImages, splits, world: World) -> list[str]:
    """The asked splits the dataset has images in (a warning names the others; none at all is an error)."""
    missing = [s for s in splits if not data.splits.get(s)]
    if len(missing) == len(splits):
        data.split(missing[0])  # the clear error for a split the dataset lacks
        raise FastCoopError(f"the dataset's {missing[0]} split holds no images")
    present = [s for s in splits if s not in missing]
    if missing and world.is_writer:
        warnings.warn(f"the dataset has no images in its {', '.join(missing)} split; caching {', '.join(present)} "
                      "only")
    return present


def _leave_signals_to_the_command(worker_id: int) -> None:
    """A decoding worker ignores SIGINT and SIGTERM: a terminal's Ctrl-C, `timeout` and batch schedulers signal the
    whole process group, and the command, not its workers, decides what ends (it stops them as it exits)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

class _Job:
    """What every split's extraction shares: the model, its transforms, the batching and the writer."""

    def __init__(self, loaded, pre, views_of, batch_size, workers, device, precision, skip_bad, progress, world,
                 engine="pil", verbose=False, encoder="eager", crop_scale=COOP_SCALE):
        self.loaded, self.pre, self.views_of, self.batch_size = loaded, pre, views_of, batch_size
        self.workers, self.device, self.skip_bad, self.progress, self.world = workers, device, skip_bad, progress, world
        self.engine, self.verbose, self.stages = engine, verbose, Stages(synchronize=verbose)
        self.crop_scale = crop_scale
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

    def prepare_splits(self, f, data: LabelledImages, rows: dict, subsets: dict) -> dict[str, int]:
        """Each split's datasets created where new (writer.create_split); how many images of each are written."""
        done = {}
        for split, split_rows in rows.items():
            items = [data.split(split)[i] for i in split_rows]
            done[split] = writer.create_split(f, split, items, subsets.get(split, {}), self.views_of[split],
                                              self.feature_dim, self.images_per_batch(split))
            if 0 < done[split] < len(items) and self.progress:
                tqdm.write(f"resuming {f.filename}: {split} from image {done[split]} of {len(items)}")
        return done

    def feature_dim(self) -> int:
        dim = getattr(self.loaded.model.visual, "output_dim", None)
        return dim or self.encode(torch.zeros(1, 1, 3, *self.pre["size"], dtype=torch.uint8)).array().shape[-1]

    def announce(self, rows, done):
        """The work ahead before it starts: images, views and the size of their features. No time is promised
        here: a probe short enough to be worth it is dominated by per-call costs (tens of times too long for a
        small model); the progress bar's rate and remaining time, from the real batches, say it."""
        encodes = sum((len(rows[s]) - done[s]) * self.views_of[s] for s in rows)
        if not encodes:
            return
        parts = ", ".join(f"{s} {len(rows[s]) - done[s]} images × {self.views_of[s]} view(s)" for s in rows)
        size = encodes * self.feature_dim() * 2
        size = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
        tqdm.write(f"to encode: {parts} = {encodes:,} views, {size} of features (the bar shows the time left)")

    def run_split(self, f, split, items, start: int):
        """Encode rows start.. of a split: this rank's share of the batches, written in order by the writer."""
        n, per_image, world = len(items), self.views_of[split], self.world
        if start == n:
            return
        step = self.images_per_batch(split)
        batches = [list(range(lo, min(lo + step, n))) for lo in range(start, n, step)]
        engine = self.engine if per_image > 1 else "pil"  # nothing to cut without augmented views
        dataset = ImageViews([p for p, _ in items], self.eval_image, per_image - 1, split, self.pre["size"], engine,
                             self.crop_scale)
        mine = batches[world.rank::world.size]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=mine, num_workers=min(self.workers, len(mine)),
                                             collate_fn=dataset.collate, pin_memory=self.device.startswith("cuda"),
                                             worker_init_fn=_leave_signals_to_the_command)
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
            return writer.failure(exc, Path(f.filename))

    def _write(self, f, group, items, payloads, bar, per_image) -> str | None:
        """Write gathered batches in row order; a decode error without --skip-bad stops before writing."""
        for lo, _, _, errors in payloads:
            bad = [i for i, e in enumerate(errors) if e]
            if bad and not self.skip_bad:
                return (f"cannot read image {items[lo + bad[0]][0]} ({errors[bad[0]]}); fix or remove it, "
                        "or pass --skip-bad")
        for lo, hi, feats, errors in payloads:
            writer.write_rows(group, lo, hi, feats.array() if isinstance(feats, Features) else feats,
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
