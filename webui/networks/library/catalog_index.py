"""The browsable index of `loras/`: one `NetworkEntry` per file, built from safetensors headers
and sidecar files, cached on disk and refreshed incrementally; hashes filled in the background.

The walk of `loras/` lives here; `catalog.py` resolves tag names on top of it."""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import webui.networks.library.previews as previews
import webui.networks.library.sidecars as sidecars
from webui.networks.format.files import (
    NetworkFileError,
    compute_hashes,
)
from webui.networks.library.entries import NetworkEntry
from webui.networks.library.header_facts import (
    guarded_header_facts,
    make_entry,
    sidecar_facts,
)
from webui.networks.library.index_cache import CACHE_VERSION, BadRecord, Record, SidecarStamp

log = logging.getLogger(__name__)

NETWORK_SUFFIXES = (".safetensors", ".pt", ".ckpt")
ENTRIES_REBUILD_SECONDS = 0.25


# -- the walk ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Found:
    """A network file seen by the walk, with the stamps of its sidecars."""

    relative: str
    path: str  # a string: building a Path per file was a sixth of a warm start
    size: int
    mtime: float
    mtime_ns: int
    sidecar_stamp: SidecarStamp
    names_in_folder: frozenset[str]


_SIDE_SUFFIXES = (
    sidecars.USER_METADATA_SUFFIX,
    sidecars.CIVITAI_INFO_SUFFIX,
    *(f".preview{suffix}" for suffix in previews.IMAGE_SUFFIXES),
    *previews.IMAGE_SUFFIXES,
)


def _side_files_by_stem(names: Collection[str]) -> dict[str, tuple[str, ...]]:
    """The files of one folder listing that may be sidecars or previews of a network called
    `stem` (a name can fit two stems: `a.preview.png` also fits a network `a.preview`). One pass
    over the listing instead of a lookup per candidate name per network."""
    found: dict[str, list[str]] = {}
    for name in names:
        if name.endswith(_SIDE_SUFFIXES):
            for suffix in _SIDE_SUFFIXES:
                if name.endswith(suffix):
                    found.setdefault(name[: -len(suffix)], []).append(name)
    return {stem: tuple(sorted(side)) for stem, side in found.items()}


def _walk(folder: Path) -> Iterator[_Found]:
    """Every network file below `folder` (sub-folders too, symlinked ones followed once; hidden
    folders skipped), one directory listing per folder and one stat per file and sidecar."""
    visited: set[tuple[int, int]] = set()
    pending: list[tuple[str, str]] = [(str(folder), "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            stat = os.stat(directory)
            if (stat.st_dev, stat.st_ino) in visited:
                continue
            visited.add((stat.st_dev, stat.st_ino))
            with os.scandir(directory) as listing:
                children = list(listing)
        except OSError as error:
            log.warning("cannot list %s: %s", directory, error)
            continue
        by_name = {child.name: child for child in children}
        names = frozenset(by_name)
        side_files = _side_files_by_stem(names)
        for child in children:
            try:
                if child.is_dir():
                    if not child.name.startswith("."):
                        pending.append((child.path, f"{prefix}{child.name}/"))
                    continue
                if not child.name.lower().endswith(NETWORK_SUFFIXES) or not child.is_file():
                    continue
                stat = child.stat()
            except OSError as error:
                log.warning("cannot stat %s: %s", child.path, error)
                continue
            stem = child.name.rsplit(".", 1)[0]
            stamp: list[tuple[str, int]] = []
            for side_name in side_files.get(stem, ()):
                try:
                    stamp.append((side_name, by_name[side_name].stat().st_mtime_ns))
                except OSError:
                    continue
            yield _Found(
                relative=prefix + child.name,
                path=child.path,
                size=stat.st_size,
                mtime=stat.st_mtime,
                mtime_ns=stat.st_mtime_ns,
                sidecar_stamp=tuple(stamp),
                names_in_folder=names,
            )


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: a scan allocates many small objects and no cycles,
    and repeated collections over them were a third of a warm start."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        # no gc.freeze() here: it makes every object alive at that moment immortal to the
        # collector, the loaded model's included, so a model switch leaked the old one
        if enabled:
            gc.enable()


def _sort_key(relative: str) -> tuple[str, ...]:
    return tuple(relative.split("/"))


# -- the index --------------------------------------------------------------------------------


class CatalogIndex:
    """The networks below `folder`, cached in `cache_file` (None: in memory only).

    `refresh()` re-reads only files whose size or mtime changed (and only the sidecars when only
    a sidecar changed), drops deleted ones and saves the cache when anything changed. With
    `hash_in_background`, each refresh starts a thread that hashes files not hashed yet; the
    hashes land in the cache and in the entries' `autov2`/`autov3`."""

    def __init__(
        self, folder: Path, cache_file: Path | None = None, *, hash_in_background: bool = True
    ) -> None:
        self.folder = Path(folder)
        self.cache_file = Path(cache_file) if cache_file is not None else None
        self.hash_in_background = hash_in_background
        self._lock = threading.RLock()  # guards _records and _entries
        self._refresh_lock = threading.Lock()
        self._records: dict[str, Record] | None = None  # None: never scanned
        self._entries: tuple[NetworkEntry, ...] = ()
        self._hash_thread: threading.Thread | None = None
        self._hash_failed: set[tuple[str, int, int]] = set()

    # -- scanning

    def entries(self) -> tuple[NetworkEntry, ...]:
        """Every network, sorted by path; scans on first use, never touches the disk after."""
        if self._records is None:
            self.refresh()
        return self._entries

    def refresh(self) -> None:
        """Rescan the folder incrementally (see the class docstring)."""
        with self._refresh_lock, _gc_paused():
            old = self._records if self._records is not None else self._load_cache()
            records: dict[str, Record] = {}
            changed = False
            for found in _walk(self.folder) if self.folder.is_dir() else ():
                record = old.get(found.relative)
                if record is None or (record.size, record.mtime_ns) != (
                    found.size,
                    found.mtime_ns,
                ):
                    record = Record(
                        relative=found.relative,
                        size=found.size,
                        mtime_ns=found.mtime_ns,
                        sidecar_stamp=found.sidecar_stamp,
                        header=guarded_header_facts(Path(found.path)),
                        side=sidecar_facts(Path(found.path), found.names_in_folder),
                    )
                    changed = True
                elif record.sidecar_stamp != found.sidecar_stamp:
                    record = replace(
                        record,
                        sidecar_stamp=found.sidecar_stamp,
                        side=sidecar_facts(Path(found.path), found.names_in_folder),
                        entry=None,
                    )
                    changed = True
                if record.entry is None:
                    record.entry = make_entry(
                        record.relative,
                        Path(found.path),
                        record.size,
                        found.mtime,
                        record.header,
                        record.side,
                        record.hashes,
                    )
                records[found.relative] = record
            changed = changed or len(records) != len(old)
            with self._lock:
                self._records = records
                self._rebuild_entries()
            if changed:
                self._save_cache()
        if self.hash_in_background:
            self.start_hashing()

    # -- the cache file

    def _load_cache(self) -> dict[str, Record]:
        if self.cache_file is None or not self.cache_file.is_file():
            return {}
        try:
            data = json.loads(self.cache_file.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
                raise BadRecord("not a catalog cache")
        except (OSError, ValueError, RecursionError) as error:
            log.warning("ignoring unreadable catalog cache %s: %s", self.cache_file, error)
            return {}
        if data.get("version") != CACHE_VERSION or data.get("folder") != str(self.folder):
            return {}
        records: dict[str, Record] = {}
        for relative, raw in data["files"].items():
            try:
                records[relative] = Record.from_json(relative, raw)
            except (BadRecord, KeyError, TypeError) as error:  # that file is read again
                log.warning("ignoring damaged cache record of %s: %s", relative, error)
        return records

    def _save_cache(self) -> None:
        if self.cache_file is None:
            return
        with self._lock:
            data = {
                "version": CACHE_VERSION,
                "folder": str(self.folder),
                "files": {k: r.to_json() for k, r in (self._records or {}).items()},
            }
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.cache_file.with_name(
                f"{self.cache_file.name}.{os.getpid()}.{threading.get_ident()}.tmp"
            )
            temporary.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
            os.replace(temporary, self.cache_file)
        except OSError as error:
            log.warning("cannot write catalog cache %s: %s", self.cache_file, error)

    # -- hashes

    def start_hashing(self) -> None:
        """Hash every file not hashed yet, in a background thread (one at a time)."""
        with self._lock:
            if self._hash_thread is not None and self._hash_thread.is_alive():
                return
            self._hash_thread = threading.Thread(
                target=self._hash_pending, name="catalog-hashes", daemon=True
            )
            self._hash_thread.start()

    def wait_for_hashes(self, timeout: float | None = None) -> bool:
        """Block until the background hashing is done; False when `timeout` ran out first."""
        thread = self._hash_thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _pending_hashes(self) -> list[tuple[str, int, int]]:
        with self._lock:
            return [
                (r.relative, r.size, r.mtime_ns)
                for r in (self._records or {}).values()
                if r.hashes is None
                and r.header.error is None
                and (r.relative, r.size, r.mtime_ns) not in self._hash_failed
            ]

    def _hash_pending(self) -> None:
        hashed = 0
        rebuilt_at = time.monotonic()
        while pending := self._pending_hashes():
            for relative, size, mtime_ns in pending:
                stamp = (relative, size, mtime_ns)
                try:
                    hashes = compute_hashes(self.folder / relative)
                except NetworkFileError as error:
                    log.warning("cannot hash %s", error)
                    self._hash_failed.add(stamp)
                    continue
                with self._lock:
                    record = (self._records or {}).get(relative)
                    if record is None or (record.size, record.mtime_ns) != (size, mtime_ns):
                        self._hash_failed.add(stamp)  # changed under us; the next refresh
                        continue
                    record.hashes = hashes
                    if record.entry is not None:
                        record.entry = replace(
                            record.entry, autov2=hashes.autov2, autov3=hashes.autov3
                        )
                    # Rebuilding the tuple per file would be quadratic; a few times a second is
                    # plenty for a browser.
                    if time.monotonic() - rebuilt_at > ENTRIES_REBUILD_SECONDS:
                        self._rebuild_entries()
                        rebuilt_at = time.monotonic()
                hashed += 1
        if hashed:
            with self._lock:
                self._rebuild_entries()
            self._save_cache()

    def _rebuild_entries(self) -> None:
        records = self._records or {}
        self._entries = tuple(
            records[key].entry  # type: ignore[misc]
            for key in sorted(records, key=_sort_key)
        )
