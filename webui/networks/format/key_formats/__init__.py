"""LoRA key formats: for each one, a detector ("is this module name mine?") and a converter to the
canonical module name, applied to every key before tensors are grouped into modules."""

from __future__ import annotations

from collections.abc import Iterable

from webui.networks.format.key_formats import (
    attn_processor,
    kohya,
    ldm,
    lycoris,
    onetrainer,
    peft,
    xlabs,
)
from webui.networks.format.key_formats.embeddings import embedding_name, is_embedding_key
from webui.networks.format.key_formats.format import KeyFormat

# Checked in order; the first that owns a prefix converts it.
FORMATS: tuple[KeyFormat, ...] = (
    xlabs.FORMAT,
    kohya.FORMAT,
    lycoris.FORMAT,
    onetrainer.FORMAT,
    attn_processor.FORMAT,
    peft.FORMAT,
    ldm.FORMAT,
)
UNKNOWN = "unknown"


def format_of(prefix: str) -> KeyFormat | None:
    """The format that owns a module prefix, or None."""
    for key_format in FORMATS:
        if key_format.owns(prefix):
            return key_format
    return None


def canonical_prefix(prefix: str) -> str:
    """A module prefix in its canonical spelling (unknown spellings unchanged)."""
    key_format = format_of(prefix)
    return prefix if key_format is None else key_format.canonical(prefix)


def identify_format(prefixes: Iterable[str]) -> str:
    """The name of the known format most module prefixes are in, "unknown" when none is known
    (OneTrainer files also hold `unet.` names, so it wins whenever any of its own names is
    present; names no detector owns, such as ComfyUI's `text_encoders.clip_l.`, do not outvote
    the known ones)."""
    counts: dict[str, int] = {}
    for prefix in prefixes:
        key_format = format_of(prefix)
        if key_format is onetrainer.FORMAT or (
            key_format is None and is_embedding_key(prefix) and ".clip_" in prefix
        ):
            return onetrainer.FORMAT.name
        name = UNKNOWN if key_format is None else key_format.name
        counts[name] = counts.get(name, 0) + 1
    known = {name: count for name, count in counts.items() if name != UNKNOWN}
    if not known:
        return UNKNOWN
    return max(known, key=lambda name: known[name])


__all__ = [
    "FORMATS",
    "UNKNOWN",
    "KeyFormat",
    "canonical_prefix",
    "embedding_name",
    "format_of",
    "identify_format",
    "is_embedding_key",
]
