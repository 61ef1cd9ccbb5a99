"""The on-disk cache of the LoRA index: one JSON record per file, keyed by path, size and
mtime, type-checked field by field on load (a damaged record is re-read, never trusted)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import webui.networks.library.sidecars as sidecars
from webui.arch import Arch
from webui.networks.format.files import (
    FileHashes,
)
from webui.networks.format.training_metadata import (
    TrainingFacts,
)
from webui.networks.library.entries import HeaderFacts, NetworkEntry, SidecarFacts
from webui.networks.library.tag_counts import Pair, TagCounts

log = logging.getLogger(__name__)

# Bumped whenever the cached record's shape or meaning changes; older caches are ignored.
CACHE_VERSION = 3


def _pack_tags(tags: Sequence[Pair]) -> dict[str, str]:
    # Two strings instead of a list of pairs: decoding thousands of small JSON lists was most
    # of a warm start; TagCounts decodes them only when read.
    packed_tags, packed_counts = TagCounts.of(tags).packed
    return {"tags": packed_tags, "tag_counts": packed_counts}


class BadRecord(ValueError):
    """A cached record whose shape or types are not what `Record.to_json` writes."""


def _of(value: Any, kind: type | tuple[type, ...], optional: bool = False) -> Any:
    """`value` when it is a `kind` (bool is not a number here), else BadRecord."""
    if value is None and optional:
        return None
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise BadRecord(f"{value!r:.40} is not {kind}")


def _strings(value: Any) -> tuple[str, ...]:
    items = tuple(_of(value, list))
    for item in items:
        _of(item, str)
    return items


def _number(value: Any) -> float | int | None:
    number = _of(value, (int, float), optional=True)
    if number is not None and not math.isfinite(number):
        raise BadRecord(f"{number} is not finite")
    return number


def _unpack_tags(data: Mapping[str, Any]) -> TagCounts:
    tags, counts = _of(data.get("tags", ""), str), _of(data.get("tag_counts", ""), str)
    # checked here, cheaply, so that a damaged cache is dropped at load, not met in the UI
    digits = counts.replace(" ", "")
    if tags and (
        tags.count("\n") != counts.count(" ") or not (digits.isascii() and digits.isdigit())
    ):
        raise BadRecord("tags and tag counts do not match")
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
class Record:
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
    def from_json(cls, relative: str, data: Any) -> Record:
        """The record `to_json` wrote; BadRecord (or KeyError) for anything else."""
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
