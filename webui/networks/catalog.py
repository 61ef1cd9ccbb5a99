"""The LoRA files under `loras/`: found by a recursive scan, looked up by the name a tag uses.

The only module that walks `loras/`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from webui.networks.files import NetworkFileError, read_metadata

log = logging.getLogger(__name__)

NETWORK_SUFFIXES = (".safetensors", ".pt", ".ckpt")


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
    """Index of a LoRA folder. `refresh()` rescans; lookups never touch the disk."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files: tuple[NetworkFile, ...] = ()
        self._aliases: dict[tuple[Path, int, int], str | None] = {}
        self.refresh()

    @property
    def files(self) -> tuple[NetworkFile, ...]:
        return self._files

    def refresh(self) -> None:
        """Rescan the folder."""
        if not self.folder.is_dir():
            self._files = ()
            return
        found = [
            NetworkFile(path, path.relative_to(self.folder).with_suffix("").as_posix())
            for path in sorted(self.folder.rglob("*"))
            if path.suffix.lower() in NETWORK_SUFFIXES and path.is_file()
        ]
        self._files = tuple(found)

    def alias(self, file: NetworkFile) -> str | None:
        """The name the trainer gave (`ss_output_name` in the safetensors metadata), read from
        the header only and cached by size and modification time."""
        if file.path.suffix.lower() != ".safetensors":
            return None
        stat = file.path.stat()
        key = (file.path, stat.st_size, stat.st_mtime_ns)
        if key not in self._aliases:
            try:
                self._aliases[key] = read_metadata(file.path).get("ss_output_name") or None
            except NetworkFileError:
                self._aliases[key] = None
        return self._aliases[key]

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
