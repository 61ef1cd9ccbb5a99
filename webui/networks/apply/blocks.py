"""Which block of the denoiser a module lives in, as LoRA Block Weight users number them, and
the one place that picks a model's block map by family (`model_blocks`).

UNets (SD1, SD2, SDXL) use the LDM numbering (IN00..IN11, M00, OUT00..OUT11 for SD1/SD2;
IN00..IN08, M00, OUT00..OUT08 for SDXL). The rule for `in=`/`mid=`/`out=`: a module in
`input_blocks.N` (conv_in is input_blocks.0) is "in", `middle_block` is "mid", `output_blocks.N`
is "out", and the final norm and conv (`out.*`) count as "out". The time and label embeddings
belong to no block: they take the `unet` strength.

Transformer families keep their block map as data in their family folder (FLUX.1:
`webui/families/flux1/blocks.py`); their blocks are known by label alone (D05, S37, IN, OUT),
and only a block vector reaches them, never `in=`/`mid=`/`out=`."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from webui.arch import Arch
from webui.families.flux1 import blocks as flux1_blocks
from webui.layouts.unet import unet_module_names
from webui.prompt import block_labels


class BlockKind(StrEnum):
    INPUT = "in"
    MIDDLE = "mid"
    OUTPUT = "out"
    TRANSFORMER = "transformer"  # a transformer family's block, named by its label
    OUTSIDE = "outside"


@dataclass(frozen=True)
class UnetBlock:
    """A denoiser module's block: a UNet block (kind and LDM index, None for the middle and
    outside) or a transformer block (kind TRANSFORMER) with its label in `name`."""

    kind: BlockKind
    index: int | None = None
    name: str | None = None

    @property
    def label(self) -> str | None:
        """The LoRA Block Weight label (IN04, M00, OUT11; FLUX.1 D05, S37, IN, OUT), or None
        outside the labelled blocks."""
        if self.kind is BlockKind.TRANSFORMER:
            return self.name
        if self.kind is BlockKind.INPUT:
            return f"IN{self.index:02d}"
        if self.kind is BlockKind.OUTPUT and self.index is not None:
            return f"OUT{self.index:02d}"
        if self.kind is BlockKind.MIDDLE:
            return "M00"
        return None


OUTSIDE = UnetBlock(BlockKind.OUTSIDE)
_LDM_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.")
UNET_VECTOR_LENGTHS = (12, 17, 20, 26)  # LoRA Block Weight applies each by label on any UNet


def transformer_block(label: str) -> UnetBlock:
    """A transformer family's block, known by its label."""
    return UnetBlock(BlockKind.TRANSFORMER, name=label)


def block_of_ldm_path(ldm_path: str) -> UnetBlock:
    """The block of an LDM module path such as `input_blocks.4.1.proj_in`."""
    match = _LDM_BLOCK.match(ldm_path)
    if match:
        kind = BlockKind.INPUT if match.group(1) == "input_blocks" else BlockKind.OUTPUT
        return UnetBlock(kind, int(match.group(2)))
    if ldm_path.startswith("middle_block."):
        return UnetBlock(BlockKind.MIDDLE)
    if ldm_path.startswith("out."):
        return UnetBlock(BlockKind.OUTPUT)  # final norm/conv: "out", but no numbered label
    return OUTSIDE


def unet_blocks(unet_config: Mapping[str, Any]) -> dict[str, UnetBlock]:
    """Diffusers module path -> its block, for every parameter-owning UNet module."""
    return {path: block_of_ldm_path(ldm) for path, ldm in unet_module_names(unet_config).items()}


def lengths_text(lengths: Collection[int]) -> str:
    """`12, 17, 20 or 26`: vector lengths in words."""
    words = [str(length) for length in lengths]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


@dataclass(frozen=True)
class BlockMap:
    """One model's denoiser blocks by diffusers module path, and the block vectors it takes."""

    model: str  # the family as users know it, for messages
    blocks: Mapping[str, UnetBlock] = field(default_factory=dict)
    vector_lengths: tuple[int, ...] = ()  # () when the model is not known: nothing is checked
    blocks_in_words: str = "lbw="  # how users reach its blocks, for messages

    def block(self, path: str) -> UnetBlock:
        """The block of the module at `path` (OUTSIDE when it is in none)."""
        return self.blocks.get(path, OUTSIDE)

    @property
    def has_unet_blocks(self) -> bool:
        """Whether `in=`/`mid=`/`out=` reach any module (UNets only)."""
        unet_kinds = (BlockKind.INPUT, BlockKind.MIDDLE, BlockKind.OUTPUT)
        return any(block.kind in unet_kinds for block in self.blocks.values())

    def takes_vector(self, labels: Collection[str]) -> bool:
        """Whether a block vector with these labels is one this model takes."""
        if not self.vector_lengths:
            return True
        known = {label for length in self.vector_lengths for label in block_labels(length)}
        return set(labels) <= known

    def vector_problem(self, labels: Collection[str]) -> str | None:
        """Why a block vector with these labels does not fit this model (None: it fits)."""
        if self.takes_vector(labels):
            return None
        return (
            f"lbw= has {len(labels)} values: not a block vector for {self.model}, which takes "
            f"{lengths_text(self.vector_lengths)} values"
        )

    def unet_keys_problem(self, keys: Collection[str]) -> str | None:
        """Why `in=`/`mid=`/`out=` (the `keys` given) change nothing here (None: they do)."""
        if not keys or not self.vector_lengths or self.has_unet_blocks:
            return None
        named = "/".join(f"{key}=" for key in keys)
        return (
            f"{named} set UNet blocks and {self.model} has none (ignored); "
            f"use {self.blocks_in_words}"
        )


@dataclass(frozen=True)
class FamilyBlocks:
    """A transformer family's block map as data: its arch, how its denoiser config is told
    apart, module path -> label, and the vector lengths it takes."""

    arch: Arch
    recognises: Callable[[object], bool]
    label_of: Callable[[str], str | None]
    vector_lengths: tuple[int, ...]
    blocks_in_words: str

    def block_map(self, denoiser: Any) -> BlockMap:
        blocks = {
            path: transformer_block(label)
            for path, _ in denoiser.named_modules()
            if path and (label := self.label_of(path)) is not None
        }
        return BlockMap(self.arch.label, blocks, self.vector_lengths, self.blocks_in_words)


# one row per transformer family; every other model's denoiser is a UNet with the LDM map
FAMILY_BLOCKS: tuple[FamilyBlocks, ...] = (
    FamilyBlocks(
        Arch.FLUX1,
        flux1_blocks.is_flux_transformer,
        flux1_blocks.block_label,
        flux1_blocks.VECTOR_LENGTHS,
        flux1_blocks.BLOCKS_IN_WORDS,
    ),
)


def model_blocks(pipe: Any, arch: Arch | None = None) -> BlockMap:
    """The block map of a pipeline's denoiser: its family's row of `FAMILY_BLOCKS` (by `arch`,
    or by the denoiser's config when `arch` is None), else the LDM map of its UNet."""
    transformer = getattr(pipe, "transformer", None)
    config = getattr(transformer, "config", None)
    for family in FAMILY_BLOCKS:
        if transformer is not None and (
            arch is family.arch or (arch is None and family.recognises(config))
        ):
            return family.block_map(transformer)
    unet = getattr(pipe, "unet", None)
    if unet is None:
        return BlockMap(arch.label if arch else "unknown model")
    name = arch.label if arch is not None else "SD"
    return BlockMap(name, unet_blocks(unet.config), UNET_VECTOR_LENGTHS)
