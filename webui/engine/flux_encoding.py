"""FLUX.1 prompt encoding: CLIP-L's pooled output (77 tokens) and T5-XXL's hidden states
(512 tokens), as BFL's and diffusers' FLUX pipelines feed the transformer, with A1111's emphasis
syntax read as Forge's T5 engine reads it (`backend/text_processing/t5_engine.py`):

- T5: each emphasis fragment is tokenized alone, every token carries its fragment's weight, the
  hidden states are scaled per token with A1111's "Original" rule (the prompt's mean restored);
  `BREAK` ends a T5 sequence and starts another, each encoded alone, then concatenated.
- CLIP-L gives only its pooled vector, which weights do not reach (A1111 and Forge scale the
  hidden states, never the pooled output): it gets the prompt's text without the syntax, up to
  the first `BREAK` (Forge pools the first chunk only).

Each T5 sequence is cut and padded as FluxPipeline does (512 positions: up to 511 tokens, the end
token, pad tokens), so a prompt without syntax gives exactly `FluxPipeline.encode_prompt`'s
embeddings. ComfyUI weights T5 tokens otherwise (each token moved from the empty prompt's state
at its position, no mean restore); we follow Forge, whose prompts our users bring."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import torch
from diffusers.utils.torch_utils import get_module_execution_device

from webui.engine.prompt_encoding import BREAK, apply_emphasis, parse_attention

T5_TOKENS: Final = 512  # [dev]'s training length; BFL's reference uses 512 for both variants


@dataclass(frozen=True)
class FluxConditioning:
    embeds: torch.Tensor  # T5 hidden states: (batch, 512 * sequences, width)
    pooled: torch.Tensor  # CLIP-L pooled: (batch, width)


@dataclass(frozen=True)
class T5Sequence:
    """One `BREAK`-delimited part of a prompt as T5 reads it, before cutting and padding: its
    token ids, the end token last, and each token's emphasis weight (the end token's is 1)."""

    token_ids: tuple[int, ...]
    weights: tuple[float, ...]

    def fitted(self, pad: int, length: int = T5_TOKENS) -> tuple[list[int], list[float]]:
        """Ids and weights in `length` positions: cut as the tokenizer truncates (the first
        `length - 1` tokens, then the end token), padded with `pad` at weight 1."""
        ids, weights = list(self.token_ids), list(self.weights)
        if len(ids) > length:
            ids, weights = ids[: length - 1] + ids[-1:], weights[: length - 1] + weights[-1:]
        fill = length - len(ids)
        return ids + [pad] * fill, weights + [1.0] * fill


def _parts(text: str) -> list[list[tuple[str, float]]]:
    """The prompt's emphasis fragments, split at each `BREAK`."""
    parts: list[list[tuple[str, float]]] = [[]]
    for fragment in parse_attention(text):
        if fragment == BREAK:
            parts.append([])
        else:
            parts[-1].append(fragment)
    return parts


def t5_sequences(tokenizer: Any, text: str) -> list[T5Sequence]:
    """Forge's T5 tokenization: fragments tokenized alone (no special tokens), one sequence per
    `BREAK`-delimited part, each ended by the end token; an empty part after the last `BREAK`
    adds nothing (an empty part before one is a sequence of the end token alone)."""
    parts = _parts(text)
    pieces = [piece for part in parts for piece, _ in part]
    tokenized = iter(
        tokenizer(pieces, add_special_tokens=False, truncation=False, verbose=False).input_ids
        if pieces
        else []
    )
    eos = tokenizer.eos_token_id
    sequences: list[T5Sequence] = []
    for number, part in enumerate(parts):
        ids: list[int] = []
        weights: list[float] = []
        for _piece, weight in part:
            tokens = next(tokenized)
            ids.extend(tokens)
            weights.extend([weight] * len(tokens))
        if ids or number == 0 or number < len(parts) - 1:
            sequences.append(T5Sequence((*ids, eos), (*weights, 1.0)))
    return sequences


def clip_text(text: str) -> str:
    """What CLIP-L reads of a prompt: its text without emphasis syntax, up to the first
    `BREAK` (escaped brackets stay as literal brackets)."""
    return "".join(piece for piece, _ in _parts(text)[0])


@torch.no_grad()
def encode_t5(tokenizer: Any, text_encoder: Any, texts: list[str]) -> torch.Tensor:
    """T5 hidden states (batch, 512 * sequences, width), emphasis applied per sequence; prompts
    with fewer sequences than the longest are padded with the empty prompt's (as A1111 pads
    chunks)."""
    sequences = [t5_sequences(tokenizer, text) for text in texts]
    blank = t5_sequences(tokenizer, "")[0]
    pad = tokenizer.pad_token_id
    device = get_module_execution_device(text_encoder)
    pieces = []
    for position in range(max(len(own) for own in sequences)):
        fitted = [
            (own[position] if position < len(own) else blank).fitted(pad) for own in sequences
        ]
        ids = torch.tensor([ids for ids, _ in fitted], device=device)
        # the pipeline's call: no attention mask, the output cast to the encoder's dtype
        hidden = text_encoder(ids, output_hidden_states=False)[0].to(dtype=text_encoder.dtype)
        pieces.append(apply_emphasis(hidden, torch.tensor([weights for _, weights in fitted])))
    return torch.cat(pieces, dim=1)


@torch.no_grad()  # as FluxPipeline encodes: no autograd graph kept, the same kernels and rounding
def encode_flux_prompts(pipe: Any, texts: list[str]) -> FluxConditioning:
    """`texts` through the pipeline's CLIP-L (pooled, the text without syntax, truncated at 77
    tokens) and T5 (emphasis applied, each `BREAK`-delimited part in `T5_TOKENS` positions)."""
    device = pipe._execution_device
    # the pipeline's own CLIP-L step (what `encode_prompt` calls), on the syntax-free text
    pooled = pipe._get_clip_prompt_embeds(
        prompt=[clip_text(text) for text in texts], device=device, num_images_per_prompt=1
    )
    embeds = encode_t5(pipe.tokenizer_2, pipe.text_encoder_2, texts).to(device)
    return FluxConditioning(embeds, pooled)
