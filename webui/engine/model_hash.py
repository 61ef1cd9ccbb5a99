"""A1111's "Model hash": the first 10 hex digits of the checkpoint file's sha256, cached on disk
by path, size and modification time so multi-GB files are hashed once."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from webui.networks.format import compute_hashes

log = logging.getLogger(__name__)


class HashCache:
    """Full sha256 digests keyed by (path, size, mtime), persisted in one JSON file."""

    def __init__(self, cache_file: Path | None = None) -> None:
        self._file = cache_file
        self._lock = threading.Lock()
        self._digests: dict[str, str] | None = None

    def _loaded(self) -> dict[str, str]:
        if self._digests is None:
            self._digests = {}
            if self._file is not None and self._file.is_file():
                try:
                    self._digests = dict(json.loads(self._file.read_text(encoding="utf-8")))
                except (OSError, ValueError):
                    log.warning("ignoring unreadable hash cache %s", self._file)
        return self._digests

    def sha256(self, path: Path) -> str:
        """The file's full sha256, computed once per content version."""
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        with self._lock:
            digests = self._loaded()
            if key not in digests:
                digests[key] = compute_hashes(path).sha256
                if self._file is not None:
                    self._file.parent.mkdir(parents=True, exist_ok=True)
                    self._file.write_text(json.dumps(digests, indent=0), encoding="utf-8")
            return digests[key]

    def model_hash(self, path: Path | None) -> str | None:
        """AutoV2 short hash of a single-file checkpoint; None for folders and the demo model."""
        if path is None or not path.is_file():
            return None
        return self.sha256(path)[:10]
