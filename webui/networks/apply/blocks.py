"""Which UNet block a module lives in, in the LDM numbering LoRA Block Weight users know
(IN00..IN11, M00, OUT00..OUT11 for SD1/SD2; IN00..IN08, M00, OUT00..OUT08 for SDXL).

The rule for `in=`/`mid=`/`out=`: a module in `input_blocks.N` (conv_in is input_blocks.0) is
"in", `middle_block` is "mid", `output_blocks.N` is "out", and the final norm and conv (`out.*`)
count as "out". The time and label embeddings belong to no block: they take the `unet` strength."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from webui.layouts.unet import unet_module_names


class BlockKind(StrEnum):
    INPUT = "in"
    MIDDLE = "mid"
    OUTPUT = "out"
    OUTSIDE = "outside"


@dataclass(frozen=True)
class UnetBlock:
    """A UNet module's block: kind and LDM index (None for the middle and outside)."""

    kind: BlockKind
    index: int | None = None

    @property
    def label(self) -> str | None:
        """The LoRA Block Weight label (IN04, M00, OUT11), or None outside the numbered blocks."""
        if self.kind is BlockKind.INPUT:
            return f"IN{self.index:02d}"
        if self.kind is BlockKind.OUTPUT and self.index is not None:
            return f"OUT{self.index:02d}"
        if self.kind is BlockKind.MIDDLE:
            return "M00"
        return None


OUTSIDE = UnetBlock(BlockKind.OUTSIDE)
_LDM_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.")


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
