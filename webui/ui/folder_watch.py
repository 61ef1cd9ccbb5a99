"""Notice that `loras/` changed without reading it: the modification times of the folder and
its sub-folders change when a file is added, removed or renamed in them."""

from __future__ import annotations

import os
import threading
from pathlib import Path

Stamp = tuple[tuple[str, int], ...]


def folder_stamp(folder: Path) -> Stamp:
    """(path, mtime in ns) of the folder and every folder below it; empty when it is missing.
    Only directories are stat'ed: cheap even for thousands of files."""
    stamp: list[tuple[str, int]] = []
    pending = [str(folder)]
    while pending:
        path = pending.pop()
        try:
            stamp.append((path, os.stat(path).st_mtime_ns))
            with os.scandir(path) as entries:
                pending.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
        except OSError:  # gone or unreadable meanwhile: the next look sees the change
            continue
    return tuple(sorted(stamp))


class FolderWatch:
    """`changed()` is true once per change of the folder's stamp (and on the first call)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._seen: Stamp | None = None
        self._lock = threading.Lock()

    def changed(self) -> bool:
        stamp = folder_stamp(self.folder)
        with self._lock:
            if stamp == self._seen:
                return False
            self._seen = stamp
            return True
