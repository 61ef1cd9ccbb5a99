"""Prompt text -> text-encoder conditioning with AUTOMATIC1111's semantics: emphasis syntax
(`(word)`, `[word]`, `(word:1.3)`), prompts longer than 75 tokens as several 77-token chunks,
`BREAK`, the comma rule for chunk boundaries, "Original" emphasis and clip skip.

Why our own: diffusers 0.42.1 implements `clip_skip` for SD1/SD2 through
`text_encoder.text_model.final_layer_norm`, which transformers 5 removed from `CLIPTextModel`,
so any clip skip above 1 crashes there. And `compel`, the usual diffusers add-on, differs from
A1111: another weighting formula (`empty + (z - empty) * w`, attention masking below 1, no mean
restore), no comma rule when chunking, no `BREAK`, and its own syntax. Users bring A1111 prompts
and expect A1111 images, so we follow A1111.

Entry point for the engine: `encode_for_pipeline`."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import torch
from torch import nn
from transformers import CLIPTokenizer

from webui.arch import Arch

BREAK: Final[tuple[str, float]] = ("BREAK", -1.0)
"""The fragment `parse_attention` returns for the `BREAK` keyword: start a new chunk."""

ROUND_BRACKET_MULTIPLIER: Final = 1.1
SQUARE_BRACKET_MULTIPLIER: Final = 1 / 1.1
CHUNK_LENGTH: Final = 75
"""Prompt tokens per chunk; with BOS and EOS a chunk fills CLIP's 77 positions."""
CHUNK_POSITIONS: Final = CHUNK_LENGTH + 2
COMMA_BACKTRACK: Final = 20
"""A1111's default "Prompt word wrap length limit": a chunk that fills up within this many tokens
after a comma ends at the comma and the words after it move to the next chunk."""

# One match per syntactic unit, tried in this order: escapes, a lone backslash (dropped), openers,
# `:weight)`, closers, plain text (no brackets, backslashes or colons), a lone colon.
_ATTENTION_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]
    | \\
    | [(\[]
    | :(?P<weight>[+-]?[.\d]+)\)
    | [)\]]
    | [^\\()\[\]:]+
    | :
    """,
    re.VERBOSE,
)
_BREAK_KEYWORD = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """A1111's emphasis syntax -> (text, weight) fragments, adjacent equal weights merged.

    `(x)` multiplies by 1.1, `[x]` by 1/1.1, `(x:w)` by w; brackets nest multiplicatively;
    `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal characters; unclosed brackets apply to the
    rest of the prompt, unmatched closers are literal text; `BREAK` gives the `BREAK` fragment.
    Two deliberate differences from A1111: a malformed weight such as `(x:1.2.3)` is read as text
    and the bracket closes as a plain `)` (A1111 raises), and `BREAK` inside brackets still
    breaks (A1111 scales its marker and ends up encoding the word "BREAK")."""
    texts: list[str] = []
    weights: list[float] = []
    breaks: set[int] = set()
    round_open: list[int] = []
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for index in range(start, len(weights)):
            if index not in breaks:
                weights[index] *= factor

    def add_text(plain: str) -> None:
        for number, part in enumerate(_BREAK_KEYWORD.split(plain)):
            if number:
                breaks.add(len(texts))
                texts.append(BREAK[0])
                weights.append(BREAK[1])
            texts.append(part)
            weights.append(1.0)

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group("weight")
        if token.startswith("\\"):
            texts.append(token[1:])
            weights.append(1.0)
        elif token == "(":
            round_open.append(len(texts))
        elif token == "[":
            square_open.append(len(texts))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:
                add_text(token[:-1])
                factor = ROUND_BRACKET_MULTIPLIER
            scale_from(round_open.pop(), factor)
        elif token == ")" and round_open:
            scale_from(round_open.pop(), ROUND_BRACKET_MULTIPLIER)
        elif token == "]" and square_open:
            scale_from(square_open.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            add_text(token)

    for start in round_open:
        scale_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in square_open:
        scale_from(start, SQUARE_BRACKET_MULTIPLIER)

    fragments: list[tuple[str, float]] = []
    for index, (piece, weight_of_piece) in enumerate(zip(texts, weights, strict=True)):
        mergeable = fragments and index not in breaks and fragments[-1] != BREAK
        if mergeable and fragments[-1][1] == weight_of_piece:
            fragments[-1] = (fragments[-1][0] + piece, weight_of_piece)
        else:
            fragments.append(BREAK if index in breaks else (piece, weight_of_piece))
    return fragments or [("", 1.0)]


@dataclass(frozen=True)
class PromptChunk:
    """77 token ids (BOS, up to 75 prompt tokens, EOS, EOS padding, as A1111 builds them) and
    one emphasis multiplier per position."""

    token_ids: tuple[int, ...]
    multipliers: tuple[float, ...]


def empty_chunk(tokenizer: CLIPTokenizer) -> PromptChunk:
    """The chunk of the empty prompt: what shorter prompts are padded with."""
    eos = tokenizer.eos_token_id
    return PromptChunk(
        (tokenizer.bos_token_id, *[eos] * (CHUNK_LENGTH + 1)), (1.0,) * (CHUNK_LENGTH + 2)
    )


def chunk_prompt(
    tokenizer: CLIPTokenizer, text: str, comma_backtrack: int = COMMA_BACKTRACK
) -> list[PromptChunk]:
    """A prompt as A1111 tokenizes it: emphasis parsed, each fragment tokenized alone, tokens
    filled into 75-token chunks (never truncated), `BREAK` closing the current chunk, and a full
    chunk ending at its last comma when that comma is within `comma_backtrack` tokens."""
    fragments = parse_attention(text)
    words = [fragment for fragment in fragments if fragment != BREAK]
    tokenized = tokenizer(
        [piece for piece, _ in words], add_special_tokens=False, truncation=False, verbose=False
    ).input_ids
    tokens_of = iter(tokenized)
    comma = tokenizer.get_vocab().get(",</w>")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    chunks: list[PromptChunk] = []
    ids: list[int] = []
    multipliers: list[float] = []
    last_comma = -1

    def close_chunk() -> None:
        nonlocal ids, multipliers, last_comma
        fill = CHUNK_LENGTH - len(ids) + 1
        chunks.append(PromptChunk((bos, *ids, *[eos] * fill), (1.0, *multipliers, *[1.0] * fill)))
        ids, multipliers, last_comma = [], [], -1

    for fragment in fragments:
        if fragment == BREAK:
            close_chunk()
            continue
        weight = fragment[1]
        for token in next(tokens_of):
            if token == comma:
                last_comma = len(ids)
            elif (
                comma_backtrack > 0
                and len(ids) == CHUNK_LENGTH
                and last_comma != -1
                and len(ids) - last_comma <= comma_backtrack
            ):
                cut = last_comma + 1
                moved_ids, moved_multipliers = ids[cut:], multipliers[cut:]
                ids, multipliers = ids[:cut], multipliers[:cut]
                close_chunk()
                ids, multipliers = moved_ids, moved_multipliers
            if len(ids) == CHUNK_LENGTH:
                close_chunk()
            ids.append(token)
            multipliers.append(weight)
    if ids or not chunks:
        close_chunk()
    return chunks


def apply_emphasis(z: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on (batch, tokens, width) hidden states: scale each token's
    row by its multiplier, then rescale each prompt so its mean equals the mean before (per
    prompt; A1111 encodes one prompt at a time). Computed in float32, returned in z's dtype.
    Like A1111's, the rescale is ill-conditioned when the mean is near zero (e.g. randomly
    initialised encoders, whose final LayerNorm centres every row); trained CLIPs are not."""
    if bool(torch.all(multipliers == 1.0)):
        return z
    original = z.float()
    weighted = original * multipliers.to(original.device, torch.float32).unsqueeze(-1)
    ratio = original.mean(dim=(1, 2), keepdim=True) / weighted.mean(dim=(1, 2), keepdim=True)
    # a zero mean after weighting would make A1111's rescale inf/NaN: leave those prompts unscaled
    ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
    return (weighted * ratio).to(z.dtype)


def final_layer_norm(text_encoder: nn.Module) -> nn.Module:
    """The encoder's final LayerNorm, with or without transformers' `text_model` wrapper."""
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


@dataclass(frozen=True)
class EncoderLayer:
    """Which hidden state becomes the conditioning: `from_end` 1 is the last layer; SD1/SD2
    pass it through the final LayerNorm, SDXL uses it raw."""

    from_end: int
    final_norm: bool

    @classmethod
    def for_sd(cls, clip_skip: int) -> EncoderLayer:
        """A1111's clip skip for SD1/SD2: 1 = last layer, n = n-th from the end, normalised."""
        return cls(max(clip_skip, 1), final_norm=True)

    @property
    def is_last_normalised(self) -> bool:
        return self.final_norm and self.from_end == 1

    def select(self, text_encoder: nn.Module, output: Any) -> torch.Tensor:
        if self.is_last_normalised:
            return output.last_hidden_state
        hidden = output.hidden_states[-self.from_end]
        return final_layer_norm(text_encoder)(hidden) if self.final_norm else hidden


def sdxl_layers(clip_skip: int, clip_l_skip: bool = False) -> tuple[EncoderLayer, EncoderLayer]:
    """A1111's SDXL rule: both encoders give their penultimate hidden state, unnormalised, and
    clip skip is ignored, unless the "Clip skip SDXL" option (`clip_l_skip`) is on: then the
    first encoder (CLIP-L) gives hidden state `-clip_skip`. The second encoder never skips."""
    first = EncoderLayer(max(clip_skip, 1), False) if clip_l_skip else EncoderLayer(2, False)
    return first, EncoderLayer(2, False)


@dataclass(frozen=True)
class EncodedPrompts:
    """One encoder's output for a batch: embeds (batch, 77 * chunks, width) and, for encoders
    with a projection, pooled (batch, projection) from each prompt's first chunk."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None


def _model_ids(chunk: PromptChunk, eos: int, pad: int) -> list[int]:
    """Token ids as the encoder gets them: after the first EOS, the tokenizer's pad token (SD1
    pads with EOS itself; SD2 and SDXL's second encoder with "!")."""
    ids = list(chunk.token_ids)
    end = ids.index(eos) + 1
    return ids[:end] + [pad] * (len(ids) - end)


@torch.no_grad()
def encode_chunked(
    tokenizer: CLIPTokenizer,
    text_encoder: nn.Module,
    prompts: Sequence[str],
    layer: EncoderLayer,
) -> EncodedPrompts:
    """Each prompt chunked, every chunk encoded with emphasis applied, chunks concatenated
    along the sequence axis; prompts with fewer chunks than the longest in the batch are padded
    with empty chunks, as A1111 does."""
    cache: dict[str, list[PromptChunk]] = {}
    for text in prompts:
        if text not in cache:
            cache[text] = chunk_prompt(tokenizer, text)
    chunked = [cache[text] for text in prompts]
    blank = empty_chunk(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = next(text_encoder.parameters()).device
    pieces: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for position in range(max(len(chunks) for chunks in chunked)):
        batch = [chunks[position] if position < len(chunks) else blank for chunks in chunked]
        ids = torch.tensor([_model_ids(chunk, eos, pad) for chunk in batch], device=device)
        output = text_encoder(ids, output_hidden_states=not layer.is_last_normalised)
        if position == 0:
            pooled = getattr(output, "text_embeds", None)
        multipliers = torch.tensor([chunk.multipliers for chunk in batch])
        pieces.append(apply_emphasis(layer.select(text_encoder, output), multipliers))
    return EncodedPrompts(torch.cat(pieces, dim=1), pooled)


def pad_chunks(embeds: torch.Tensor, chunks: int, empty: torch.Tensor) -> torch.Tensor:
    """`embeds` (batch, 77 * k, width) extended to `chunks` chunks with copies of `empty`
    (1, 77, width), the empty prompt's encoding: A1111's padding of cond/uncond for CFG."""
    missing = chunks - embeds.shape[1] // CHUNK_POSITIONS
    if missing <= 0:
        return embeds
    filler = empty.to(embeds.device, embeds.dtype).repeat(embeds.shape[0], missing, 1)
    return torch.cat([embeds, filler], dim=1)


def _equalise(
    first: torch.Tensor,
    second: torch.Tensor,
    empty_first: Callable[[], torch.Tensor],
    empty_second: Callable[[], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both padded to the larger chunk count with their side's empty-prompt encoding (encoded
    only when needed; `empty_second` defaults to `empty_first`)."""
    chunks = max(first.shape[1], second.shape[1]) // CHUNK_POSITIONS
    if first.shape[1] < second.shape[1]:
        first = pad_chunks(first, chunks, empty_first())
    elif second.shape[1] < first.shape[1]:
        second = pad_chunks(second, chunks, (empty_second or empty_first)())
    return first, second


def encode_prompts(
    tokenizer: CLIPTokenizer, text_encoder: nn.Module, prompts: list[str], clip_skip: int
) -> torch.Tensor:
    """SD1/SD2 conditioning with A1111's emphasis, long prompts and clip skip (1 = last layer;
    n = n-th hidden state from the end, through the final LayerNorm); shape
    (len(prompts), 77 * chunks, width). Plain prompts up to 75 tokens give exactly what the
    tokenizer's own 77-token padding gives. Positive and negative can differ in chunk count:
    use `encode_prompt_pair` for CFG."""
    return encode_chunked(tokenizer, text_encoder, prompts, EncoderLayer.for_sd(clip_skip)).embeds


def encode_prompt_pair(
    tokenizer: CLIPTokenizer,
    text_encoder: nn.Module,
    prompts: list[str],
    negatives: list[str],
    clip_skip: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SD1/SD2 (prompt, negative) conditioning with the same chunk count, for CFG."""
    return _equalise(
        encode_prompts(tokenizer, text_encoder, prompts, clip_skip),
        encode_prompts(tokenizer, text_encoder, negatives, clip_skip),
        lambda: encode_prompts(tokenizer, text_encoder, [""], clip_skip),
    )


@dataclass(frozen=True)
class SDXLConditioning:
    """SDXL prompt conditioning: embeds (batch, 77 * chunks, width 1 + width 2) and pooled
    (batch, projection) from the second encoder's first chunk."""

    embeds: torch.Tensor
    pooled: torch.Tensor

    def zeroed(self) -> SDXLConditioning:
        return SDXLConditioning(torch.zeros_like(self.embeds), torch.zeros_like(self.pooled))


@torch.no_grad()
def encode_sdxl_prompts(
    pipe: Any, prompts: list[str], clip_skip: int = 1, clip_l_skip: bool = False
) -> SDXLConditioning:
    """SDXL conditioning as A1111 builds it: each encoder chunks and emphasises on its own,
    chunks are concatenated on the feature axis; clip skip follows `sdxl_layers`. Plain
    prompts up to 75 tokens give what diffusers' `StableDiffusionXLPipeline.encode_prompt` does."""
    first_layer, second_layer = sdxl_layers(clip_skip, clip_l_skip)
    first = encode_chunked(pipe.tokenizer, pipe.text_encoder, prompts, first_layer)
    second = encode_chunked(pipe.tokenizer_2, pipe.text_encoder_2, prompts, second_layer)
    if second.pooled is None:
        raise ValueError("SDXL's second text encoder must have a projection (text_embeds)")
    embeds = _equalise(
        first.embeds,
        second.embeds,
        lambda: encode_chunked(pipe.tokenizer, pipe.text_encoder, [""], first_layer).embeds,
        lambda: encode_chunked(pipe.tokenizer_2, pipe.text_encoder_2, [""], second_layer).embeds,
    )
    return SDXLConditioning(torch.cat(embeds, dim=-1), second.pooled)


def encode_for_pipeline(
    pipe: Any,
    arch: Arch,
    prompts: list[str],
    negatives: list[str],
    clip_skip: int,
    *,
    sdxl_clip_l_skip: bool = False,
) -> dict[str, torch.Tensor]:
    """Keyword arguments for the diffusers pipeline: `prompt_embeds`, `negative_prompt_embeds`
    (same chunk count), plus `pooled_prompt_embeds`, `negative_pooled_prompt_embeds` for SDXL.
    SDXL follows A1111: clip skip only with `sdxl_clip_l_skip`, and an all-empty negative prompt
    gives zero conditioning (as diffusers' `force_zeros_for_empty_prompt` does too)."""
    if arch is not Arch.SDXL:
        cond, uncond = encode_prompt_pair(
            pipe.tokenizer, pipe.text_encoder, prompts, negatives, clip_skip
        )
        return {"prompt_embeds": cond, "negative_prompt_embeds": uncond}

    def sdxl(texts: list[str]) -> SDXLConditioning:
        return encode_sdxl_prompts(pipe, texts, clip_skip, sdxl_clip_l_skip)

    positive, negative = sdxl(prompts), sdxl(negatives)
    if all(text == "" for text in negatives):
        negative = negative.zeroed()
    cond, uncond = _equalise(positive.embeds, negative.embeds, lambda: sdxl([""]).embeds)
    return {
        "prompt_embeds": cond,
        "pooled_prompt_embeds": positive.pooled,
        "negative_prompt_embeds": uncond,
        "negative_pooled_prompt_embeds": negative.pooled,
    }
