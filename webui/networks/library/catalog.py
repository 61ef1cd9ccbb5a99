"""The LoRA files under `loras/`, looked up by the name a tag uses. The scan itself (headers,
sidecars, the on-disk cache) is `catalog_index.CatalogIndex`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from webui.networks.library.catalog_index import NETWORK_SUFFIXES, CatalogIndex, NetworkEntry

log = logging.getLogger(__name__)

__all__ = ["NETWORK_SUFFIXES", "NetworkCatalog", "NetworkFile", "UnknownNetworkError"]


@dataclass(frozen=True)
class NetworkFile:
    """A LoRA file: its path and its name (path below `loras/`, no extension, `/` separated)."""

    path: Path
    name: str

    @property
    def stem(self) -> str:
        return self.path.stem


class UnknownNetworkError(LookupError):
    """A tag names no file, or more than one file equally well."""


class NetworkCatalog:
    """Tag-name lookup over a `CatalogIndex` of a LoRA folder. `refresh()` rescans (only changed
    files are re-read); lookups never touch the disk.

    Without `index`, it keeps its own (cached in `cache_file` when given, no background
    hashing); pass the Networks browser's index to share one scan."""

    def __init__(
        self, folder: Path, cache_file: Path | None = None, index: CatalogIndex | None = None
    ) -> None:
        self.folder = folder
        self.index = index or CatalogIndex(folder, cache_file, hash_in_background=False)
        self._files: tuple[NetworkFile, ...] = ()
        self._aliases: dict[Path, str | None] = {}
        self.refresh()

    @property
    def files(self) -> tuple[NetworkFile, ...]:
        return self._files

    def refresh(self) -> None:
        """Rescan the folder."""
        self.index.refresh()
        self._take(self.index.entries())

    def _take(self, entries: tuple[NetworkEntry, ...]) -> None:
        self._files = tuple(NetworkFile(e.path, e.name) for e in entries)
        self._aliases = {e.path: e.alias for e in entries}

    def alias(self, file: NetworkFile) -> str | None:
        """The name the trainer gave (`ss_output_name` in the safetensors metadata), as the
        index read it from the header at the last refresh."""
        return self._aliases.get(file.path)

    def entry(self, file: NetworkFile) -> NetworkEntry | None:
        """The index's entry for a file, with trigger words, preview and base."""
        return next((e for e in self.index.entries() if e.path == file.path), None)

    def trigger_words(self, path: Path) -> tuple[str, ...]:
        """A file's trigger words, as its catalog entry lists them (none for a file not listed)."""
        resolved = path.resolve()
        for entry in self.index.entries():
            if entry.path.resolve() == resolved:
                return tuple(entry.trigger_words)
        return ()

    def resolve(self, name: str) -> NetworkFile:
        """The file a tag's NAME means: the exact path below `loras/` or file name, else a
        case-insensitive match when it is unambiguous, else the `ss_output_name` alias.
        Raises UnknownNetworkError."""
        wanted = name.replace("\\", "/").strip("/")
        for exact in (
            [f for f in self._files if f.name == wanted],
            [f for f in self._files if f.stem == wanted],
            [f for f in self._files if f.name.lower() == wanted.lower()],
            [f for f in self._files if f.stem.lower() == wanted.lower()],
            [f for f in self._files if (self.alias(f) or "").lower() == wanted.lower()],
        ):
            if len(exact) == 1:
                return exact[0]
            if len(exact) > 1:
                choices = ", ".join(f.name for f in exact)
                raise UnknownNetworkError(
                    f"<lora:{name}> matches several files ({choices}); use the folder path"
                )
        raise UnknownNetworkError(f"<lora:{name}>: no LoRA file named {name!r} in {self.folder}")
