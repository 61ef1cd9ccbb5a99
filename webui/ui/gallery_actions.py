"""The buttons under the txt2img gallery: Save, Send to PNG Info, Copy parameters. They act on
the selected image of the last run, kept per page as `GalleryItem`s (grid first, as shown)."""

from __future__ import annotations

import html
import tempfile
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from webui.engine.generate import (
    GRIDS_SUBFOLDER,
    OUTPUTS_SUBFOLDER,
    Engine,
    GeneratedImage,
    GenerationResult,
)
from webui.engine.infotext import save_png

NOTHING_SELECTED: Final = "No image yet: generate first."

# Copies the infotext panel of the selected image (the text as shown, without HTML); plain
# http on another host has no navigator.clipboard, so a hidden textarea and execCommand then.
COPY_PARAMETERS_JS: Final = """() => {
  const pre = document.querySelector('#txt2img-infotext .lw-infotext');
  const text = pre ? pre.innerText : '';
  if (!text) return;
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text);
    return;
  }
  const area = document.createElement('textarea');
  area.value = text;
  document.body.appendChild(area);
  area.select();
  document.execCommand('copy');
  area.remove();
}"""


@dataclass(frozen=True)
class GalleryItem:
    """One image of the gallery and the outputs subfolder it belongs in."""

    generated: GeneratedImage
    subfolder: str


def run_items(result: GenerationResult, grid: GeneratedImage | None) -> list[GalleryItem]:
    """The gallery's items in its order: the grid first, then each image."""
    items = [GalleryItem(image, OUTPUTS_SUBFOLDER) for image in result.images]
    return [GalleryItem(grid, GRIDS_SUBFOLDER), *items] if grid else items


def selected_item(items: list[GalleryItem] | None, index: int | None) -> GalleryItem | None:
    items = items or []
    return items[index] if index is not None and 0 <= index < len(items) else None


def save_selected(
    engine: Engine, items: list[GalleryItem] | None, index: int | None
) -> tuple[list[GalleryItem], str]:
    """Save the selected image (once: an image saved already says where); returns the items
    with its path set and a one-line note for the page."""
    item = selected_item(items, index)
    if item is None or items is None or index is None:
        return items or [], NOTHING_SELECTED
    image = item.generated
    if image.path is not None:
        return items, f"Already saved to <code>{html.escape(str(image.path))}</code>"
    path = engine.save_image(image.image, image.infotext, image.seed, item.subfolder)
    saved = [*items]
    saved[index] = replace(item, generated=replace(image, path=path))
    return saved, f"Saved to <code>{html.escape(str(path))}</code>"


_SEND_FOLDER = Path(tempfile.mkdtemp(prefix="lora-webui-png-info-"))


def png_info_file(item: GalleryItem) -> Path:
    """A PNG with the item's parameters: its saved file, or a copy written for the PNG Info tab
    when saving is off (Gradio's own copy of a gallery image drops the text chunk)."""
    image = item.generated
    if image.path is not None and image.path.exists():
        return image.path
    path = _SEND_FOLDER / f"{uuid.uuid4().hex}-{image.seed}.png"
    save_png(image.image, path, image.infotext)
    return path
