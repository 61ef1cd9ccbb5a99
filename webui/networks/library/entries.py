"""The typed values of the LoRA index: a file's entry and the facts it is built from (its
header's and its sidecars')."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import webui.networks.library.sidecars as sidecars
from webui.arch import Arch
from webui.networks.format.training_metadata import (
    TrainingFacts,
)
from webui.networks.library.tag_counts import Pair, TagCounts

# The reason an entry carries when reading its file failed in a way nothing here anticipated.
UNEXPECTED_ERROR = "unexpected error while reading the file"


@dataclass(frozen=True)
class NetworkEntry:
    """One LoRA file as the Networks browser shows it. Built from the header and sidecars only;
    a file that cannot be read is still listed, with `error` saying why."""

    name: str  # path below loras/ without extension, `/`-separated
    path: Path
    folder: str  # the parent part of `name`, "" at the top
    alias: str | None = None  # ss_output_name
    base: Arch | None = None
    base_source: str = ""
    family: str | None = None  # the family it was made for, also one this app does not run
    key_format: str = ""  # the key-name format (`identify_format`)
    variants: tuple[str, ...] = ()  # lora, loha, lokr, ia3, glora, oft, boft, full, norm, dora
    rank: int | None = None  # the most common rank
    alpha: float | None = None  # the most common alpha
    size: int = 0
    mtime: float = 0.0
    training: TrainingFacts = field(default_factory=TrainingFacts)
    tag_frequency: Sequence[Pair] = TagCounts()  # caption tags, most frequent first
    trigger_words: tuple[str, ...] = ()
    preferred_weight: float | None = None
    notes: str = ""
    sd_version: str | None = None  # the user's, from <name>.json
    description: str | None = None  # the user's, else civitai's
    preview: Path | None = None  # a preview image file next to the network
    embedded_preview: bool = False  # ssmd_cover_images or modelspec.thumbnail in the header
    error: str | None = None
    autov2: str | None = None  # filled once the background hashing reaches the file
    autov3: str | None = None


@dataclass(frozen=True)
class HeaderFacts:
    """Everything an entry takes from the network file itself (cached until the file changes)."""

    alias: str | None = None
    base: Arch | None = None
    base_source: str = ""
    family: str | None = None
    key_format: str = ""
    variants: tuple[str, ...] = ()
    rank: int | None = None
    alpha: float | None = None
    training: TrainingFacts = field(default_factory=TrainingFacts)
    tag_frequency: Sequence[Pair] = TagCounts()
    spec_trigger_words: tuple[str, ...] = ()  # modelspec.trigger_phrase, modelspec.tags
    embedded_preview: bool = False
    error: str | None = None


@dataclass(frozen=True)
class SidecarFacts:
    """Everything an entry takes from files next to it (cached until one of them changes)."""

    user: sidecars.UserMetadata | None = None
    civitai: sidecars.CivitaiInfo | None = None
    preview: str | None = None  # file name in the network's folder
