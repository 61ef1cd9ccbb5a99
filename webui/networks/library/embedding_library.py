"""Textual-inversion embeddings as the engine uses them: standalone files in the `embeddings/`
folder (name = file stem, as A1111) and those bundled in LoRA files, each read once and kept
while its file is unchanged. `list_embeddings` describes the folder for the UI."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from safetensors import SafetensorError, safe_open

from webui.networks.format.files import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    NetworkFileError,
    compute_hashes,
    is_safetensors,
    load_pickle,
    load_tensors,
    read_header,
)
from webui.networks.format.key_formats.embeddings import (
    EmbeddingDataError,
    bundled_embedding_data,
    embedding_vectors,
    is_embedding_key,
)

log = logging.getLogger(__name__)

EMBEDDING_SUFFIXES: Final = SAFETENSORS_SUFFIXES | {".pt", ".bin"}
SHORT_HASH_LENGTH: Final = 12
"""A1111's `TI hashes` show the first 12 hex digits of the file's sha256."""
SDXL_ENCODERS: Final = ("clip_l", "clip_g")


@dataclass(frozen=True, eq=False)
class Embedding:
    """One embedding: the name that triggers it in a prompt, one [n, width] matrix per text
    encoder (SD1/SD2: one; SDXL: clip_l for text_encoder, clip_g for text_encoder_2), where it
    came from, and what the infotext's `TI hashes` shows for it."""

    name: str
    vectors: tuple[torch.Tensor, ...]
    path: Path
    short_hash: str
    bundled_in: str | None = None  # the LoRA's name, for an embedding bundled in a LoRA

    @property
    def vector_count(self) -> int:
        return int(self.vectors[0].shape[0])

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(int(matrix.shape[1]) for matrix in self.vectors)

    @property
    def encoders(self) -> tuple[str, ...]:
        """Which text encoders it feeds, in A1111's names."""
        return SDXL_ENCODERS if len(self.vectors) == 2 else ("clip",)

    def fits(self, widths: Sequence[int]) -> bool:
        """Whether a model whose text encoders have these token-embedding widths can use it
        (A1111 skips the others: their names stay plain text)."""
        return self.widths == tuple(widths)


@dataclass(frozen=True)
class EmbeddingInfo:
    """What the UI shows of a standalone embedding, or why it cannot be used."""

    name: str
    path: Path
    vector_count: int
    widths: tuple[int, ...]
    encoders: tuple[str, ...]
    error: str | None = None


def _read_data(path: Path) -> dict[str, Any]:
    if is_safetensors(path):
        return dict(load_tensors(path))
    loaded = load_pickle(path)
    if not isinstance(loaded, dict):
        raise NetworkFileError(path, f"holds a {type(loaded).__name__}, not an embedding")
    return loaded


def read_embedding_file(path: str | os.PathLike[str]) -> Embedding:
    """A standalone embedding file (`.safetensors`, or `.pt`/`.bin` through weights-only
    loading); its name is the file stem. Raises NetworkFileError naming the file and the
    problem."""
    path = Path(path)
    if path.suffix.lower() not in EMBEDDING_SUFFIXES:
        raise NetworkFileError(path, f"unknown embedding file type {path.suffix!r}")
    try:
        vectors = embedding_vectors(_read_data(path))
    except EmbeddingDataError as error:
        raise NetworkFileError(path, str(error)) from error
    short_hash = compute_hashes(path).sha256[:SHORT_HASH_LENGTH]
    return Embedding(path.stem, vectors, path, short_hash)


def _bundled_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not is_safetensors(path):
        if path.suffix.lower() not in PICKLE_SUFFIXES:
            return {}
        return {k: v for k, v in load_tensors(path).items() if is_embedding_key(k)}
    keys = [key for key in read_header(path).tensors if is_embedding_key(key)]
    if not keys:
        return {}
    try:  # only the embedding tensors: the LoRA itself may be large
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in keys}
    except (SafetensorError, OSError) as error:
        raise NetworkFileError(path, f"cannot load safetensors: {error}") from error


def read_bundled_embeddings(
    lora_path: str | os.PathLike[str], lora_name: str
) -> tuple[list[Embedding], list[str]]:
    """The embeddings bundled in a LoRA file, and a warning for each one that cannot be used.
    Their `TI hashes` entry is the LoRA's name, as A1111 writes it."""
    path = Path(lora_path)
    embeddings: list[Embedding] = []
    problems: list[str] = []
    for name, data in bundled_embedding_data(_bundled_tensors(path)).items():
        try:
            vectors = embedding_vectors(data)
        except EmbeddingDataError as error:
            problems.append(f"{path.name}: bundled embedding {name!r} ignored: {error}")
            continue
        embeddings.append(Embedding(name, vectors, path, lora_name, bundled_in=lora_name))
    return embeddings, problems


def embedding_files(folder: Path) -> list[Path]:
    """Embedding files under `folder` (recursively, sorted); empty files are skipped, as in
    A1111."""
    if not folder.is_dir():
        return []
    found = [
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in EMBEDDING_SUFFIXES and path.is_file()
    ]
    return sorted(path for path in found if path.stat().st_size > 0)


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


class EmbeddingLibrary:
    """The `embeddings/` folder and the LoRA files' bundled embeddings, each file read once
    and read again only when its size or modification time changes."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files: dict[Path, tuple[tuple[int, int], Embedding | NetworkFileError]] = {}
        self._bundles: dict[tuple[Path, str], tuple[tuple[int, int], list[Embedding], list[str]]]
        self._bundles = {}

    def _read(self, path: Path) -> Embedding | NetworkFileError:
        stamp = _stamp(path)
        cached = self._files.get(path)
        if cached is None or cached[0] != stamp:
            try:
                cached = (stamp, read_embedding_file(path))
            except NetworkFileError as error:
                cached = (stamp, error)
            self._files[path] = cached
        return cached[1]

    def standalone(self) -> tuple[list[Embedding], list[NetworkFileError]]:
        """Every readable embedding of the folder, and the errors of the others. Of two files
        with the same stem, the first in sorted path order wins."""
        embeddings: dict[str, Embedding] = {}
        errors: list[NetworkFileError] = []
        for path in embedding_files(self.folder):
            read = self._read(path)
            if isinstance(read, NetworkFileError):
                errors.append(read)
            else:
                embeddings.setdefault(read.name, read)
        return list(embeddings.values()), errors

    def bundled(self, lora_path: Path, lora_name: str) -> tuple[list[Embedding], list[str]]:
        """The embeddings bundled in one LoRA file and warnings for unusable ones."""
        stamp = _stamp(lora_path)
        cached = self._bundles.get((lora_path, lora_name))
        if cached is None or cached[0] != stamp:
            cached = (stamp, *read_bundled_embeddings(lora_path, lora_name))
            self._bundles[(lora_path, lora_name)] = cached
        return cached[1], cached[2]

    def active(
        self, widths: Sequence[int], loras: Iterable[tuple[str, Path]]
    ) -> tuple[list[Embedding], list[str]]:
        """The embeddings a prompt may use with a model whose text encoders have these
        widths: the folder's, then those bundled in the applied LoRAs (name, path); a bundled
        one with a folder embedding's name is skipped, as in A1111. Also the warnings."""
        standalone, errors = self.standalone()
        warnings = [f"embedding {error.path.name}: {error.reason}" for error in errors]
        chosen = {e.name: e for e in standalone if e.fits(widths)}
        for lora_name, lora_path in loras:
            try:
                bundled, problems = self.bundled(lora_path, lora_name)
            except (NetworkFileError, OSError) as error:
                warnings.append(f"{lora_name}: bundled embeddings not read: {error}")
                continue
            warnings.extend(problems)
            for embedding in bundled:
                if embedding.name in chosen:
                    log.info("bundled embedding %r skipped: the folder has one", embedding.name)
                elif not embedding.fits(widths):
                    warnings.append(
                        f"{lora_name}: bundled embedding {embedding.name!r} has widths "
                        f"{list(embedding.widths)}, the model needs {list(widths)}"
                    )
                else:
                    chosen[embedding.name] = embedding
        return list(chosen.values()), warnings

    def infos(self) -> list[EmbeddingInfo]:
        """The folder's embeddings for the UI (readable or not)."""
        infos: list[EmbeddingInfo] = []
        for path in embedding_files(self.folder):
            read = self._read(path)
            if isinstance(read, NetworkFileError):
                infos.append(EmbeddingInfo(path.stem, path, 0, (), (), read.reason))
            else:
                infos.append(
                    EmbeddingInfo(read.name, path, read.vector_count, read.widths, read.encoders)
                )
        return infos


def list_embeddings(folder: Path) -> list[EmbeddingInfo]:
    """The embeddings in `folder` for the UI: name (what to write in a prompt), path, number
    of vectors, widths, which encoders it feeds, or the reason it cannot be read."""
    return EmbeddingLibrary(folder).infos()
