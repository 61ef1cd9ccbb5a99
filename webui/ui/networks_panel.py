"""The Networks panel under txt2img's prompt (A1111's extra-networks pane): the LoRA cards, each
with a strength; a click inserts `<lora:NAME:W>` or removes it. Browsing and editing a file's
metadata stay in the Networks tab; both read the same catalog index."""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from webui.engine.generate import Engine
from webui.networks.library import NetworkEntry
from webui.ui.folder_watch import FolderWatch
from webui.ui.networks_cards import render_grid
from webui.ui.networks_tab import CLICK_JS, Filters, NetworksView, PreviewCache, select_entries
from webui.ui.prompt_edit import DEFAULT_STRENGTH, add_word, toggle_network, weight_in_prompt

log = logging.getLogger(__name__)


def card_strength(entry: NetworkEntry, prompt: str, typed: dict[str, float]) -> float:
    """What a card's strength box shows: its tag's strength when the prompt holds it, else what
    the user typed on this page, else the file's preferred weight, else 1."""
    in_prompt = weight_in_prompt(prompt, entry.name)
    if in_prompt is not None:
        return in_prompt
    if entry.name in typed:
        return typed[entry.name]
    return entry.preferred_weight if entry.preferred_weight is not None else DEFAULT_STRENGTH


def parse_strength(value: Any) -> float | None:
    """The strength box's text as a number; None when it is empty or not a finite number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if abs(number) < float("inf") else None


def panel_grid(view: NetworksView, prompt: str, query: str, show_all: bool, typed: dict) -> str:
    entries = view.entries()
    shown = select_entries(
        entries, Filters(query=query or "", show_all=show_all), view.model_arch()
    )
    cards = [
        view.card(e, prompt, None, strength=None if e.error else card_strength(e, prompt, typed))
        for e in shown
    ]
    return render_grid(
        cards, hidden=len(entries) - len(shown), folder_exists=view.index.folder.is_dir()
    )


def build_networks_panel(engine: Engine, prompt: gr.Textbox) -> None:
    """An accordion, closed at first, inside the current Blocks context; clicks write into
    `prompt`."""
    view = NetworksView(engine, engine.catalog.index, PreviewCache())
    watch = FolderWatch(engine.settings.loras_dir)
    with gr.Accordion("Networks", open=False, elem_id="txt2img-networks") as panel:
        with gr.Row(equal_height=True):
            search = gr.Textbox(
                placeholder="Search name, folder, trigger words…",
                show_label=False,
                info="filters the cards by name, folder, alias or trigger words",
                scale=4,
                elem_id="txt2img-networks-search",
            )
            show_all = gr.Checkbox(
                label="Show incompatible",
                value=False,
                info="also list LoRAs made for another base (they would be skipped)",
                scale=0,
                min_width=170,
                elem_id="txt2img-networks-all",
            )
            refresh = gr.Button(
                "↻ Refresh", scale=0, min_width=100, size="sm", elem_id="txt2img-networks-refresh"
            )
        grid = gr.HTML(js_on_load=CLICK_JS, elem_id="txt2img-networks-grid")
    typed = gr.State({})  # strengths typed on this page, by network name

    def redraw(prompt_text: str, query: str, everything: bool, strengths: dict) -> str:
        return panel_grid(view, prompt_text or "", query, everything, strengths or {})

    def on_click(
        prompt_text: str, strengths: dict, query: str, everything: bool, evt: gr.EventData
    ) -> tuple[str, dict, str]:
        data = evt._data or {}
        entry = view.entry(str(data.get("name") or ""))
        strengths = dict(strengths or {})
        prompt_text = prompt_text or ""
        if data.get("kind") == "card" and entry is not None:
            weight = parse_strength(data.get("weight"))
            if weight is not None:
                strengths[entry.name] = weight
            else:
                weight = card_strength(entry, prompt_text, strengths)
            prompt_text = toggle_network(prompt_text, entry.name, weight)
        elif data.get("kind") == "word" and data.get("word"):
            prompt_text = add_word(prompt_text, str(data["word"]))
        return prompt_text, strengths, redraw(prompt_text, query, everything, strengths)

    inputs = [prompt, search, show_all, typed]
    grid.click(
        on_click,
        inputs=[prompt, typed, search, show_all],
        outputs=[prompt, typed, grid],
        queue=False,
    )

    def on_open(*values: Any) -> str:
        """Drawn when opened (the model, and so compatibility, may have changed since); files
        added or removed in `loras/` since the last look are read first, without Refresh."""
        if watch.changed():
            view.engine.catalog.refresh()
            view.previews.forget()
        return redraw(*values)

    panel.expand(on_open, inputs=inputs, outputs=grid, queue=False)
    search.change(redraw, inputs=inputs, outputs=grid, queue=False)
    show_all.change(redraw, inputs=inputs, outputs=grid, queue=False)

    def on_refresh(*values: Any) -> str:
        view.index.refresh()
        view.engine.catalog.refresh()
        view.previews.forget()
        return redraw(*values)

    refresh.click(on_refresh, inputs=inputs, outputs=grid)
