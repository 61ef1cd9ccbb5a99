"""A model family as data: how its LoRA files show what they were made for."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from webui.arch import Arch


@dataclass(frozen=True)
class WidthSignature:
    """A key pattern shared by several families: it names this one when the layer's input width
    (shape[1] of the input-side tensor) is one of `widths`."""

    pattern: re.Pattern[str]
    widths: frozenset[int]


@dataclass(frozen=True)
class Family:
    """One row of the family table.

    Key patterns are searched in flattened key names (dots as underscores), format prefixes
    included, so one pattern covers kohya, PEFT and original-layout spellings."""

    name: str  # as users know it: "FLUX.1"
    arch: Arch | None  # what this app runs it as; None: recognised, never applied
    modelspec: tuple[str, ...] = ()  # `modelspec.architecture` prefixes (before "/lora")
    base_versions: tuple[str, ...] = ()  # `ss_base_model_version` regexes (lowercase, `_` for -)
    civitai: tuple[str, ...] = ()  # civitai `baseModel` values
    keys: tuple[re.Pattern[str], ...] = ()  # names only this family has
    widths: tuple[WidthSignature, ...] = ()
    text_widths: frozenset[int] = field(default_factory=frozenset)  # text-encoder hidden widths

    @property
    def runs(self) -> bool:
        """Whether this app runs models of this family."""
        return self.arch is not None


def patterns(*sources: str) -> tuple[re.Pattern[str], ...]:
    """Compiled key patterns."""
    return tuple(re.compile(source) for source in sources)


def shared(source: str, *widths: int) -> WidthSignature:
    """A key pattern that names a family at these input widths."""
    return WidthSignature(re.compile(source), frozenset(widths))
