"""The Networks tab: browse the LoRA folder as cards, add them to the prompt with a click, edit
their activation text, weight and notes. (How trigger words are applied is chosen per page in
txt2img, and server-wide in Settings.)"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from webui import families
from webui.arch import Arch
from webui.engine.generate import Engine
from webui.networks.format import UNKNOWN, BaseDetection, fits
from webui.networks.library import (
    CatalogIndex,
    NetworkEntry,
    preview_bytes,
    save_user_metadata,
    set_preview,
)
from webui.ui.messages import user_message, warnings_html
from webui.ui.networks_cards import (
    Card,
    Details,
    EmbeddingCard,
    render_details,
    render_embedding_grid,
    render_grid,
    summary_rows,
)
from webui.ui.prompt_edit import add_word, insert_embedding, prompt_has_network, toggle_network

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
NETWORKS_CSS = (STATIC / "networks.css").read_text(encoding="utf-8")
# One delegated listener on the component root: survives every re-render of its content.
CLICK_JS = (STATIC / "networks.js").read_text(encoding="utf-8")

ALL_FOLDERS = "All folders"
ANY_BASE = "Any base"
THUMB_SIZE = 320


class SortOrder(StrEnum):
    NAME = "Name"
    NEWEST = "Newest first"
    LARGEST = "Largest first"


@dataclass(frozen=True)
class Filters:
    """What the user narrowed the grid to."""

    query: str = ""
    sort: SortOrder = SortOrder.NAME
    folder: str = ALL_FOLDERS
    base: str = ANY_BASE
    show_all: bool = False  # also show LoRAs made for another base (dimmed)


# -- pure filtering ---------------------------------------------------------------------------


def detection_of(entry: NetworkEntry) -> BaseDetection:
    """The catalog's answer to "what was this file made for", as base detection gives it."""
    return BaseDetection(
        entry.base, entry.base_source, "", entry.family, entry.key_format or UNKNOWN
    )


def is_compatible(entry: NetworkEntry, model_arch: Arch | None) -> bool:
    """What the engine would apply (`fits`): a family this app does not run never is; unknown
    bases and an unloaded model count as compatible, so nothing is hidden on a guess."""
    return fits(detection_of(entry), model_arch)


def family_of(entry: NetworkEntry) -> str | None:
    return entry.base.value if entry.base is not None else entry.family


def _searchable(entry: NetworkEntry) -> str:
    tags = " ".join(tag for tag, _ in entry.tag_frequency)
    words = " ".join(entry.trigger_words)
    return f"{entry.name} {entry.alias or ''} {entry.folder} {words} {tags}".lower()


def select_entries(
    entries: Sequence[NetworkEntry], filters: Filters, model_arch: Arch | None
) -> list[NetworkEntry]:
    """The entries the grid shows, in order: every search word must match name, alias,
    folder, trigger words or training tags."""
    words = filters.query.lower().split()
    chosen = [
        e
        for e in entries
        if all(w in _searchable(e) for w in words)
        and (filters.folder == ALL_FOLDERS or e.folder == filters.folder)
        and (filters.base == ANY_BASE or family_of(e) == filters.base)
        and (filters.show_all or is_compatible(e, model_arch))
    ]
    if filters.sort is SortOrder.NEWEST:
        chosen.sort(key=lambda e: (-e.mtime, e.name.lower()))
    elif filters.sort is SortOrder.LARGEST:
        chosen.sort(key=lambda e: (-e.size, e.name.lower()))
    else:
        chosen.sort(key=lambda e: e.name.lower())
    return chosen


def folders_of(entries: Sequence[NetworkEntry]) -> list[str]:
    return [ALL_FOLDERS, *sorted({e.folder for e in entries if e.folder}, key=str.lower)]


# -- previews ---------------------------------------------------------------------------------


class PreviewCache:
    """Small data-URL thumbnails, made once per file version."""

    def __init__(self) -> None:
        self._urls: dict[tuple[str, float, int, str], str | None] = {}

    def url(self, entry: NetworkEntry) -> str | None:
        key = (entry.name, entry.mtime, entry.size, str(entry.preview or ""))
        if key not in self._urls:
            self._urls[key] = self._make(entry)
        return self._urls[key]

    @staticmethod
    def _make(entry: NetworkEntry) -> str | None:
        try:
            data = preview_bytes(entry)
            if not data:
                return None
            with Image.open(io.BytesIO(data)) as image:
                thumb = image.convert("RGB")
                thumb.thumbnail((THUMB_SIZE, THUMB_SIZE))
                out = io.BytesIO()
                thumb.save(out, format="WEBP", quality=80)
        except (OSError, ValueError) as exc:
            log.warning("preview of %s unreadable: %s", entry.name, exc)
            return None
        return "data:image/webp;base64," + base64.b64encode(out.getvalue()).decode()

    def forget(self) -> None:
        self._urls.clear()


# -- the tab ----------------------------------------------------------------------------------


@dataclass
class NetworksView:
    """The tab's server-side state: the index, thumbnails, and the engine it feeds."""

    engine: Engine
    index: CatalogIndex
    previews: PreviewCache

    def entries(self) -> list[NetworkEntry]:
        return list(self.index.entries())

    def entry(self, name: str) -> NetworkEntry | None:
        return next((e for e in self.entries() if e.name == name), None)

    def model_arch(self) -> Arch | None:
        model = self.engine.model
        return model.kind.arch if model is not None else None

    def card(
        self, entry: NetworkEntry, prompt: str, selected: str | None, strength: float | None = None
    ) -> Card:
        arch = self.model_arch()
        return Card(
            name=entry.name,
            title=entry.name.rsplit("/", 1)[-1],  # what the tag uses
            subtitle=entry.alias if entry.alias != entry.name.rsplit("/", 1)[-1] else None,
            folder=entry.folder,
            base=entry.base,
            trigger_words=tuple(entry.trigger_words),
            preview_url=self.previews.url(entry),
            error=entry.error,
            compatible=is_compatible(entry, arch),
            family=entry.family,
            reason=detection_of(entry).refusal(entry.path.name),
            in_prompt=prompt_has_network(prompt, entry.name),
            selected=entry.name == selected,
            size=entry.size,
            mtime=entry.mtime,
            strength=strength,
        )

    def grid(self, filters: Filters, prompt: str, selected: str | None) -> str:
        entries = self.entries()
        shown = select_entries(entries, filters, self.model_arch())
        return render_grid(
            [self.card(e, prompt or "", selected) for e in shown],
            hidden=len(entries) - len(shown),
            folder_exists=self.index.folder.is_dir(),
        ) + self.embedding_grid(filters)

    def embedding_cards(self, filters: Filters) -> tuple[list[EmbeddingCard], int]:
        """The cards of `embeddings/` matching the search, and how many were left out as not
        for the loaded model (shown dimmed with "show all")."""
        widths = Engine.embedding_widths(self.engine.model)
        query = filters.query.strip().lower()
        cards: list[EmbeddingCard] = []
        hidden = 0
        for info in self.engine.embeddings.infos():
            if query and query not in info.name.lower():
                continue
            fits = widths is None or info.widths == widths  # no model yet: all are shown
            if not fits and info.error is None and not filters.show_all:
                hidden += 1
                continue
            compatible = fits or info.error is not None
            cards.append(
                EmbeddingCard(info.name, info.vector_count, info.encoders, info.error, compatible)
            )
        return cards, hidden

    def embedding_grid(self, filters: Filters) -> str:
        cards, hidden = self.embedding_cards(filters)
        return render_embedding_grid(cards, hidden)

    def details(self, name: str | None) -> Details | None:
        entry = self.entry(name) if name else None
        if entry is None:
            return None
        t = entry.training
        rows = summary_rows(
            base=entry.base,
            base_source=entry.base_source or "",
            variants=entry.variants,
            rank=entry.rank,
            alpha=entry.alpha,
            size=entry.size,
            mtime=entry.mtime,
            resolution=str(t.resolution) if t and t.resolution else None,
            epochs=t.epochs if t else None,
            images=t.images if t else None,
            steps=t.steps if t else None,
            base_checkpoint=t.base_checkpoint if t else None,
            autov2=entry.autov2,
        )
        return Details(
            name=entry.name,
            title=entry.alias or entry.name,
            rows=rows,
            tag_frequency=tuple(entry.tag_frequency),
            description=entry.description or "",
            error=entry.error,
        )


def _filters(query: str, sort: str, folder: str, base: str, show_all: bool) -> Filters:
    return Filters(query or "", SortOrder(sort), folder or ALL_FOLDERS, base or ANY_BASE, show_all)


def _last_image(gallery: Any) -> Path | None:
    """The first image of the txt2img gallery as a file path (the gallery holds the latest run)."""
    for item in gallery or []:
        value = item[0] if isinstance(item, list | tuple) else item
        if isinstance(value, dict):
            value = value.get("path") or (value.get("image") or {}).get("path")
        if isinstance(value, str | Path) and Path(value).is_file():
            return Path(value)
    return None


def build_networks_tab(
    engine: Engine,
    prompt: gr.Textbox,
    gallery: gr.Gallery | None = None,
    tab: gr.Tab | None = None,
) -> NetworksView:
    """Lay out the tab inside the current Blocks context; clicks write into `prompt`."""
    index = engine.catalog.index  # one scan and one cache, shared with generation's lookups
    index.start_hashing()
    view = NetworksView(engine, index, PreviewCache())
    engine.use_catalog_trigger_words()
    entries = view.entries()

    with gr.Row(equal_height=True, elem_id="networks-toolbar"):
        search = gr.Textbox(
            placeholder="Search name, folder, trigger words, training tags…",
            show_label=False,
            scale=4,
            elem_id="networks-search",
        )
        sort = gr.Dropdown(
            [s.value for s in SortOrder],
            value=SortOrder.NAME.value,
            show_label=False,
            scale=1,
            min_width=140,
            elem_id="networks-sort",
        )
        folder = gr.Dropdown(
            folders_of(entries),
            value=ALL_FOLDERS,
            show_label=False,
            scale=1,
            min_width=140,
            elem_id="networks-folder",
        )
        base = gr.Dropdown(
            [ANY_BASE, *(f.name for f in families.FAMILIES)],
            value=ANY_BASE,
            show_label=False,
            scale=1,
            min_width=110,
            elem_id="networks-base",
        )
        show_all = gr.Checkbox(
            label="Show incompatible", value=False, scale=0, min_width=170, elem_id="networks-all"
        )
        refresh = gr.Button(
            "↻ Refresh", scale=0, min_width=100, size="sm", elem_id="networks-refresh"
        )
    prompt_line = gr.HTML(elem_id="networks-prompt-line")
    selected = gr.State(None)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=400):
            grid = gr.HTML(
                view.grid(Filters(), "", None),
                js_on_load=CLICK_JS,
                elem_id="networks-grid",
            )
        with gr.Column(scale=2, min_width=320, elem_id="networks-details-column"):
            details = gr.HTML(render_details(None), js_on_load=CLICK_JS, elem_id="networks-details")
            with gr.Group(elem_id="networks-user-metadata"):
                activation = gr.Textbox(
                    label="Activation text (trigger words, comma separated)",
                    lines=2,
                    elem_id="networks-activation",
                )
                weight = gr.Number(
                    label="Preferred weight",
                    value=None,
                    step=0.05,
                    minimum=-5,
                    maximum=5,
                    elem_id="networks-weight",
                )
                notes = gr.Textbox(label="Notes", lines=3, elem_id="networks-notes")
            with gr.Row():
                save = gr.Button("Save", variant="primary", size="sm", elem_id="networks-save")
                use_preview = gr.Button(
                    "Use last generated image as preview", size="sm", elem_id="networks-use-preview"
                )
            status = gr.HTML(elem_id="networks-status")

    filter_inputs = [search, sort, folder, base, show_all]

    def redraw(prompt_text: str, sel: str | None, *values: Any) -> str:
        return view.grid(_filters(*values), prompt_text, sel)

    def editor_values(name: str | None) -> tuple[str, Any, Any, Any]:
        entry = view.entry(name) if name else None
        if entry is None:
            return render_details(None), "", None, ""
        return (
            render_details(view.details(name)),
            ", ".join(entry.trigger_words),
            entry.preferred_weight,
            entry.notes or "",
        )

    def on_click(
        prompt_text: str,
        sel: str | None,
        query: str,
        order: str,
        in_folder: str,
        of_base: str,
        everything: bool,
        evt: gr.EventData,
    ) -> tuple:
        values = (query, order, in_folder, of_base, everything)
        data = evt._data or {}
        name, kind = data.get("name") or sel, data.get("kind", "card")
        entry = view.entry(name) if name else None
        if kind == "word" and data.get("word"):
            prompt_text = add_word(prompt_text or "", str(data["word"]))
        elif kind == "embedding" and data.get("name"):
            prompt_text = insert_embedding(prompt_text or "", str(data["name"]))
            name, entry = sel, view.entry(sel) if sel else None
        elif kind == "card" and entry is not None:
            prompt_text = toggle_network(prompt_text or "", entry.name, entry.preferred_weight)
        if entry is not None:
            sel = entry.name
        grid_html = view.grid(_filters(*values), prompt_text, sel)
        return (prompt_text, sel, grid_html, *editor_values(sel))

    click_outputs = [prompt, selected, grid, details, activation, weight, notes]
    for source in (grid, details):
        source.click(
            on_click,
            inputs=[prompt, selected, *filter_inputs],
            outputs=click_outputs,
            queue=False,
        )
    for control in (sort, folder, base, show_all):
        control.change(redraw, inputs=[prompt, selected, *filter_inputs], outputs=grid, queue=False)
    search.change(redraw, inputs=[prompt, selected, *filter_inputs], outputs=grid, queue=False)

    def show_prompt(prompt_text: str) -> str:
        text = prompt_text.strip() if prompt_text else ""
        if not text:
            return "<div class='lw-prompt-line lw-muted'>Prompt is empty: click a card to add its tag.</div>"
        return f"<div class='lw-prompt-line'><span>Prompt</span> {html.escape(text)}</div>"

    prompt.change(show_prompt, inputs=prompt, outputs=prompt_line, queue=False)

    def on_refresh(prompt_text: str, sel: str | None, *values: Any) -> tuple:
        view.index.refresh()
        view.engine.catalog.refresh()
        view.previews.forget()
        fresh = view.entries()
        filters = _filters(*values)
        if filters.folder not in folders_of(fresh):
            filters = replace(filters, folder=ALL_FOLDERS)
        return (
            gr.update(choices=folders_of(fresh), value=filters.folder),
            view.grid(filters, prompt_text, sel),
            *editor_values(sel),
            f"<div class='lw-status'>Found {len(fresh)} LoRA file(s).</div>",
        )

    refresh.click(
        on_refresh,
        inputs=[prompt, selected, *filter_inputs],
        outputs=[folder, grid, details, activation, weight, notes, status],
    )

    def on_save(
        sel: str | None, words: str, w: float | None, note: str, prompt_text: str, *values: Any
    ) -> tuple:
        entry = view.entry(sel) if sel else None
        if entry is None:
            return gr.update(), warnings_html(["Select a LoRA first (click its card)."])
        try:
            save_user_metadata(entry.path, words or "", w, note or "")
            view.index.refresh()
        except Exception as exc:  # shown as one line next to the button
            return gr.update(), warnings_html([user_message(exc)])
        return (
            view.grid(_filters(*values), prompt_text, sel),
            f"<div class='lw-status'>Saved {entry.name}.</div>",
        )

    save.click(
        on_save,
        inputs=[selected, activation, weight, notes, prompt, *filter_inputs],
        outputs=[grid, status],
    )

    def on_use_preview(sel: str | None, images: Any, prompt_text: str, *values: Any) -> tuple:
        entry = view.entry(sel) if sel else None
        if entry is None:
            return gr.update(), warnings_html(["Select a LoRA first (click its card)."])
        path = _last_image(images)
        if path is None:
            return gr.update(), warnings_html(["Generate an image in txt2img first."])
        try:
            with Image.open(path) as image:
                set_preview(entry, image.copy())
            view.index.refresh()
            view.previews.forget()
        except Exception as exc:  # shown as one line next to the button
            return gr.update(), warnings_html([user_message(exc)])
        return (
            view.grid(_filters(*values), prompt_text, sel),
            f"<div class='lw-status'>Preview of {entry.name} set.</div>",
        )

    if gallery is not None:
        use_preview.click(
            on_use_preview,
            inputs=[selected, gallery, prompt, *filter_inputs],
            outputs=[grid, status],
        )

    if tab is not None:  # the model may have loaded since: compatibility and badges change
        tab.select(redraw, inputs=[prompt, selected, *filter_inputs], outputs=grid, queue=False)
        tab.select(show_prompt, inputs=prompt, outputs=prompt_line, queue=False)
    return view
