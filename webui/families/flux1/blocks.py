"""FLUX.1's block map, as the LoRA Block Weight extension numbers its "Flux (61)" vector: CLIP and
T5 (the text encoders), IN (the input embedders: BFL img_in, txt_in, time_in, vector_in,
guidance_in), D00..D18 (double blocks), S00..S37 (single blocks), OUT (the final layer). Here on
diffusers' FluxTransformer2DModel names."""

from __future__ import annotations

import re
from collections.abc import Mapping

VECTOR_LENGTHS = (61,)  # the LoRA Block Weight vectors a FLUX.1 model takes
BLOCKS_IN_WORDS = "lbw= with its D00-D18 (double) and S00-S37 (single) blocks"

# diffusers module path -> label; a `{}` is filled with the block number, two digits
_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^transformer_blocks\.(\d+)\."), "D{:02d}"),
    (re.compile(r"^single_transformer_blocks\.(\d+)\."), "S{:02d}"),
    (re.compile(r"^(x_embedder|context_embedder|time_text_embed)(\.|$)"), "IN"),
    (re.compile(r"^(norm_out|proj_out)(\.|$)"), "OUT"),
)


def block_label(path: str) -> str | None:
    """The block label of a transformer module path (`transformer_blocks.5.attn.to_q` -> D05,
    `time_text_embed.guidance_embedder.linear_1` -> IN); None for a module in no block."""
    for pattern, label in _RULES:
        match = pattern.match(path)
        if match:
            return label.format(int(match.group(1))) if "{" in label else label
    return None


def is_flux_transformer(config: object) -> bool:
    """Whether a denoiser config is FLUX.1's (the only one with single-stream blocks)."""
    return isinstance(config, Mapping) and "num_single_layers" in config
