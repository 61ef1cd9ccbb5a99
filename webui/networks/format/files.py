"""LoRA files on disk: safetensors headers and metadata (read without loading tensors), the
AutoV2/AutoV3 hashes A1111 and civitai show, and tensor loading for safetensors and pickles.

Nothing here memory-maps a file: a LoRA overwritten or truncated while it is read would kill the
process with SIGBUS. Files are read into memory (under `MAX_LORA_BYTES`) and every tensor's
declared shape and dtype is checked against its data offsets before anything is allocated."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = frozenset({".safetensors"})
PICKLE_SUFFIXES = frozenset({".pt", ".ckpt", ".pth", ".bin"})

# The safetensors format itself refuses headers above 100 MB; a larger length means garbage.
MAX_HEADER_BYTES = 100 * 1024 * 1024
HASH_CHUNK_BYTES = 1024 * 1024
# LoRAs are read whole into memory (no mmap); a bigger file is refused, not half-loaded.
MAX_LORA_BYTES = 4 * 1024**3
# No LoRA tensor has more dims; no real dim comes near 2**40 (also keeps torch's int64 safe).
MAX_TENSOR_DIMS = 8
MAX_DIM = 2**40
_LENGTH_BYTES = 8
# safetensors dtype -> bits per element (the sub-byte float formats included).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


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

    @property
    def declared_bits(self) -> int:
        """What the shape and dtype need, in bits."""
        return math.prod(self.shape) * DTYPE_BITS[self.dtype]


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


AUTOV3_DIGITS = 12  # A1111 shows the first 12 hex digits of the data hash


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
        return None if self.addnet_sha256 is None else self.addnet_sha256[:AUTOV3_DIGITS]


def is_safetensors(path: str | os.PathLike[str]) -> bool:
    """True when the file name says safetensors."""
    return Path(path).suffix.lower() in SAFETENSORS_SUFFIXES


def _header_length(raw: bytes, path: Path, file_size: int) -> int:
    if len(raw) < _LENGTH_BYTES:
        raise NetworkFileError(path, f"too short for a safetensors file ({file_size} bytes)")
    length = int.from_bytes(raw[:_LENGTH_BYTES], "little")
    if length > MAX_HEADER_BYTES:
        raise NetworkFileError(path, f"not a safetensors file (header length {length})")
    if _LENGTH_BYTES + length > file_size:
        raise NetworkFileError(
            path, f"truncated: header needs {length} bytes, file has {file_size - _LENGTH_BYTES}"
        )
    return length


def _is_count(value: Any) -> bool:
    # JSON true/false arrive as bool, a subclass of int
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_info(path: Path, name: str, entry: Any) -> TensorInfo:
    if not isinstance(entry, dict):
        raise NetworkFileError(path, f"malformed header entry for tensor {name!r}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    valid = (
        isinstance(dtype, str)
        and isinstance(shape, list)
        and all(_is_count(d) for d in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_count(o) for o in offsets)
        and offsets[0] <= offsets[1]
    )
    if not valid:
        raise NetworkFileError(path, f"malformed header entry for tensor {name!r}: {entry!r:.200}")
    if dtype not in DTYPE_BITS:
        raise NetworkFileError(path, f"tensor {name!r} has unknown dtype {dtype!r:.40}")
    if len(shape) > MAX_TENSOR_DIMS or any(d > MAX_DIM for d in shape):
        raise NetworkFileError(path, f"tensor {name!r} declares an absurd shape {shape!r:.200}")
    info = TensorInfo(dtype=dtype, shape=tuple(shape), data_offsets=(offsets[0], offsets[1]))
    span = offsets[1] - offsets[0]
    if info.declared_bits != span * 8:
        dims = "x".join(map(str, shape)) or "scalar"
        raise NetworkFileError(
            path,
            f"tensor {name!r} declares {dims} {dtype} ({info.declared_bits / 8:.0f} bytes) "
            f"but its data offsets span {span} bytes",
        )
    return info


def _parse_header(path: Path, raw: bytes, length: int, file_size: int) -> SafetensorsHeader:
    """The header from its JSON bytes; every tensor checked against the file's size."""
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        # ValueError also covers integers over Python's digit limit; RecursionError deep nesting
        raise NetworkFileError(
            path, f"not a safetensors file (bad header JSON: {str(error)[:200]})"
        ) from error
    if not isinstance(parsed, dict):
        raise NetworkFileError(path, "not a safetensors file (header is not a JSON object)")

    raw_metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(raw_metadata, dict):
        raise NetworkFileError(path, "malformed __metadata__ (not a JSON object)")
    # The format allows only strings; stringify anything else rather than refusing the file.
    try:
        metadata = {
            str(k): v if isinstance(v, str) else json.dumps(v) for k, v in raw_metadata.items()
        }
    except RecursionError as error:
        raise NetworkFileError(path, "malformed __metadata__ (nested too deeply)") from error
    tensors = {name: _tensor_info(path, name, entry) for name, entry in parsed.items()}

    data_size = file_size - _LENGTH_BYTES - length
    data_end = max((info.data_offsets[1] for info in tensors.values()), default=0)
    if data_end > data_size:
        raise NetworkFileError(
            path, f"truncated: tensors need {data_end} data bytes, file has {data_size}"
        )
    position = 0
    for name, info in sorted(tensors.items(), key=lambda item: item[1].data_offsets):
        if info.data_offsets[0] != position:
            raise NetworkFileError(
                path, f"tensor {name!r} starts at data byte {info.data_offsets[0]}, not {position}"
            )
        position = info.data_offsets[1]
    return SafetensorsHeader(metadata=metadata, tensors=tensors, header_size=length)


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read a safetensors header (no tensor data, no mmap). Raises NetworkFileError naming the
    file when it is truncated, garbage, or a tensor's shape and dtype disagree with its data
    offsets or point past the file's end."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            length = _header_length(handle.read(_LENGTH_BYTES), path, file_size)
            raw = handle.read(length)
    except OSError as error:
        raise NetworkFileError(path, f"cannot read: {error}") from error
    if len(raw) != length:
        raise NetworkFileError(path, "truncated while it was read")
    return _parse_header(path, raw, length, file_size)


def _read_whole(path: Path, max_bytes: int) -> bytes:
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                raise NetworkFileError(
                    path, f"{size} bytes, over the {max_bytes}-byte limit for LoRA files"
                )
            data = handle.read(max_bytes + 1)
    except OSError as error:
        raise NetworkFileError(path, f"cannot read: {error}") from error
    if len(data) > max_bytes:  # grew while it was read
        raise NetworkFileError(path, f"over the {max_bytes}-byte limit for LoRA files")
    return data


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


def load_pickle(path: str | os.PathLike[str], data: bytes | None = None) -> Any:
    """A pickle's object as `torch.load(weights_only=True)` gives it (tensors, dicts, numbers,
    strings only), on the CPU, from the file's bytes read into memory under the size cap (or
    from `data`, already read); a refused or broken file raises NetworkFileError naming it."""
    path = Path(path)
    if data is None:
        data = _read_whole(path, MAX_LORA_BYTES)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message runs to a page; keep the line naming the refused global.
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        detail = next((ln for ln in str(error).splitlines() if "Unsupported global" in ln), "")
        raise NetworkFileError(
            path, f"refused by weights_only loading: {detail.strip() or first_line}"
        ) from error
    except Exception as error:  # torch's unpickler raises any type on garbage (IndexError, ...)
        raise NetworkFileError(
            path, f"cannot load pickle: {type(error).__name__}: {error}"
        ) from error


def _load_pickle(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    loaded = load_pickle(path, data)
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


@dataclass(frozen=True)
class LoadedFile:
    """A LoRA file's tensors (on the CPU) and its metadata, read in one pass."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    # A1111's AutoV3 of the very bytes read (safetensors only): the hash of what was applied,
    # even when the file changes afterwards
    autov3: str | None = None


def load_file_contents(
    path: str | os.PathLike[str], *, max_bytes: int = MAX_LORA_BYTES
) -> LoadedFile:
    """Tensors and metadata of a LoRA file, read into memory in one pass (no mmap), so a file
    changed meanwhile is an error about that file. Safetensors are parsed from those bytes after
    their header is checked; .pt/.ckpt/.pth/.bin only through `torch.load(weights_only=True)`,
    with a nested `state_dict` unwrapped. Raises NetworkFileError naming the file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES | PICKLE_SUFFIXES:
        raise NetworkFileError(path, f"unknown LoRA file type {suffix!r}")
    data = _read_whole(path, max_bytes)
    if suffix in PICKLE_SUFFIXES:
        return LoadedFile(_load_pickle(path, data), {})
    length = _header_length(data, path, len(data))
    header = _parse_header(path, data[_LENGTH_BYTES : _LENGTH_BYTES + length], length, len(data))
    try:
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise NetworkFileError(path, f"cannot load safetensors: {error}") from error
    data_hash = hashlib.sha256(memoryview(data)[_LENGTH_BYTES + length :]).hexdigest()
    return LoadedFile(tensors, header.metadata, data_hash[:AUTOV3_DIGITS])


def load_tensors(
    path: str | os.PathLike[str], *, max_bytes: int = MAX_LORA_BYTES
) -> dict[str, torch.Tensor]:
    """All tensors of a LoRA file, on the CPU (see `load_file_contents`)."""
    return load_file_contents(path, max_bytes=max_bytes).tensors


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
