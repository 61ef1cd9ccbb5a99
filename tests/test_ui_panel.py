"""txt2img's Networks panel, pure parts: inserting and removing `<lora:NAME:W>` leaves clean
separators, the strength a card shows, and the card's title (the tag's name) and subtitle."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from webui.networks.library import NetworkEntry
from webui.ui.networks_cards import Card, render_card
from webui.ui.networks_panel import card_strength, parse_strength
from webui.ui.prompt_edit import remove_piece, toggle_network


def entry(name: str, **fields) -> NetworkEntry:
    return NetworkEntry(name=name, path=Path(f"/l/{name}.safetensors"), folder="", **fields)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a cat, <lora:x:1>, sumi-e", "a cat, sumi-e"),
        ("a cat,<lora:x:1>,sumi-e", "a cat, sumi-e"),
        ("a cat , <lora:x:1> , sumi-e", "a cat , sumi-e"),  # the user's own spacing stays
        ("<lora:x:1>, a cat", "a cat"),
        ("a cat, <lora:x:1>", "a cat"),
        ("a cat, <lora:x:1>,", "a cat"),
        ("a <lora:x:1> cat", "a cat"),
        ("a cat <lora:x:1>, sumi-e", "a cat, sumi-e"),
        ("a cat, <lora:x:1> sumi-e", "a cat, sumi-e"),
        ("<lora:x:1>", ""),
        ("a cat,\n<lora:x:1>\nsumi-e", "a cat,\nsumi-e"),
        ("a  cat, <lora:x:1>, sumi-e", "a  cat, sumi-e"),  # spaces elsewhere untouched
    ],
)
def test_removing_a_tag_leaves_clean_separators(prompt: str, expected: str) -> None:
    assert toggle_network(prompt, "x", 1.0) == expected


@pytest.mark.parametrize(
    ("prompt", "weight", "expected"),
    [
        ("", 0.45, "<lora:x:0.45>"),
        ("a cat", None, "a cat, <lora:x:1>"),
        ("a cat, ", 0.8, "a cat, <lora:x:0.8>"),
        ("a cat, <lora:y:1>", -0.5, "a cat, <lora:y:1>, <lora:x:-0.5>"),
    ],
)
def test_inserting_a_tag(prompt: str, weight: float | None, expected: str) -> None:
    assert toggle_network(prompt, "x", weight) == expected


_word = st.text(alphabet="abcdefgh ()-", min_size=1, max_size=8).map(str.strip).filter(bool)


@settings(max_examples=80)
@given(st.lists(_word, min_size=0, max_size=5), st.integers(0, 5))
def test_insert_then_remove_gives_the_prompt_back(words: list[str], at: int) -> None:
    """A tag anywhere in a `, `-separated prompt removes back to the prompt without it."""
    at = min(at, len(words))
    with_tag = ", ".join([*words[:at], "<lora:x:0.5>", *words[at:]])
    assert remove_piece(with_tag, "<lora:x:0.5>") == ", ".join(words)
    assert toggle_network(", ".join(words), "x", 0.5).endswith("<lora:x:0.5>")


def test_card_strength_order() -> None:
    preferred = entry("ink", preferred_weight=0.7)
    plain = entry("cut")
    assert card_strength(plain, "", {}) == 1.0
    assert card_strength(preferred, "", {}) == 0.7  # the sidecar's preferred weight
    assert card_strength(preferred, "", {"ink": 0.3}) == 0.3  # typed on this page
    assert card_strength(preferred, "a, <lora:ink:0.25>", {"ink": 0.3}) == 0.25  # in the prompt


@pytest.mark.parametrize(
    ("text", "expected"), [("0.45", 0.45), ("-1", -1.0), ("", None), ("x", None), ("inf", None)]
)
def test_parse_strength(text: str, expected: float | None) -> None:
    assert parse_strength(text) == expected


def test_card_title_is_the_tag_name_with_the_alias_below() -> None:
    html = render_card(
        Card(
            name="styles/ink_wash",
            title="ink_wash",
            folder="styles",
            base=None,
            subtitle="Ink Wash v2",
            strength=0.7,
        )
    )
    assert "ink_wash</div>" in html
    assert "lw-card-subtitle" in html and "Ink Wash v2" in html
    assert "data-strength='1'" in html and "value='0.7'" in html
    assert "lw-card-subtitle" not in render_card(Card(name="a", title="a", folder="", base=None))


def test_view_titles_a_card_by_its_file_stem() -> None:
    from types import SimpleNamespace

    from webui.ui.networks_tab import NetworksView, PreviewCache

    view = NetworksView(SimpleNamespace(model=None), None, PreviewCache())  # type: ignore[arg-type]
    aliased = view.card(entry("styles/ink_wash", alias="Ink Wash v2"), "", None)
    assert (aliased.title, aliased.subtitle) == ("ink_wash", "Ink Wash v2")
    same = view.card(entry("cutout", alias="cutout"), "", None)
    assert (same.title, same.subtitle) == ("cutout", None)
