"""The Networks tab's pure parts: prompt editing, filtering and sorting, and the HTML it renders."""

from __future__ import annotations

from pathlib import Path

import pytest

from webui.arch import Arch
from webui.networks.library import NetworkEntry
from webui.ui.networks_cards import Card, Details, initials, render_details, render_grid
from webui.ui.networks_tab import (
    ALL_FOLDERS,
    Filters,
    SortOrder,
    add_word,
    folders_of,
    select_entries,
    toggle_network,
)


def entry(name: str, **fields) -> NetworkEntry:
    folder = name.rpartition("/")[0]
    return NetworkEntry(name=name, path=Path(f"/l/{name}.safetensors"), folder=folder, **fields)


ENTRIES = [
    entry("styles/ink", base=Arch.SD1, size=30, mtime=3, tag_frequency=(("brush", 5),)),
    entry("chars/alice", base=Arch.SDXL, size=10, mtime=9, alias="Alice XL"),
    entry("zeta", base=None, size=20, mtime=1, trigger_words=("zeta style",)),
]


@pytest.mark.parametrize(
    ("prompt", "name", "weight", "expected"),
    [
        ("", "ink", None, "<lora:ink:1>"),
        ("a cat", "styles/ink", 0.7, "a cat, <lora:styles/ink:0.7>"),
        ("a cat,", "ink", 0.5, "a cat, <lora:ink:0.5>"),
        ("a cat, <lora:styles/ink:0.7>", "styles/ink", 0.7, "a cat"),
        ("<lora:INK:0.3>, a cat", "styles/ink", None, "a cat"),  # by file name, any case
        ("a <lora:ink:1> cat", "ink", None, "a cat"),
    ],
)
def test_toggle_network(prompt: str, name: str, weight: float | None, expected: str) -> None:
    assert toggle_network(prompt, name, weight) == expected


def test_add_word_skips_words_already_there() -> None:
    assert add_word("a cat", "ink wash") == "a cat, ink wash"
    assert add_word("a cat, Ink Wash", "ink wash") == "a cat, Ink Wash"
    assert add_word("", "ink") == "ink"


@pytest.mark.parametrize(
    ("filters", "arch", "expected"),
    [
        (Filters(), Arch.SD1, ["styles/ink", "zeta"]),  # SDXL hidden, unknown base kept
        (Filters(show_all=True), Arch.SD1, ["chars/alice", "styles/ink", "zeta"]),
        (Filters(), None, ["chars/alice", "styles/ink", "zeta"]),  # no model: nothing hidden
        (Filters(query="alice"), Arch.SDXL, ["chars/alice"]),  # alias
        (Filters(query="brush"), None, ["styles/ink"]),  # training tag
        (Filters(query="zeta style"), None, ["zeta"]),  # trigger word
        (Filters(folder="styles"), None, ["styles/ink"]),
        (Filters(base="SDXL"), None, ["chars/alice"]),
        (Filters(sort=SortOrder.NEWEST), None, ["chars/alice", "styles/ink", "zeta"]),
        (Filters(sort=SortOrder.LARGEST), None, ["styles/ink", "zeta", "chars/alice"]),
    ],
)
def test_select_entries(filters: Filters, arch: Arch | None, expected: list[str]) -> None:
    assert [e.name for e in select_entries(ENTRIES, filters, arch)] == expected


def test_folders() -> None:
    assert folders_of(ENTRIES) == [ALL_FOLDERS, "chars", "styles"]


def test_card_html_escapes_and_marks_state() -> None:
    card = Card(
        name="x/<b>",
        title="<b>",
        folder="x",
        base=Arch.SDXL,
        trigger_words=("a'b",),
        compatible=False,
        in_prompt=True,
        error="bad header",
    )
    page = render_grid([card], hidden=2)
    assert "<b>" not in page and "&lt;b&gt;" in page
    assert "lw-incompatible" in page and "lw-in-prompt" in page and "lw-badge-error" in page
    assert "data-word='a&#x27;b'" in page
    assert "1 shown · 2 hidden" in page


def test_placeholder_and_empty_states() -> None:
    assert initials("ink_wash") == "IW" and initials("cutout") == "CU" and initials("") == "?"
    assert "lw-card-ph" in render_grid([Card("a", "a", "", None)])
    assert "No LoRA files yet" in render_grid([])
    assert "does not exist" in render_grid([], folder_exists=False)
    assert "3 hidden" in render_grid([], hidden=3)


def test_details_html() -> None:
    details = Details("ink", "Ink", (("Base", "SD1"),), (("brush", 10), ("ink", 5)))
    page = render_details(details)
    assert "lw-tag-table" in page and "data-word='brush'" in page and "width:50%" in page
    assert "Click a card" in render_details(None)
