"""Network tags in prompts: `<lora:NAME>`, `<lora:NAME:W>` (and `<lyco:...>`), removed from the
text sent to the text encoder and returned as typed tags. Pure: imports nothing of ours."""

from __future__ import annotations

import re
from dataclasses import dataclass

NETWORK_KINDS = ("lora", "lyco")
_TAG = re.compile(r"<(\w+):([^>]*)>")


@dataclass(frozen=True)
class NetworkTag:
    """One `<lora:...>` tag: the network name, its strength, and the tag as typed."""

    name: str
    strength: float
    text: str


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt with its network tags taken out; `errors` name each tag that could not be read."""

    text: str
    tags: tuple[NetworkTag, ...]
    errors: tuple[str, ...]


def _parse_tag(text: str, args: str) -> NetworkTag | str:
    parts = [part.strip() for part in args.split(":")]
    name = parts[0]
    if not name:
        return f"{text}: the tag names no network"
    if len(parts) < 2 or parts[1] == "":
        return NetworkTag(name, 1.0, text)
    try:
        strength = float(parts[1])
    except ValueError:
        return f"{text}: strength {parts[1]!r} is not a number"
    return NetworkTag(name, strength, text)


def _tidy(text: str) -> str:
    # removing a tag leaves doubled spaces and dangling commas behind
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r",(\s*,)+", ",", text)
    return text.strip().strip(",").strip()


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Split network tags from a prompt. Tags of other kinds (`<hypernet:...>`) are left in the
    text; malformed network tags are removed and reported."""
    tags: list[NetworkTag] = []
    errors: list[str] = []

    def take(match: re.Match[str]) -> str:
        if match.group(1).lower() not in NETWORK_KINDS:
            return match.group(0)
        parsed = _parse_tag(match.group(0), match.group(2))
        if isinstance(parsed, str):
            errors.append(parsed)
        else:
            tags.append(parsed)
        return ""

    text = _TAG.sub(take, prompt)
    return ParsedPrompt(_tidy(text), tuple(tags), tuple(errors))
