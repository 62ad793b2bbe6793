"""Where commands write: checked before any work, so a bad location is one clear line, not a traceback later; and
held while written, so that two commands never write one output."""

import errno
import fcntl
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from fastcoop.errors import FastCoopError

_held: set[Path] = set()  # outputs this process holds (holding one again is a no-op)
_BUSY = (errno.EACCES, errno.EAGAIN)  # what a refused non-blocking lockf raises


def check_writable(path: str | Path, what: str, folder: bool | None = None, option: str = "--out") -> None:
    """`path` (a file or folder to write, maybe not there yet) can be written: no other command is writing it (a
    look at its lock, so that a second command is refused before it loads anything; `held` takes the lock), its
    nearest existing ancestor is a writable folder, and what is there already is of the kind written (`folder`
    True: a folder; False: a file; None: either). `what` and `option` name it in the messages."""
    path = Path(path)
    writer = None if path.absolute() in _held else holder(path)
    if writer is not None:
        raise FastCoopError(_being_written(path.absolute(), writer, option))
    if folder is True and path.exists() and not path.is_dir():
        raise FastCoopError(f"cannot write {what} {path}: it is a file, not a folder")
    if folder is False and path.is_dir():
        raise FastCoopError(f"cannot write {what} {path}: it is a folder")
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise FastCoopError(f"cannot write {what} {path}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FastCoopError(f"cannot write {what} {path}: {parent} is not writable")
    try:  # what the permissions do not tell (a read-only mount, /proc): a file made and removed there
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        raise FastCoopError(f"cannot write {what} {path}: {parent} takes no files ({exc.strerror or exc})") from None


def _being_written(path: Path, writer: str, option: str) -> str:
    return (f"{path} is being written by another fastcoop command (process {writer}); wait for it to end, or "
            f"choose another {option}")


def _lock_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def holder(path: str | Path) -> str | None:
    """The process writing the output `path` now (as its lock file names it), or None when no command holds it.
    Reads only: creates nothing."""
    path = Path(path).absolute()
    if path in _held:  # never opened and closed here: closing any descriptor of the file would drop our lock
        return str(os.getpid())
    try:
        fd = os.open(_lock_file(path), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # free: closing the file lets go of the lock taken to look
    except OSError as exc:
        if exc.errno not in _BUSY:
            raise
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)


@contextmanager
def held(path: str | Path, option: str = "--out"):
    """Hold the output `path` for this process while it is written: another fastcoop command asking for it fails
    at once with one line, instead of both writing. A POSIX record lock (lockf) on `.NAME.lock` beside it: the OS
    releases it however the process ends, and forked children (decoding workers) do not inherit it, as they would
    an flock, so a killed command never blocks its own resume while its workers wind down."""
    path = Path(path).absolute()
    if path in _held:
        yield
        return
    lock = _lock_file(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in _BUSY:
                raise
            writer = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FastCoopError(_being_written(path, writer, option)) from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the last holder removed the file between our open and our lock: take the new one
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _held.add(path)
    try:
        yield
    finally:
        _held.discard(path)
        lock.unlink(missing_ok=True)  # while still locked, so nobody holds the file being removed
        os.close(fd)
