"""Where commands write: checked before any work, so a bad location is one clear line, not a traceback later."""

import os
from pathlib import Path

from fastcoop.errors import FastCoopError


def check_writable(path: str | Path, what: str) -> None:
    """`path` (a file or folder to write, maybe not there yet) can be written: its nearest existing ancestor is a
    writable folder. `what` names it in the message."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise FastCoopError(f"cannot write {what} {path}: {folder} is a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FastCoopError(f"cannot write {what} {path}: {folder} is not writable")
