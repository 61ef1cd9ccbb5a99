"""Prompt text -> text-encoder embeddings for SD1/SD2, with A1111's clip skip.

Why our own: diffusers 0.42.1 implements `clip_skip` for SD1/SD2 through
`text_encoder.text_model.final_layer_norm`, which transformers 5 removed from `CLIPTextModel`,
so any clip skip above 1 crashes there. SDXL's pipeline does not touch that attribute."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTokenizer


def final_layer_norm(text_encoder: nn.Module) -> nn.Module:
    """The encoder's final LayerNorm, with or without transformers' `text_model` wrapper."""
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


@torch.no_grad()
def encode_prompts(
    tokenizer: CLIPTokenizer, text_encoder: nn.Module, prompts: list[str], clip_skip: int
) -> torch.Tensor:
    """Hidden states of the layer A1111's `clip_skip` picks (1 = last layer), normalised by
    the final LayerNorm as A1111 does; shape (len(prompts), 77, width)."""
    tokens = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    output = text_encoder(tokens.input_ids.to(device), output_hidden_states=clip_skip > 1)
    if clip_skip <= 1:
        return output.last_hidden_state
    return final_layer_norm(text_encoder)(output.hidden_states[-clip_skip])
