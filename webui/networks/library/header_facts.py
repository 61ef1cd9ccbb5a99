"""What one LoRA file and its sidecars say, read for its index entry: the header (never a
tensor but a few alphas), weights-only pickles, and the trigger words the entry answers."""

from __future__ import annotations

import logging
import math
import struct
from collections import Counter
from collections.abc import Collection, Mapping
from pathlib import Path

import torch

import webui.networks.library.previews as previews
import webui.networks.library.sidecars as sidecars
from webui.networks.format.base_detection import detect_base
from webui.networks.format.files import (
    FileHashes,
    NetworkFileError,
    SafetensorsHeader,
    load_tensors,
    read_header,
)
from webui.networks.format.modules.registry import (
    canonical_suffix,
    file_variants,
    split_module_key,
)
from webui.networks.format.training_metadata import (
    finite_float,
    finite_int,
    tag_frequency,
    training_facts,
)
from webui.networks.library.entries import UNEXPECTED_ERROR, HeaderFacts, NetworkEntry, SidecarFacts
from webui.networks.library.tag_counts import TagCounts

log = logging.getLogger(__name__)

# Alpha values live in tensor data; reading a sample keeps the scan of huge files cheap.
MAX_ALPHA_READS = 32
TOP_TAG_TRIGGERS = 5
# Caption tags kept per entry: the browser shows and searches the frequent ones, and every tag
# kept costs start-up time when the cache is read back.
TAG_FREQUENCY_LIMIT = 50

_DTYPE_FORMATS = {"F32": "<f", "F16": "<e", "F64": "<d"}
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
