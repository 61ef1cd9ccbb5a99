"""The browsable index of `loras/`: one `NetworkEntry` per file, built from safetensors headers
and sidecar files, cached on disk and refreshed incrementally; hashes filled in the background.

The walk of `loras/` lives here; `catalog.py` resolves tag names on top of it."""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import struct
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import webui.networks.library.previews as previews
import webui.networks.library.sidecars as sidecars
from webui.arch import Arch
from webui.networks.format.base_detection import detect_base
from webui.networks.format.files import (
    FileHashes,
    NetworkFileError,
    SafetensorsHeader,
    compute_hashes,
    load_tensors,
    read_header,
)
from webui.networks.format.modules.registry import (
    canonical_suffix,
    file_variants,
    split_module_key,
)
from webui.networks.format.training_metadata import (
    TrainingFacts,
    finite_float,
    finite_int,
    tag_frequency,
    training_facts,
)
from webui.networks.library.tag_counts import Pair, TagCounts

log = logging.getLogger(__name__)

NETWORK_SUFFIXES = (".safetensors", ".pt", ".ckpt")
# Bumped whenever the cached record's shape or meaning changes; older caches are ignored.
CACHE_VERSION = 3
# Alpha values live in tensor data; reading a sample keeps the scan of huge files cheap.
MAX_ALPHA_READS = 32
TOP_TAG_TRIGGERS = 5
ENTRIES_REBUILD_SECONDS = 0.25
# Caption tags kept per entry: the browser shows and searches the frequent ones, and every tag
# kept costs start-up time when the cache is read back.
TAG_FREQUENCY_LIMIT = 50
# The reason an entry carries when reading its file failed in a way nothing here anticipated.
UNEXPECTED_ERROR = "unexpected error while reading the file"

_DTYPE_FORMATS = {"F32": "<f", "F16": "<e", "F64": "<d"}


@dataclass(frozen=True)
class NetworkEntry:
    """One LoRA file as the Networks browser shows it. Built from the header and sidecars only;
    a file that cannot be read is still listed, with `error` saying why."""

    name: str  # path below loras/ without extension, `/`-separated
    path: Path
    folder: str  # the parent part of `name`, "" at the top
    alias: str | None = None  # ss_output_name
    base: Arch | None = None
    base_source: str = ""
    family: str | None = None  # the family it was made for, also one this app does not run
    key_format: str = ""  # the key-name format (`identify_format`)
    variants: tuple[str, ...] = ()  # lora, loha, lokr, ia3, glora, oft, boft, full, norm, dora
    rank: int | None = None  # the most common rank
    alpha: float | None = None  # the most common alpha
    size: int = 0
    mtime: float = 0.0
    training: TrainingFacts = field(default_factory=TrainingFacts)
    tag_frequency: Sequence[Pair] = TagCounts()  # caption tags, most frequent first
    trigger_words: tuple[str, ...] = ()
    preferred_weight: float | None = None
    notes: str = ""
    sd_version: str | None = None  # the user's, from <name>.json
    description: str | None = None  # the user's, else civitai's
    preview: Path | None = None  # a preview image file next to the network
    embedded_preview: bool = False  # ssmd_cover_images or modelspec.thumbnail in the header
    error: str | None = None
    autov2: str | None = None  # filled once the background hashing reaches the file
    autov3: str | None = None


# -- what the header says ---------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderFacts:
    """Everything an entry takes from the network file itself (cached until the file changes)."""

    alias: str | None = None
    base: Arch | None = None
    base_source: str = ""
    family: str | None = None
    key_format: str = ""
    variants: tuple[str, ...] = ()
    rank: int | None = None
    alpha: float | None = None
    training: TrainingFacts = field(default_factory=TrainingFacts)
    tag_frequency: Sequence[Pair] = TagCounts()
    spec_trigger_words: tuple[str, ...] = ()  # modelspec.trigger_phrase, modelspec.tags
    embedded_preview: bool = False
    error: str | None = None


# Suffixes whose first dimension is the rank.
_RANK_SUFFIXES = frozenset({"lora_down.weight", "hada_w1_b", "lokr_w1_b", "lokr_w2_b"})


def _split_key(key: str) -> tuple[str, str | None]:
    prefix, suffix = split_module_key(key)
    return prefix, canonical_suffix(suffix)


def variants_and_rank(shapes: Mapping[str, tuple[int, ...]]) -> tuple[tuple[str, ...], int | None]:
    """The variants a file's keys spell (the loader's own table: `file_variants`), and its most
    common rank."""
    ranks: Counter[int] = Counter()
    for key, shape in shapes.items():
        if _split_key(key)[1] in _RANK_SUFFIXES and shape:
            ranks[shape[0]] += 1
    return file_variants(shapes), (ranks.most_common(1)[0][0] if ranks else None)


def _read_alphas(path: Path, header: SafetensorsHeader) -> float | None:
    """The most common alpha among the first MAX_ALPHA_READS scalar alpha tensors."""
    wanted = [
        info
        for key, info in header.tensors.items()
        if key.endswith(".alpha") and info.dtype in _DTYPE_FORMATS and len(info.shape) <= 1
    ][:MAX_ALPHA_READS]
    if not wanted:
        return None
    values: Counter[float] = Counter()
    try:
        with path.open("rb") as handle:
            for info in sorted(wanted, key=lambda i: i.data_offsets[0]):
                fmt = _DTYPE_FORMATS[info.dtype]
                handle.seek(header.data_start + info.data_offsets[0])
                raw = handle.read(struct.calcsize(fmt))
                if len(raw) == struct.calcsize(fmt):
                    value = struct.unpack(fmt, raw)[0]
                    if math.isfinite(value):
                        values[round(value, 6)] += 1
    except OSError as error:
        log.warning("%s: cannot read alphas: %s", path, error)
        return None
    return values.most_common(1)[0][0] if values else None


def pickle_facts(path: Path) -> HeaderFacts:
    """What a `.pt`/`.ckpt` network holds. Pickles have no header: the file is loaded, through
    `torch.load(weights_only=True)` only, and its shapes and alphas read; it carries no
    metadata. A refused or unreadable pickle gives facts carrying only `error`."""
    try:
        tensors = load_tensors(path)
    except NetworkFileError as error:
        return HeaderFacts(error=error.reason)
    shapes = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
    detection = detect_base({}, shapes)
    variants, rank = variants_and_rank(shapes)
    alphas = Counter(
        round(value, 6)
        for key, tensor in tensors.items()
        if key.endswith(".alpha") and (value := _scalar(tensor)) is not None
    )
    return HeaderFacts(
        base=detection.arch,
        base_source=detection.source,
        family=detection.family,
        key_format=detection.key_format,
        variants=variants,
        rank=rank,
        alpha=alphas.most_common(1)[0][0] if alphas else None,
    )


def _scalar(tensor: torch.Tensor) -> float | None:
    """A one-element real tensor's finite value; None for anything else (complex, bool, NaN)."""
    if tensor.numel() != 1 or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        return None
    value = float(tensor.detach().to("cpu", torch.float64))
    return value if math.isfinite(value) else None


def guarded_header_facts(path: Path) -> HeaderFacts:
    """`header_facts`, and for a failure nobody foresaw, facts carrying only `error` (logged with
    its trace): one file must never stop a scan."""
    try:
        return header_facts(path)
    except Exception as error:  # the last line of defence; the readers raise NetworkFileError
        log.exception("%s: %s", path, UNEXPECTED_ERROR)
        return HeaderFacts(error=f"{UNEXPECTED_ERROR} ({type(error).__name__}: {error})")


def header_facts(path: Path) -> HeaderFacts:
    """Read a network file's header (never its tensors) into HeaderFacts; an unreadable file
    gives facts carrying only `error`. Pickles, which have no header, go to `pickle_facts`."""
    if path.suffix.lower() != ".safetensors":
        return pickle_facts(path)
    try:
        header = read_header(path)
    except NetworkFileError as error:
        return HeaderFacts(error=error.reason)
    metadata = header.metadata
    shapes = header.shapes
    detection = detect_base(metadata, shapes)
    variants, rank = variants_and_rank(shapes)
    # kohya writes ss_network_alpha for every file; reading tensors is the fallback.
    alpha = finite_float(metadata.get("ss_network_alpha"))
    if alpha is None:
        alpha = _read_alphas(path, header)
    if rank is None:
        rank = finite_int(metadata.get("ss_network_dim"))
    spec_words = sidecars.split_words(
        ", ".join(metadata.get(k, "") for k in ("modelspec.trigger_phrase", "modelspec.tags"))
    )
    return HeaderFacts(
        alias=metadata.get("ss_output_name") or None,
        base=detection.arch,
        base_source=detection.source,
        family=detection.family,
        key_format=detection.key_format,
        variants=variants,
        rank=rank,
        alpha=alpha,
        training=training_facts(metadata),
        tag_frequency=TagCounts.of(
            tag_frequency(metadata.get("ss_tag_frequency"), TAG_FREQUENCY_LIMIT)
        ),
        spec_trigger_words=spec_words,
        embedded_preview=previews.has_embedded_preview(metadata),
    )


# -- what the sidecars say --------------------------------------------------------------------


@dataclass(frozen=True)
class SidecarFacts:
    """Everything an entry takes from files next to it (cached until one of them changes)."""

    user: sidecars.UserMetadata | None = None
    civitai: sidecars.CivitaiInfo | None = None
    preview: str | None = None  # file name in the network's folder


def sidecar_facts(path: Path, names_in_folder: Collection[str]) -> SidecarFacts:
    """Read the sidecars of the network at `path`."""
    user_name, civitai_name = sidecars.sidecar_names(path.stem)
    preview = previews.find_preview(path, names_in_folder)
    return SidecarFacts(
        user=sidecars.read_user_metadata(path) if user_name in names_in_folder else None,
        civitai=sidecars.read_civitai_info(path) if civitai_name in names_in_folder else None,
        preview=preview.name if preview is not None else None,
    )


def trigger_words(header: HeaderFacts, side: SidecarFacts) -> tuple[str, ...]:
    """The first source that has any: the user's activation text, civitai's trained words, the
    top caption tags of the training set, modelspec's trigger phrase and tags."""
    for words in (
        side.user.activation_text if side.user else (),
        side.civitai.trained_words if side.civitai else (),
        TagCounts.of(header.tag_frequency).top(TOP_TAG_TRIGGERS),
        header.spec_trigger_words,
    ):
        if words:
            return tuple(words)
    return ()


def make_entry(
    relative: str,
    path: Path,
    size: int,
    mtime: float,
    header: HeaderFacts,
    side: SidecarFacts,
    hashes: FileHashes | None = None,
) -> NetworkEntry:
    """Combine what the header and the sidecars say into one entry."""
    name = relative.rsplit(".", 1)[0] if "." in relative.rsplit("/", 1)[-1] else relative
    user = side.user
    return NetworkEntry(
        name=name,
        path=path,
        folder=name.rpartition("/")[0],
        alias=header.alias,
        base=header.base,
        base_source=header.base_source,
        family=header.family,
        key_format=header.key_format,
        variants=header.variants,
        rank=header.rank,
        alpha=header.alpha,
        size=size,
        mtime=mtime,
        training=header.training,
        tag_frequency=header.tag_frequency,
        trigger_words=trigger_words(header, side),
        preferred_weight=user.preferred_weight if user else None,
        notes=user.notes if user else "",
        sd_version=user.sd_version if user else None,
        description=(user.description if user else None)
        or (side.civitai.description if side.civitai else None),
        preview=path.with_name(side.preview) if side.preview else None,
        embedded_preview=header.embedded_preview,
        error=header.error,
        autov2=hashes.autov2 if hashes else None,
        autov3=hashes.autov3 if hashes else None,
    )


# -- the cache --------------------------------------------------------------------------------


def _pack_tags(tags: Sequence[Pair]) -> dict[str, str]:
    # Two strings instead of a list of pairs: decoding thousands of small JSON lists was most
    # of a warm start; TagCounts decodes them only when read.
    packed_tags, packed_counts = TagCounts.of(tags).packed
    return {"tags": packed_tags, "tag_counts": packed_counts}


class _BadRecord(ValueError):
    """A cached record whose shape or types are not what `_Record.to_json` writes."""


def _of(value: Any, kind: type | tuple[type, ...], optional: bool = False) -> Any:
    """`value` when it is a `kind` (bool is not a number here), else _BadRecord."""
    if value is None and optional:
        return None
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise _BadRecord(f"{value!r:.40} is not {kind}")


def _strings(value: Any) -> tuple[str, ...]:
    items = tuple(_of(value, list))
    for item in items:
        _of(item, str)
    return items


def _number(value: Any) -> float | int | None:
    number = _of(value, (int, float), optional=True)
    if number is not None and not math.isfinite(number):
        raise _BadRecord(f"{number} is not finite")
    return number


def _unpack_tags(data: Mapping[str, Any]) -> TagCounts:
    tags, counts = _of(data.get("tags", ""), str), _of(data.get("tag_counts", ""), str)
    # checked here, cheaply, so that a damaged cache is dropped at load, not met in the UI
    digits = counts.replace(" ", "")
    if tags and (
        tags.count("\n") != counts.count(" ") or not (digits.isascii() and digits.isdigit())
    ):
        raise _BadRecord("tags and tag counts do not match")
    return TagCounts(tags, counts)


def _training_from_json(data: Any) -> TrainingFacts:
    data = _of(data or {}, dict)
    return TrainingFacts(
        base_checkpoint=_of(data.get("base_checkpoint"), str, optional=True),
        resolution=_of(data.get("resolution"), str, optional=True),
        epochs=_of(data.get("epochs"), int, optional=True),
        images=_of(data.get("images"), int, optional=True),
        steps=_of(data.get("steps"), int, optional=True),
    )


def _header_from_json(data: Mapping[str, Any]) -> HeaderFacts:
    base = _of(data.get("base"), str, optional=True)
    return HeaderFacts(
        alias=_of(data.get("alias"), str, optional=True),
        base=Arch(base) if base else None,
        base_source=_of(data.get("base_source", ""), str),
        family=_of(data.get("family"), str, optional=True),
        key_format=_of(data.get("key_format", ""), str),
        variants=_strings(data.get("variants", [])),
        rank=_of(data.get("rank"), int, optional=True),
        alpha=_number(data.get("alpha")),
        training=_training_from_json(data.get("training")),
        tag_frequency=_unpack_tags(data),
        spec_trigger_words=_strings(data.get("spec_trigger_words", [])),
        embedded_preview=_of(data.get("embedded_preview", False), bool),
        error=_of(data.get("error"), str, optional=True),
    )


def _side_from_json(data: Mapping[str, Any]) -> SidecarFacts:
    user = _of(data.get("user"), dict, optional=True)
    civitai = _of(data.get("civitai"), dict, optional=True)
    return SidecarFacts(
        user=sidecars.UserMetadata(
            activation_text=_strings(user["activation_text"]),
            preferred_weight=_number(user["preferred_weight"]),
            notes=_of(user["notes"], str),
            sd_version=_of(user["sd_version"], str, optional=True),
            description=_of(user["description"], str, optional=True),
        )
        if user
        else None,
        civitai=sidecars.CivitaiInfo(
            trained_words=_strings(civitai["trained_words"]),
            description=_of(civitai["description"], str, optional=True),
        )
        if civitai
        else None,
        preview=_of(data.get("preview"), str, optional=True),
    )


SidecarStamp = tuple[tuple[str, int], ...]


@dataclass
class _Record:
    """One file as cached: its stamps (what a change is detected by) and what was read."""

    relative: str  # path below the folder, with extension, `/`-separated
    size: int
    mtime_ns: int
    sidecar_stamp: SidecarStamp
    header: HeaderFacts
    side: SidecarFacts
    hashes: FileHashes | None = None
    entry: NetworkEntry | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        # by hand: dataclasses.asdict deep-copies every value and dominated the cache write
        header, side, user, civitai = self.header, self.side, self.side.user, self.side.civitai
        return {
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "sidecars": self.sidecar_stamp,
            "header": {
                "alias": header.alias,
                "base": header.base.value if header.base else None,
                "base_source": header.base_source,
                "family": header.family,
                "key_format": header.key_format,
                "variants": header.variants,
                "rank": header.rank,
                "alpha": header.alpha,
                "training": header.training.__dict__,
                **_pack_tags(header.tag_frequency),
                "spec_trigger_words": header.spec_trigger_words,
                "embedded_preview": header.embedded_preview,
                "error": header.error,
            },
            "side": {
                "user": user.__dict__ if user else None,
                "civitai": civitai.__dict__ if civitai else None,
                "preview": side.preview,
            },
            "hashes": self.hashes.__dict__ if self.hashes else None,
        }

    @classmethod
    def from_json(cls, relative: str, data: Any) -> _Record:
        """The record `to_json` wrote; _BadRecord (or KeyError) for anything else."""
        data = _of(data, dict)
        hashes = _of(data.get("hashes"), dict, optional=True)
        return cls(
            relative=relative,
            size=_of(data["size"], int),
            mtime_ns=_of(data["mtime_ns"], int),
            sidecar_stamp=tuple(
                (_of(n, str), _of(m, int)) for n, m in _of(data.get("sidecars", []), list)
            ),
            header=_header_from_json(_of(data["header"], dict)),
            side=_side_from_json(_of(data["side"], dict)),
            hashes=FileHashes(
                sha256=_of(hashes["sha256"], str),
                addnet_sha256=_of(hashes["addnet_sha256"], str, optional=True),
            )
            if hashes
            else None,
        )


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
        self._records: dict[str, _Record] | None = None  # None: never scanned
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
            records: dict[str, _Record] = {}
            changed = False
            for found in _walk(self.folder) if self.folder.is_dir() else ():
                record = old.get(found.relative)
                if record is None or (record.size, record.mtime_ns) != (
                    found.size,
                    found.mtime_ns,
                ):
                    record = _Record(
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

    def _load_cache(self) -> dict[str, _Record]:
        if self.cache_file is None or not self.cache_file.is_file():
            return {}
        try:
            data = json.loads(self.cache_file.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
                raise _BadRecord("not a catalog cache")
        except (OSError, ValueError, RecursionError) as error:
            log.warning("ignoring unreadable catalog cache %s: %s", self.cache_file, error)
            return {}
        if data.get("version") != CACHE_VERSION or data.get("folder") != str(self.folder):
            return {}
        records: dict[str, _Record] = {}
        for relative, raw in data["files"].items():
            try:
                records[relative] = _Record.from_json(relative, raw)
            except (_BadRecord, KeyError, TypeError) as error:  # that file is read again
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
