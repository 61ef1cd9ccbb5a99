"""Auto-applied trigger words: the words a LoRA was trained on, added to the text CLIP sees.

The prompt the user typed (and the infotext's prompt) stays as written; the words added are
recorded separately, so an image can be reproduced with or without the setting."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ALL_TRIGGER_WORDS = -1  # `Settings.auto_trigger_words`: 0 off, N the first N of each, -1 all

# The modes the UI offers, by label.
TRIGGER_WORD_MODES: dict[str, int] = {
    "Off": 0,
    "First word": 1,
    "First 3 words": 3,
    "All words": ALL_TRIGGER_WORDS,
}


def trigger_mode_label(limit: int) -> str:
    """The label of a mode; another count (written in the settings file) reads `First N words`."""
    found = next((k for k, v in TRIGGER_WORD_MODES.items() if v == limit), None)
    return found or f"First {limit} words"


def trigger_mode_limit(label: str) -> int:
    """The inverse of `trigger_mode_label`; ValueError for a label it never makes."""
    if label in TRIGGER_WORD_MODES:
        return TRIGGER_WORD_MODES[label]
    match = re.fullmatch(r"First (\d+) words", label or "")
    if match is None:
        raise ValueError(f"unknown trigger-word mode {label!r}")
    return int(match.group(1))


def trigger_mode_choices(limit: int) -> list[str]:
    """The offered labels, plus the one of `limit` when it is another count."""
    label = trigger_mode_label(limit)
    return [*TRIGGER_WORD_MODES, *([label] if label not in TRIGGER_WORD_MODES else [])]


TriggerWordSource = Callable[[Path], Sequence[str]]


@dataclass(frozen=True)
class TriggerWords:
    """The prompt text to encode and the words that were added to it (in order)."""

    prompt: str
    added: tuple[str, ...]


def no_trigger_words(path: Path) -> Sequence[str]:
    """The source used until the UI installs the catalog's: nothing is known."""
    return ()


def _present(prompt: str, word: str) -> bool:
    """Whether `word` already stands in the prompt as a whole phrase, any case."""
    pattern = rf"(?<![\w]){re.escape(word.strip())}(?![\w])"
    return re.search(pattern, prompt, flags=re.IGNORECASE) is not None


def add_trigger_words(
    prompt: str, words_per_network: Sequence[Sequence[str]], limit: int
) -> TriggerWords:
    """Append each network's first `limit` trigger words (all when `limit` is
    ALL_TRIGGER_WORDS, none when 0) that the prompt does not already hold."""
    if limit == 0:
        return TriggerWords(prompt, ())
    added: list[str] = []
    text = prompt
    for words in words_per_network:
        chosen = [w.strip() for w in words if w.strip()]
        if limit > 0:
            chosen = chosen[:limit]
        for word in chosen:
            if _present(text, word):
                continue
            text = f"{text.rstrip().rstrip(',')}, {word}" if text.strip() else word
            added.append(word)
    return TriggerWords(text, tuple(added))
