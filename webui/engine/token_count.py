"""How many tokens a prompt takes, counted for the encoder that reads its words: CLIP as
A1111's counter shows it (`12/75`, `80/150`), FLUX.1's T5 out of its 512 positions (`12/512`).

Counted on the chunks or sequences the encoder builds (emphasis parsed, BREAK, the comma rule),
so the number is what the model receives, not a guess from the raw text."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any

from transformers import CLIPTokenizer

from webui.engine.flux_encoding import T5_TOKENS, t5_sequences
from webui.engine.prompt_encoding import CHUNK_LENGTH, chunk_prompt
from webui.prompt import parse_prompt

# every family we run uses the same CLIP vocabulary: the counter works before a model loads
_REFERENCE_TOKENIZER = Path(__file__).resolve().parents[2] / "configs" / "sd15" / "tokenizer"


class PromptEncoder(Enum):
    """The text encoder that reads a family's prompt words, token by token (its tokens are the
    ones counted; emphasis weights its hidden states)."""

    CLIP = "CLIP"  # SD1, SD2, SDXL: A1111's chunks of 75 tokens
    T5 = "T5"  # FLUX.1: 512 positions per BREAK-delimited part (CLIP-L gives only a pooled vector)

    @property
    def chunk(self) -> int:
        """Tokens per chunk: 75 prompt tokens for CLIP, 512 positions (end token included) for
        T5."""
        return CHUNK_LENGTH if self is PromptEncoder.CLIP else T5_TOKENS

    @property
    def tokenizer_component(self) -> str:
        """The pipeline attribute holding this encoder's tokenizer."""
        return "tokenizer" if self is PromptEncoder.CLIP else "tokenizer_2"


@dataclass(frozen=True)
class TokenCount:
    """`tokens` used of `limit` (a multiple of the encoder's chunk: for CLIP one more chunk each
    time a chunk fills; for T5 one per BREAK-delimited part, and `tokens` above `limit` are
    cut)."""

    tokens: int
    limit: int
    encoder: PromptEncoder = PromptEncoder.CLIP

    @property
    def chunks(self) -> int:
        return self.limit // self.encoder.chunk

    def format(self) -> str:
        return f"{self.tokens}/{self.limit}"


def count_tokens(tokenizer: CLIPTokenizer, text: str) -> TokenCount:
    """A1111's count: every chunk but the last counts as full (a BREAK or a comma cut leaves
    its chunk's rest as padding), the last its own tokens; `<lora:...>` tags are not sent to
    CLIP and are not counted."""
    chunks = chunk_prompt(tokenizer, parse_prompt(text).text)
    eos = tokenizer.eos_token_id
    last = chunks[-1].token_ids[1:]  # without BOS
    in_last = last.index(eos)  # the chunk is always closed by at least one EOS
    tokens = CHUNK_LENGTH * (len(chunks) - 1) + in_last
    return TokenCount(tokens, math.ceil(max(tokens, 1) / CHUNK_LENGTH) * CHUNK_LENGTH)


def count_t5_tokens(tokenizer: Any, text: str) -> TokenCount:
    """FLUX.1's count: the T5 tokens the prompt gives with its end token (tags removed, emphasis
    syntax parsed), every sequence but the last counted as its full 512 (its rest is padding T5
    reads), the last its own tokens, uncut: past the limit, the rest is not read."""
    sequences = t5_sequences(tokenizer, parse_prompt(text).text)
    tokens = T5_TOKENS * (len(sequences) - 1) + len(sequences[-1].token_ids)
    return TokenCount(tokens, T5_TOKENS * len(sequences), PromptEncoder.T5)


def count_for(encoder: PromptEncoder, tokenizer: Any, text: str) -> TokenCount:
    """The count of `text` for `encoder`, with that encoder's tokenizer."""
    if encoder is PromptEncoder.T5:
        return count_t5_tokens(tokenizer, text)
    return count_tokens(tokenizer, text)


@cache
def reference_tokenizer() -> CLIPTokenizer:
    """The CLIP tokenizer shipped in `configs/` (offline), for counting without a model."""
    return CLIPTokenizer.from_pretrained(str(_REFERENCE_TOKENIZER))
