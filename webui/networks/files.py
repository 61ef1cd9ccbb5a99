"""LoRA files on disk: safetensors headers and metadata (read without loading tensors), the
AutoV2/AutoV3 hashes A1111 and civitai show, and tensor loading for safetensors and pickles."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = frozenset({".safetensors"})
PICKLE_SUFFIXES = frozenset({".pt", ".ckpt", ".pth", ".bin"})

# The safetensors format itself refuses headers above 100 MB; a larger length means garbage.
MAX_HEADER_BYTES = 100 * 1024 * 1024
HASH_CHUNK_BYTES = 1024 * 1024
_LENGTH_BYTES = 8


class NetworkFileError(Exception):
    """A LoRA file that cannot be read: truncated, not the format its name says, or unsafe."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header; offsets are relative to the data section."""

    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]


@dataclass(frozen=True)
class SafetensorsHeader:
    """A safetensors header. `header_size` is the JSON length stored in the first 8 bytes."""

    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    header_size: int

    @property
    def data_start(self) -> int:
        """Byte offset of the first tensor byte (where AutoV3 starts hashing)."""
        return _LENGTH_BYTES + self.header_size

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape."""
        return {name: info.shape for name, info in self.tensors.items()}


@dataclass(frozen=True)
class FileHashes:
    """Hashes of one file, as A1111 and civitai compute them.

    `sha256` covers the whole file; `autov2` is its first 10 hex digits. `addnet_sha256` (the
    kohya "sshs" hash) covers the bytes after the safetensors header; `autov3` is its first 12
    hex digits. Both are None for pickle files, which A1111 hashes whole.
    """

    sha256: str
    addnet_sha256: str | None

    @property
    def autov2(self) -> str:
        return self.sha256[:10]

    @property
    def autov3(self) -> str | None:
        return None if self.addnet_sha256 is None else self.addnet_sha256[:12]


def is_safetensors(path: str | os.PathLike[str]) -> bool:
    """True when the file name says safetensors."""
    return Path(path).suffix.lower() in SAFETENSORS_SUFFIXES


def _read_header_length(handle: BinaryIO, path: Path, file_size: int) -> int:
    raw = handle.read(_LENGTH_BYTES)
    if len(raw) < _LENGTH_BYTES:
        raise NetworkFileError(path, f"too short for a safetensors file ({file_size} bytes)")
    length = int.from_bytes(raw, "little")
    if length > MAX_HEADER_BYTES:
        raise NetworkFileError(path, f"not a safetensors file (header length {length})")
    if _LENGTH_BYTES + length > file_size:
        raise NetworkFileError(
            path, f"truncated: header needs {length} bytes, file has {file_size - _LENGTH_BYTES}"
        )
    return length


def _tensor_info(path: Path, name: str, entry: Any) -> TensorInfo:
    if not isinstance(entry, dict):
        raise NetworkFileError(path, f"malformed header entry for tensor {name!r}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    valid = (
        isinstance(dtype, str)
        and isinstance(shape, list)
        and all(isinstance(d, int) and d >= 0 for d in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    )
    if not valid:
        raise NetworkFileError(path, f"malformed header entry for tensor {name!r}: {entry!r}")
    return TensorInfo(dtype=dtype, shape=tuple(shape), data_offsets=(offsets[0], offsets[1]))


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read a safetensors header (no tensor data). Raises NetworkFileError naming the file when
    it is truncated, garbage, or its tensors point past its end."""
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with path.open("rb") as handle:
            length = _read_header_length(handle, path, file_size)
            raw = handle.read(length)
    except OSError as error:
        raise NetworkFileError(path, f"cannot read: {error}") from error
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise NetworkFileError(
            path, f"not a safetensors file (bad header JSON: {error})"
        ) from error
    if not isinstance(parsed, dict):
        raise NetworkFileError(path, "not a safetensors file (header is not a JSON object)")

    raw_metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(raw_metadata, dict):
        raise NetworkFileError(path, "malformed __metadata__ (not a JSON object)")
    # The format allows only strings; stringify anything else rather than refusing the file.
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in raw_metadata.items()}
    tensors = {name: _tensor_info(path, name, entry) for name, entry in parsed.items()}

    data_size = file_size - _LENGTH_BYTES - length
    data_end = max((info.data_offsets[1] for info in tensors.values()), default=0)
    if data_end > data_size:
        raise NetworkFileError(
            path, f"truncated: tensors need {data_end} data bytes, file has {data_size}"
        )
    return SafetensorsHeader(metadata=metadata, tensors=tensors, header_size=length)


def compute_hashes(path: str | os.PathLike[str], chunk_bytes: int = HASH_CHUNK_BYTES) -> FileHashes:
    """Hash a file in one streamed pass: whole-file sha256, and for safetensors also the sha256
    of the bytes after the header (AutoV3)."""
    path = Path(path)
    data_start = read_header(path).data_start if is_safetensors(path) else None
    whole = hashlib.sha256()
    after_header = hashlib.sha256() if data_start is not None else None
    position = 0
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(chunk_bytes):
                whole.update(chunk)
                if after_header is not None and data_start is not None:
                    skip = max(0, data_start - position)
                    if skip < len(chunk):
                        after_header.update(memoryview(chunk)[skip:])
                position += len(chunk)
    except OSError as error:
        raise NetworkFileError(path, f"cannot read: {error}") from error
    return FileHashes(
        sha256=whole.hexdigest(),
        addnet_sha256=after_header.hexdigest() if after_header is not None else None,
    )


def _unwrap_state_dict(loaded: Any, path: Path) -> Mapping[str, Any]:
    # Lightning-style checkpoints nest the weights, sometimes more than once.
    while isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise NetworkFileError(path, f"pickle holds a {type(loaded).__name__}, not a state dict")
    return loaded


def load_pickle(path: str | os.PathLike[str]) -> Any:
    """A pickle's object as `torch.load(weights_only=True)` gives it (tensors, dicts, numbers,
    strings only), on the CPU; a refused or broken file raises NetworkFileError naming it."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message runs to a page; keep the line naming the refused global.
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        detail = next((ln for ln in str(error).splitlines() if "Unsupported global" in ln), "")
        raise NetworkFileError(
            path, f"refused by weights_only loading: {detail.strip() or first_line}"
        ) from error
    except (OSError, EOFError, RuntimeError, ValueError) as error:
        raise NetworkFileError(path, f"cannot load pickle: {error}") from error


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    loaded = load_pickle(path)
    tensors: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, value in _unwrap_state_dict(loaded, path).items():
        if isinstance(value, torch.Tensor):
            tensors[str(key)] = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            # Old trainers stored alpha as a plain number.
            tensors[str(key)] = torch.tensor(float(value))
        else:
            skipped.append(str(key))
    if skipped:
        logger.warning("%s: ignored non-tensor entries %s", path, sorted(skipped))
    return tensors


def load_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of a LoRA file, on the CPU. Safetensors are read directly; .pt/.ckpt/.pth/.bin
    only through `torch.load(weights_only=True)`, with a nested `state_dict` unwrapped."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        read_header(path)  # a precise error for truncated files before safetensors' own
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as error:
            raise NetworkFileError(path, f"cannot load safetensors: {error}") from error
    if suffix in PICKLE_SUFFIXES:
        return _load_pickle(path)
    raise NetworkFileError(path, f"unknown LoRA file type {suffix!r}")


def read_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape: from the header for safetensors, by loading for pickles."""
    if is_safetensors(path):
        return read_header(path).shapes
    return {name: tuple(tensor.shape) for name, tensor in load_tensors(path).items()}


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The `__metadata__` of a safetensors file; pickles carry none."""
    return read_header(path).metadata if is_safetensors(path) else {}


def write_safetensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a safetensors file complete or not at all: into `<name>.partial`, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        save_file(dict(tensors), str(partial), metadata=dict(metadata) if metadata else None)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
