"""Files next to a LoRA that describe it: the user's own A1111 `<name>.json` (activation text,
preferred weight, notes) and civitai's `<name>.civitai.info`. A broken sidecar is ignored with a
warning; it never makes the network unreadable."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

USER_METADATA_SUFFIX = ".json"
CIVITAI_INFO_SUFFIX = ".civitai.info"
# A1111 stores 0 for "no preferred weight" and "Unknown" for "no SD version".
_UNKNOWN_SD_VERSION = "unknown"


@dataclass(frozen=True)
class UserMetadata:
    """What the user wrote about a LoRA in A1111's edit dialog (`<name>.json`)."""

    activation_text: tuple[str, ...] = ()
    preferred_weight: float | None = None
    notes: str = ""
    sd_version: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class CivitaiInfo:
    """The parts of civitai's model-version JSON (`<name>.civitai.info`) the browser shows."""

    trained_words: tuple[str, ...] = ()
    description: str | None = None


def user_metadata_path(network_path: Path) -> Path:
    """`<name>.json` next to the network file."""
    return network_path.with_name(network_path.stem + USER_METADATA_SUFFIX)


def civitai_info_path(network_path: Path) -> Path:
    """`<name>.civitai.info` next to the network file."""
    return network_path.with_name(network_path.stem + CIVITAI_INFO_SUFFIX)


def sidecar_names(stem: str) -> tuple[str, ...]:
    """The metadata sidecar file names a network called `stem` may have."""
    return (stem + USER_METADATA_SUFFIX, stem + CIVITAI_INFO_SUFFIX)


def split_words(text: str) -> tuple[str, ...]:
    """Comma-separated words, stripped, empty ones dropped, first spelling of repeats kept."""
    seen: set[str] = set()
    words: list[str] = []
    for word in text.split(","):
        word = word.strip()
        if word and word.lower() not in seen:
            seen.add(word.lower())
            words.append(word)
    return tuple(words)


def _read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`; None (with a warning) when it is missing, unreadable or not an
    object."""
    try:
        with path.open("r", encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None
    # ValueError: bad UTF-8, bad JSON, integers over Python's digit limit; RecursionError: deep nesting
    except (OSError, ValueError, RecursionError) as error:
        log.warning("ignoring unreadable %s: %s", path, error)
        return None
    if not isinstance(data, dict):
        log.warning("ignoring %s: not a JSON object", path)
        return None
    return data


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _weight(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        weight = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int past float's range
        return None
    if not math.isfinite(weight):
        return None
    return weight or None  # A1111 writes 0 for "not set"


def read_user_metadata(network_path: Path) -> UserMetadata | None:
    """The user's `<name>.json`, or None when there is none (or it is broken)."""
    data = _read_json_object(user_metadata_path(network_path))
    if data is None:
        return None
    sd_version = _text(data.get("sd version"))
    return UserMetadata(
        activation_text=split_words(_text(data.get("activation text"))),
        preferred_weight=_weight(data.get("preferred weight")),
        notes=_text(data.get("notes")),
        sd_version=sd_version if sd_version.lower() not in ("", _UNKNOWN_SD_VERSION) else None,
        description=_text(data.get("description")) or None,
    )


def read_civitai_info(network_path: Path) -> CivitaiInfo | None:
    """civitai's `<name>.civitai.info`, or None when there is none (or it is broken)."""
    data = _read_json_object(civitai_info_path(network_path))
    if data is None:
        return None
    words: list[str] = []
    raw_words = data.get("trainedWords")
    if isinstance(raw_words, list):
        # civitai lets an author put several comma-separated words in one entry.
        words = [w for item in raw_words if isinstance(item, str) for w in split_words(item)]
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    description = _text(data.get("description")) or _text(model.get("description"))
    return CivitaiInfo(trained_words=split_words(", ".join(words)), description=description or None)


def save_user_metadata(
    entry_path: Path, activation_text: str, preferred_weight: float | None, notes: str
) -> Path:
    """Write the user's fields into `<name>.json` in A1111's format, keeping every other key the
    file already has. Returns the sidecar's path. A broken existing file is replaced."""
    path = user_metadata_path(entry_path)
    data = _read_json_object(path) or {}
    data["activation text"] = activation_text.strip()
    data["preferred weight"] = float(preferred_weight) if preferred_weight else 0.0
    data["notes"] = notes
    data.setdefault("description", "")
    data.setdefault("sd version", "Unknown")
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=4, ensure_ascii=False), encoding="utf-8")
    os.replace(temporary, path)
    return path
