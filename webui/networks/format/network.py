"""A Network: one LoRA file read into typed modules, with its metadata and detected base.
`load_network` keeps recently used files in memory, keyed by path, size and mtime."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from webui.networks.format.base_detection import BaseDetection, detect_base
from webui.networks.format.files import NetworkFileError, load_file_contents
from webui.networks.format.modules import (
    InvalidModuleError,
    NetworkModule,
    UnsupportedModuleError,
    Variant,
    group_by_module,
    parse_module,
)
from webui.networks.format.peft_metadata import read_peft_alphas

log = logging.getLogger(__name__)

CACHE_SIZE = 8


@dataclass(frozen=True, eq=False)
class Network:
    """A LoRA file in memory. Identity (not value) equality: two loads of a changed file differ."""

    path: Path
    name: str
    metadata: Mapping[str, str]
    modules: Mapping[str, NetworkModule]  # file key prefix -> module
    unsupported: Mapping[str, tuple[str, ...]]  # prefix -> keys no variant understands
    base: BaseDetection
    # A1111's LoRA hash of the bytes that were loaded (None for pickles, which it hashes whole)
    autov3: str | None = None

    @property
    def variants(self) -> tuple[Variant, ...]:
        """The variants present, in a stable order."""
        return tuple(sorted({m.variant for m in self.modules.values()}, key=lambda v: v.value))


def network_name(path: Path) -> str:
    """A file's network name: its file name without extension (what `<lora:NAME>` matches)."""
    return path.stem


def read_network(path: Path, *, dyn: int | None = None) -> Network:
    """Read a LoRA file into typed modules. Raises NetworkFileError for unreadable files and for
    files with a malformed module (its message names the key and what is wrong); keys no variant
    understands are collected (and reported by the patcher), not fatal."""
    contents = load_file_contents(path)
    tensors, metadata = contents.tensors, contents.metadata
    modules: dict[str, NetworkModule] = {}
    unsupported: dict[str, tuple[str, ...]] = {}
    invalid: list[InvalidModuleError] = []
    peft_alphas = read_peft_alphas(metadata)
    for prefix, group in group_by_module(tensors).items():
        alpha = peft_alphas.alpha_for(prefix)
        if alpha is not None and "alpha" not in group:
            group = {**group, "alpha": torch.tensor(alpha)}
        try:
            modules[prefix] = parse_module(prefix, group, dyn=dyn)
        except UnsupportedModuleError:
            unsupported[prefix] = tuple(sorted(group))
        except InvalidModuleError as error:
            invalid.append(error)
    if invalid:
        more = f" (and {len(invalid) - 1} more malformed module(s))" if len(invalid) > 1 else ""
        raise NetworkFileError(path, f"malformed module {invalid[0]}{more}")
    shapes = {key: tuple(t.shape) for key, t in tensors.items()}
    base = detect_base(metadata, shapes)
    return Network(path, network_name(path), metadata, modules, unsupported, base, contents.autov3)


_cache: OrderedDict[tuple[str, int, int, int | None], Network] = OrderedDict()
_cache_lock = threading.Lock()


def load_network(path: str | os.PathLike[str], *, dyn: int | None = None) -> Network:
    """Read a LoRA file, or return it from the in-memory LRU cache if unchanged on disk.
    Raises NetworkFileError (naming the file) and nothing else for a bad or missing file."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as error:  # e.g. deleted after the catalog scan
        raise NetworkFileError(path, f"cannot read: {error.strerror or error}") from error
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, dyn)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    network = read_network(path, dyn=dyn)
    with _cache_lock:
        _cache[key] = network
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return network
