"""`fastcoop datasets DATA`: which of CoOp's 15 datasets a $DATA folder holds, read exactly as `fastcoop cache`
reads them, what stops the others, and the command that caches each. It lists folders and reads split files; it
decodes nothing and imports no torch. With check_images it also reads the first bytes of every image and counts
those that are empty or no image format it knows (a quick header check, not a decode)."""

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fastcoop.data import LabelledImages, subfolders
from fastcoop.datasets import DATASETS, CoopDataset, read_coop_dataset, recognise
from fastcoop.errors import FastCoopError

# the leading bytes of the image formats PIL reads for these datasets (WebP: RIFF....WEBP)
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
              b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")
PROTOCOL_SHOTS = "1,2,4,8,16"
CHUNK = 4096  # images per header-checking task


@dataclass
class Found:
    """One dataset of the survey: its folder (None: not there), what was read, or why it could not be."""

    spec: CoopDataset
    folder: Path | None
    data: LabelledImages | None = None
    problem: str = ""
    unreadable: list[str] | None = None  # with check_images: the images whose header is not an image's


def survey(root: str | Path, check_images: bool = False) -> list[Found]:
    """Every one of CoOp's datasets, in the order of its tables: found under its CoOp folder name (or another
    folder whose files are its layout), and read as `fastcoop cache` reads it."""
    root = Path(root)
    if not root.is_dir():
        raise FastCoopError(f"{root} is not a folder (expected CoOp's $DATA folder, holding imagenet/, dtd/, ...)")
    folders = {spec.name: root / spec.folder for spec in DATASETS.values() if (root / spec.folder).is_dir()}
    for name in subfolders(root):
        spec = recognise(root / name)
        if spec is not None and spec.name not in folders:
            folders[spec.name] = root / name
    found = []
    for spec in DATASETS.values():
        folder = folders.get(spec.name)
        if folder is None:
            found.append(Found(spec, None))
            continue
        try:
            item = Found(spec, folder, read_coop_dataset(folder, spec))
        except FastCoopError as exc:
            found.append(Found(spec, folder, problem=str(exc)))
            continue
        if check_images:
            item.unreadable = unreadable_images(sorted({p for items in item.data.splits.values() for p, _ in items}))
        found.append(item)
    return found


def unreadable_images(paths: list[str]) -> list[str]:
    """The paths whose first bytes are no image format's (empty, truncated to nothing, an HTML error page ...).
    Chunks of paths go to a few threads: a cold disk answers several reads at once faster than one by one."""
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        return [path for bad in pool.map(_unreadable, chunks) for path in bad]


def _unreadable(paths: list[str]) -> list[str]:
    bad = []
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            bad.append(path)
            continue
        try:
            head = os.read(fd, 12)
        except OSError:
            head = b""
        finally:
            os.close(fd)
        if not (head.startswith(SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")):
            bad.append(path)
    return bad


def survey_table(found: list[Found], root: Path) -> str:
    """The survey as Markdown: a row per dataset, what is wrong with each that cannot be read, and the commands
    that cache those that can."""
    checked = any(f.unreadable is not None for f in found)
    lines = ["| dataset | folder | classes | train | val | test | " + ("unreadable | " if checked else "") + "status |",
             "|" + " --- |" * (8 if checked else 7)]
    problems, commands = [], []
    for f in found:
        folder = os.path.relpath(f.folder, root) if f.folder else "–"
        if f.data is None:
            status = "missing" if f.folder is None else f"cannot be read ({len(problems) + 1})"
            if f.folder is not None:
                problems.append(f"({len(problems) + 1}) {f.spec.name}: {f.problem}")
            lines.append(f"| {f.spec.name} | {folder} | – | – | – | – | " + ("– | " if checked else "")
                         + f"{status} |")
            continue
        counts = [_count(f.data, split) for split in ("train", "val", "test")]
        bad = len(f.unreadable or [])
        status = "ok" if not bad else f"{bad:,} unreadable, e.g. {os.path.relpath(f.unreadable[0], f.folder)}"
        lines.append(f"| {f.spec.name} | {folder} | {len(f.data.classnames)} | {' | '.join(counts)} | "
                     + (f"{bad:,} | " if checked else "") + f"{status} |")
        commands.append(cache_command(f))
    found_count = sum(f.folder is not None for f in found)
    out = [f"{found_count} of CoOp's {len(found)} datasets found in {root}"
           + ("" if checked else " (images listed, not opened: --check-images reads each one's header)"), ""]
    out += lines
    if problems:
        out += ["", "What stops the datasets that cannot be read:", *problems]
    if commands:
        out += ["", "To cache each dataset found (the papers' protocol: shots 1–16, seeds 1–3):", *commands]
    return "\n".join(out)


def cache_command(found: Found) -> str:
    """The `fastcoop cache` command for a dataset: the whole few-shot protocol and, where a val split of its own
    exists, val too (the linear probe selects on it); test alone for the domain-shift targets."""
    spec, folder = found.spec, found.folder
    command = f"fastcoop cache {folder} --out {spec.name}.h5"
    if spec.test_only:
        return command
    splits = "train,val,test" if spec.name != "imagenet" else "train,test"  # ImageNet's val is its test set
    return f"{command} --shots {PROTOCOL_SHOTS} --splits {splits}"


def _count(data: LabelledImages, split: str) -> str:
    if split not in data.splits:
        return "–"
    if split == "val" and data.splits["val"] is data.splits.get("test"):
        return "= test"
    return f"{len(data.splits[split]):,}"
