"""Pure edits of a prompt's text by the network cards: insert or remove `<lora:NAME:W>`, add a
trigger word. Values in, text out; the separators a removed piece leaves are cleaned up."""

from __future__ import annotations

import re

from webui.prompt import parse_prompt

DEFAULT_STRENGTH = 1.0


def lora_tag(name: str, weight: float | None) -> str:
    """`<lora:NAME:W>`; weight 1 when the file has no preferred weight."""
    value = DEFAULT_STRENGTH if weight is None else weight
    return f"<lora:{name}:{value:g}>"


def _same_network(tag_name: str, name: str) -> bool:
    wanted = tag_name.replace("\\", "/").strip("/").lower()
    return wanted in (name.lower(), name.rsplit("/", 1)[-1].lower())


def prompt_has_network(prompt: str, name: str) -> bool:
    return any(_same_network(tag.name, name) for tag in parse_prompt(prompt).tags)


def weight_in_prompt(prompt: str, name: str) -> float | None:
    """The strength of the first tag of `name` in the prompt (None: not there)."""
    for tag in parse_prompt(prompt).tags:
        if _same_network(tag.name, name):
            return tag.strength
    return None


def append_piece(prompt: str, text: str) -> str:
    """`text` after the prompt, separated by a comma."""
    stripped = prompt.rstrip()
    if not stripped:
        return text
    return f"{stripped} {text}" if stripped.endswith(",") else f"{stripped}, {text}"


def remove_piece(prompt: str, piece: str) -> str:
    """The prompt without the first occurrence of `piece`, and without the separator it leaves:
    one comma and one space remain between its neighbours, none at either end; the rest of the
    prompt is untouched."""
    at = prompt.find(piece)
    if at < 0:
        return prompt
    raw_before, raw_after = prompt[:at], prompt[at + len(piece) :]
    before, after = raw_before.rstrip(), raw_after.lstrip()
    gap = raw_before[len(before) :] + raw_after[: len(raw_after) - len(after)]
    space = "\n" if "\n" in gap else " "
    comma_before, comma_after = before.endswith(","), after.startswith(",")
    if comma_after and (comma_before or not before):
        after = after[1:].lstrip()  # one comma is enough; none at the start
    if comma_before and not after:
        before = before[:-1].rstrip()  # none at the end
    if not before or not after:
        return before + after
    return before + after if after.startswith(",") else before + space + after


def toggle_network(prompt: str, name: str, weight: float | None) -> str:
    """Add `<lora:NAME:W>` to the prompt, or remove every tag of that network if present."""
    tags = [t for t in parse_prompt(prompt).tags if _same_network(t.name, name)]
    if not tags:
        return append_piece(prompt, lora_tag(name, weight))
    for tag in tags:
        prompt = remove_piece(prompt, tag.text)
    return prompt


def add_word(prompt: str, word: str) -> str:
    """Append a trigger word unless the prompt already holds it (any case, whole phrase)."""
    word = word.strip()
    if not word or re.search(rf"(?<!\w){re.escape(word)}(?!\w)", prompt, re.IGNORECASE):
        return prompt
    return append_piece(prompt, word)


def insert_embedding(prompt: str, name: str) -> str:
    """A1111's embedding-card click: the embedding's name after the prompt, unless it is there."""
    return add_word(prompt, name)
