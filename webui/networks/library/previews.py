"""Preview images of a LoRA: a picture next to the file (`<name>.preview.png`, `<name>.png`, ...)
or one embedded in its metadata (`ssmd_cover_images`, `modelspec.thumbnail`)."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from webui.networks.format.files import NetworkFileError, read_header

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
COVER_IMAGES_KEY = "ssmd_cover_images"
THUMBNAIL_KEY = "modelspec.thumbnail"


class Previewed(Protocol):
    """What this module needs of a catalog entry (the catalog's `NetworkEntry` is one)."""

    @property
    def path(self) -> Path: ...
    @property
    def name(self) -> str: ...
    @property
    def preview(self) -> Path | None: ...
    @property
    def embedded_preview(self) -> bool: ...


def preview_names(stem: str) -> tuple[str, ...]:
    """Preview file names for a network called `stem`, the preferred first."""
    return tuple(f"{stem}.preview{s}" for s in IMAGE_SUFFIXES) + tuple(
        f"{stem}{s}" for s in IMAGE_SUFFIXES
    )


def find_preview(network_path: Path, names_in_folder: Collection[str] | None = None) -> Path | None:
    """The preview file next to a network, if any. `names_in_folder` (the folder's listing)
    saves one stat per candidate during a scan."""
    for name in preview_names(network_path.stem):
        exists = (
            name in names_in_folder
            if names_in_folder is not None
            else (network_path.parent / name).is_file()
        )
        if exists:
            return network_path.with_name(name)
    return None


def _cover_images(metadata: Mapping[str, str]) -> list[str]:
    raw = metadata.get(COVER_IMAGES_KEY)
    if not raw:
        return []
    try:
        images = json.loads(raw)
    except (ValueError, RecursionError):  # bad JSON, huge integers, deep nesting
        log.warning("ignoring unreadable %s metadata", COVER_IMAGES_KEY)
        return []
    return [i for i in images if isinstance(i, str) and i] if isinstance(images, list) else []


def _thumbnail(metadata: Mapping[str, str]) -> str | None:
    value = metadata.get(THUMBNAIL_KEY, "")
    return value if value.startswith("data:image/") else None


def has_embedded_preview(metadata: Mapping[str, str]) -> bool:
    """Whether the metadata carries a cover image or a modelspec thumbnail."""
    return bool(_cover_images(metadata)) or _thumbnail(metadata) is not None


def _decode(data: str) -> bytes | None:
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        return base64.b64decode(data, validate=False) or None
    except (binascii.Error, ValueError):
        return None


def embedded_preview_bytes(metadata: Mapping[str, str]) -> bytes | None:
    """The first embedded image's bytes (cover images before the thumbnail), or None."""
    for candidate in [*_cover_images(metadata), _thumbnail(metadata)]:
        if candidate and (decoded := _decode(candidate)):
            return decoded
    return None


def preview_bytes(entry: Previewed) -> bytes | None:
    """The entry's preview image as encoded bytes: the file next to it, else the embedded one
    (re-read from the header); None when it has neither or they cannot be read."""
    if entry.preview is not None:
        try:
            return entry.preview.read_bytes()
        except OSError as error:
            log.warning("preview %s unreadable: %s", entry.preview, error)
    if entry.embedded_preview:
        try:
            return embedded_preview_bytes(read_header(entry.path).metadata)
        except NetworkFileError as error:
            log.warning("embedded preview of %s unreadable: %s", entry.name, error)
    return None


def set_preview(entry: Previewed, image: Image.Image) -> Path:
    """Save `image` as `<name>.preview.png` next to the network (replacing one there); returns
    the path. The index sees it on its next refresh."""
    path = entry.path.with_name(entry.path.stem + ".preview.png")
    temporary = path.with_name(path.name + ".tmp")
    image.save(temporary, format="PNG")
    os.replace(temporary, path)
    return path
