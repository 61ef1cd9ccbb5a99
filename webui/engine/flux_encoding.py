"""FLUX.1 prompt encoding: CLIP-L's pooled output (77 tokens) and T5-XXL's hidden states
(512 tokens), as BFL's and diffusers' FLUX pipelines feed the transformer. No emphasis or BREAK:
the weights A1111 syntax sets are read as text by neither encoder here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import torch

T5_TOKENS: Final = 512  # [dev]'s training length; BFL's reference uses 512 for both variants


@dataclass(frozen=True)
class FluxConditioning:
    embeds: torch.Tensor  # T5 hidden states: (batch, 512, width)
    pooled: torch.Tensor  # CLIP-L pooled: (batch, width)


@torch.no_grad()  # as FluxPipeline encodes: no autograd graph kept, the same kernels and rounding
def encode_flux_prompts(pipe: Any, texts: list[str]) -> FluxConditioning:
    """`texts` through the pipeline's CLIP-L (pooled, truncated at 77 tokens) and T5
    (padded or truncated to `T5_TOKENS`)."""
    embeds, pooled, _text_ids = pipe.encode_prompt(
        prompt=texts,
        prompt_2=texts,
        device=pipe._execution_device,
        num_images_per_prompt=1,
        max_sequence_length=T5_TOKENS,
    )
    return FluxConditioning(embeds, pooled)
