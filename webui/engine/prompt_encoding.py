"""Prompt text -> text-encoder conditioning with AUTOMATIC1111's semantics: emphasis syntax
(`(word)`, `[word]`, `(word:1.3)`), prompts longer than 75 tokens as several 77-token chunks,
`BREAK`, the comma rule for chunk boundaries, "Original" emphasis, clip skip and textual-inversion
embeddings (an embedding's name in the prompt puts its vectors in place of the name's tokens, in
the encoder's input embeddings; the tokenizer is never changed).

Why our own: diffusers 0.42.1 implements `clip_skip` for SD1/SD2 through
`text_encoder.text_model.final_layer_norm`, which transformers 5 removed from `CLIPTextModel`,
so any clip skip above 1 crashes there. And `compel`, the usual diffusers add-on, differs from
A1111: another weighting formula (`empty + (z - empty) * w`, attention masking below 1, no mean
restore), no comma rule when chunking, no `BREAK`, and its own syntax. Users bring A1111 prompts
and expect A1111 images, so we follow A1111.

Entry point for the engine: `encode_for_pipeline`."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, Protocol

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
PLACEHOLDER_TOKEN: Final = 0
"""The token id A1111 puts where an embedding's vectors go ("!" in CLIP's vocabulary): its
input embedding is replaced, so only its id (never the end token, which pooling looks for)
matters."""
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
# the white space around BREAK is stripped by hand: `\s*` on both sides retried inside every
# run of white space, quadratic in its length
_BREAK_KEYWORD = re.compile(r"\bBREAK\b")
MAX_EMPHASIS_DEPTH: Final = 32
"""Brackets open deeper than this (of one kind) are read as text: each open bracket scales every
fragment after it, so unbounded depth makes parsing quadratic (and 1.1**33 is already 23x)."""


def parse_attention(text: str) -> list[tuple[str, float]]:
    """A1111's emphasis syntax -> (text, weight) fragments, adjacent equal weights merged.

    `(x)` multiplies by 1.1, `[x]` by 1/1.1, `(x:w)` by w; brackets nest multiplicatively;
    `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal characters; unclosed brackets apply to the
    rest of the prompt, unmatched closers are literal text; `BREAK` gives the `BREAK` fragment.
    Two deliberate differences from A1111: a malformed weight such as `(x:1.2.3)` is read as text
    and the bracket closes as a plain `)` (A1111 raises), and `BREAK` inside brackets still
    breaks (A1111 scales its marker and ends up encoding the word "BREAK")."""
    # a fragment joins the pieces of text between two bracket boundaries: text after a boundary
    # starts a new one, so scaling works per fragment (not per token: linear time)
    texts: list[list[str]] = []
    weights: list[float] = []
    breaks: set[int] = set()
    round_open: list[int] = []
    square_open: list[int] = []
    joinable = False  # no boundary since the last fragment was started

    def boundary() -> None:
        nonlocal joinable
        joinable = False

    def scale_from(start: int, factor: float) -> None:
        boundary()
        for index in range(start, len(weights)):
            if index not in breaks:
                weights[index] *= factor

    def add_piece(piece: str) -> None:
        nonlocal joinable
        if joinable:
            texts[-1].append(piece)
        else:
            texts.append([piece])
            weights.append(1.0)
            joinable = True

    def add_text(plain: str) -> None:
        if "BREAK" not in plain:  # the common case, without the regex
            add_piece(plain)
            return
        parts = _BREAK_KEYWORD.split(plain)
        for number, part in enumerate(parts):
            if number:
                breaks.add(len(texts))
                texts.append([BREAK[0]])
                weights.append(BREAK[1])
                boundary()
                part = part.lstrip()
            if number < len(parts) - 1:
                part = part.rstrip()
            add_piece(part)

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group("weight")
        if token.startswith("\\"):
            add_piece(token[1:])
        elif token == "(" and len(round_open) < MAX_EMPHASIS_DEPTH:
            round_open.append(len(texts))
            boundary()
        elif token == "[" and len(square_open) < MAX_EMPHASIS_DEPTH:
            square_open.append(len(texts))
            boundary()
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

    # runs of equal weight merged; pieces joined once per run (repeated `+` is quadratic)
    runs: list[tuple[list[str], float] | None] = []  # None: a BREAK
    for index, (pieces, weight_of_piece) in enumerate(zip(texts, weights, strict=True)):
        if index in breaks:
            runs.append(None)
        elif runs and runs[-1] is not None and runs[-1][1] == weight_of_piece:
            runs[-1][0].extend(pieces)
        else:
            runs.append((list(pieces), weight_of_piece))
    fragments = [BREAK if run is None else ("".join(run[0]), run[1]) for run in runs]
    return fragments or [("", 1.0)]


class TextualInversion(Protocol):
    """An embedding as the engine holds it: its name and one [n, width] matrix per text
    encoder of the model (SD1/SD2: one; SDXL: CLIP-L's, then CLIP-G's)."""

    @property
    def name(self) -> str: ...

    @property
    def vectors(self) -> tuple[torch.Tensor, ...]: ...


@dataclass(frozen=True, eq=False)
class PromptEmbedding:
    """An embedding as one text encoder uses it: its name and vectors [n, width]."""

    name: str
    vectors: torch.Tensor


@dataclass(frozen=True)
class EmbeddingFix:
    """Where in a 77-token chunk an embedding's vectors start (BOS is position 0)."""

    position: int
    name: str


@dataclass(frozen=True)
class PromptChunk:
    """77 token ids (BOS, up to 75 prompt tokens, EOS, EOS padding, as A1111 builds them),
    one emphasis multiplier per position, and the embeddings placed in it."""

    token_ids: tuple[int, ...]
    multipliers: tuple[float, ...]
    fixes: tuple[EmbeddingFix, ...] = ()


class _EmbeddingMatcher:
    """A1111's lookup: an embedding is found where the prompt's tokens equal the tokens of its
    name; of several that match at one place, the one with the longest name wins."""

    def __init__(self, tokenizer: CLIPTokenizer, embeddings: Sequence[PromptEmbedding]) -> None:
        self._by_first: dict[int, list[tuple[tuple[int, ...], PromptEmbedding]]] = {}
        names = [embedding.name for embedding in embeddings]
        tokenized = tokenizer(names, add_special_tokens=False, verbose=False).input_ids
        for ids, embedding in zip(tokenized, embeddings, strict=True):
            if ids:
                self._by_first.setdefault(ids[0], []).append((tuple(ids), embedding))
        for candidates in self._by_first.values():
            candidates.sort(key=lambda candidate: len(candidate[0]), reverse=True)

    def at(self, tokens: Sequence[int], position: int) -> tuple[PromptEmbedding, int] | None:
        """The embedding whose name starts at `position`, and how many tokens the name has."""
        for ids, embedding in self._by_first.get(tokens[position], ()):
            if tuple(tokens[position : position + len(ids)]) == ids:
                return embedding, len(ids)
        return None


def empty_chunk(tokenizer: CLIPTokenizer) -> PromptChunk:
    """The chunk of the empty prompt: what shorter prompts are padded with."""
    eos = tokenizer.eos_token_id
    return PromptChunk(
        (tokenizer.bos_token_id, *[eos] * (CHUNK_LENGTH + 1)), (1.0,) * (CHUNK_LENGTH + 2)
    )


def chunk_prompt(
    tokenizer: CLIPTokenizer,
    text: str,
    comma_backtrack: int = COMMA_BACKTRACK,
    embeddings: Sequence[PromptEmbedding] = (),
) -> list[PromptChunk]:
    """A prompt as A1111 tokenizes it: emphasis parsed, each fragment tokenized alone, tokens
    filled into 75-token chunks (never truncated), `BREAK` closing the current chunk, and a full
    chunk ending at its last comma when that comma is within `comma_backtrack` tokens.
    An embedding's name becomes n placeholder tokens (n = its vectors, with the name's weight)
    and a fix; an embedding that does not fit in the current chunk starts the next one. One
    deliberate difference from A1111: when the comma rule moves tokens to the next chunk, the
    embeddings among them move too (A1111 leaves their fixes behind and writes the vectors over
    the old chunk's padding)."""
    matcher = _EmbeddingMatcher(tokenizer, embeddings) if embeddings else None
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
    fixes: list[EmbeddingFix] = []  # positions counted in `ids` (without BOS)
    last_comma = -1

    def close_chunk() -> None:
        nonlocal ids, multipliers, fixes, last_comma
        fill = CHUNK_LENGTH - len(ids) + 1
        chunks.append(
            PromptChunk(
                (bos, *ids, *[eos] * fill),
                (1.0, *multipliers, *[1.0] * fill),
                tuple(EmbeddingFix(fix.position + 1, fix.name) for fix in fixes),
            )
        )
        ids, multipliers, fixes, last_comma = [], [], [], -1

    for fragment in fragments:
        if fragment == BREAK:
            close_chunk()
            continue
        weight = fragment[1]
        tokens = next(tokens_of)
        position = 0
        while position < len(tokens):
            token = tokens[position]
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
                moved_fixes = [
                    EmbeddingFix(f.position - cut, f.name) for f in fixes if f.position >= cut
                ]
                ids, multipliers = ids[:cut], multipliers[:cut]
                fixes = [fix for fix in fixes if fix.position < cut]
                close_chunk()
                ids, multipliers, fixes = moved_ids, moved_multipliers, moved_fixes
            if len(ids) == CHUNK_LENGTH:
                close_chunk()
            found = matcher.at(tokens, position) if matcher is not None else None
            if found is None:
                ids.append(token)
                multipliers.append(weight)
                position += 1
                continue
            embedding, name_length = found
            count = int(embedding.vectors.shape[0])
            if len(ids) + count > CHUNK_LENGTH:
                close_chunk()
            fixes.append(EmbeddingFix(len(ids), embedding.name))
            ids.extend([PLACEHOLDER_TOKEN] * count)
            multipliers.extend([weight] * count)
            position += name_length
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


def token_embedding(text_encoder: nn.Module) -> nn.Module:
    """The encoder's token-embedding lookup (input embeddings before positions are added)."""
    return getattr(text_encoder, "text_model", text_encoder).embeddings.token_embedding


@contextmanager
def _vectors_in_place(
    text_encoder: nn.Module, batch: Sequence[PromptChunk], vectors: dict[str, torch.Tensor]
) -> Iterator[None]:
    """While active, the token-embedding lookup returns each chunk's embedding vectors at its
    fixes' positions (A1111's `EmbeddingsWithFixes`); no hook when no chunk has a fix."""
    if not any(chunk.fixes for chunk in batch):
        yield
        return

    def replace_rows(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for row, chunk in enumerate(batch):
            for fix in chunk.fixes:
                rows = vectors[fix.name][: CHUNK_POSITIONS - 1 - fix.position]
                output[row, fix.position : fix.position + rows.shape[0]] = rows.to(output)
        return output

    handle = token_embedding(text_encoder).register_forward_hook(replace_rows)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def encode_chunked(
    tokenizer: CLIPTokenizer,
    text_encoder: nn.Module,
    prompts: Sequence[str],
    layer: EncoderLayer,
    embeddings: Sequence[PromptEmbedding] = (),
) -> EncodedPrompts:
    """Each prompt chunked, every chunk encoded with emphasis applied, chunks concatenated
    along the sequence axis; prompts with fewer chunks than the longest in the batch are padded
    with empty chunks, as A1111 does. Embeddings named in a prompt replace the input embeddings
    of their placeholder tokens."""
    cache: dict[str, list[PromptChunk]] = {}
    for text in prompts:
        if text not in cache:
            cache[text] = chunk_prompt(tokenizer, text, embeddings=embeddings)
    vectors = {embedding.name: embedding.vectors for embedding in embeddings}
    chunked = [cache[text] for text in prompts]
    blank = empty_chunk(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = next(text_encoder.parameters()).device
    pieces: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for position in range(max(len(chunks) for chunks in chunked)):
        batch = [chunks[position] if position < len(chunks) else blank for chunks in chunked]
        ids = torch.tensor([_model_ids(chunk, eos, pad) for chunk in batch], device=device)
        with _vectors_in_place(text_encoder, batch, vectors):
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


def for_encoder(
    embeddings: Sequence[TextualInversion], encoder: int, encoders: int
) -> list[PromptEmbedding]:
    """The embeddings made for a model with `encoders` text encoders, as encoder number
    `encoder` (0-based) uses them."""
    return [
        PromptEmbedding(e.name, e.vectors[encoder])
        for e in embeddings
        if len(e.vectors) == encoders
    ]


def embeddings_in_prompts(
    tokenizer: CLIPTokenizer, prompts: Sequence[str], embeddings: Sequence[TextualInversion]
) -> list[str]:
    """Names of the embeddings the prompts use, in order of first use (for `TI hashes`)."""
    if not embeddings:
        return []
    single = [PromptEmbedding(e.name, e.vectors[0]) for e in embeddings]
    used: dict[str, None] = {}
    for text in dict.fromkeys(prompts):
        for chunk in chunk_prompt(tokenizer, text, embeddings=single):
            used.update(dict.fromkeys(fix.name for fix in chunk.fixes))
    return list(used)


def encode_prompts(
    tokenizer: CLIPTokenizer,
    text_encoder: nn.Module,
    prompts: list[str],
    clip_skip: int,
    embeddings: Sequence[PromptEmbedding] = (),
) -> torch.Tensor:
    """SD1/SD2 conditioning with A1111's emphasis, long prompts and clip skip (1 = last layer;
    n = n-th hidden state from the end, through the final LayerNorm); shape
    (len(prompts), 77 * chunks, width). Plain prompts up to 75 tokens give exactly what the
    tokenizer's own 77-token padding gives. Positive and negative can differ in chunk count:
    use `encode_prompt_pair` for CFG."""
    layer = EncoderLayer.for_sd(clip_skip)
    return encode_chunked(tokenizer, text_encoder, prompts, layer, embeddings).embeds


def encode_prompt_pair(
    tokenizer: CLIPTokenizer,
    text_encoder: nn.Module,
    prompts: list[str],
    negatives: list[str],
    clip_skip: int,
    embeddings: Sequence[PromptEmbedding] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """SD1/SD2 (prompt, negative) conditioning with the same chunk count, for CFG."""
    return _equalise(
        encode_prompts(tokenizer, text_encoder, prompts, clip_skip, embeddings),
        encode_prompts(tokenizer, text_encoder, negatives, clip_skip, embeddings),
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
    pipe: Any,
    prompts: list[str],
    clip_skip: int = 1,
    clip_l_skip: bool = False,
    embeddings: Sequence[TextualInversion] = (),
) -> SDXLConditioning:
    """SDXL conditioning as A1111 builds it: each encoder chunks and emphasises on its own,
    chunks are concatenated on the feature axis; clip skip follows `sdxl_layers`. Plain
    prompts up to 75 tokens give what diffusers' `StableDiffusionXLPipeline.encode_prompt` does.
    SDXL embeddings put their clip_l vectors into the first encoder, clip_g into the second."""
    first_layer, second_layer = sdxl_layers(clip_skip, clip_l_skip)
    first = encode_chunked(
        pipe.tokenizer, pipe.text_encoder, prompts, first_layer, for_encoder(embeddings, 0, 2)
    )
    second = encode_chunked(
        pipe.tokenizer_2, pipe.text_encoder_2, prompts, second_layer, for_encoder(embeddings, 1, 2)
    )
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
    embeddings: Sequence[TextualInversion] = (),
) -> dict[str, torch.Tensor]:
    """Keyword arguments for the diffusers pipeline: `prompt_embeds`, `negative_prompt_embeds`
    (same chunk count), plus `pooled_prompt_embeds`, `negative_pooled_prompt_embeds` for SDXL.
    SDXL follows A1111: clip skip only with `sdxl_clip_l_skip`, and an all-empty negative prompt
    gives zero conditioning (as diffusers' `force_zeros_for_empty_prompt` does too).
    `embeddings`: the textual inversions prompts may name (those for another encoder count are
    left out)."""
    if arch is not Arch.SDXL:
        cond, uncond = encode_prompt_pair(
            pipe.tokenizer,
            pipe.text_encoder,
            prompts,
            negatives,
            clip_skip,
            for_encoder(embeddings, 0, 1),
        )
        return {"prompt_embeds": cond, "negative_prompt_embeds": uncond}

    def sdxl(texts: list[str]) -> SDXLConditioning:
        return encode_sdxl_prompts(pipe, texts, clip_skip, sdxl_clip_l_skip, embeddings)

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
