"""How many CLIP tokens a prompt takes, as A1111's counter shows it (`12/75`, `80/150`).

Counted on the chunks the encoder builds (emphasis parsed, BREAK, the comma rule), so the
number is what the model receives, not a guess from the raw text."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from transformers import CLIPTokenizer

from webui.engine.prompt_encoding import CHUNK_LENGTH, chunk_prompt
from webui.prompt import parse_prompt

# every family we run uses the same CLIP vocabulary: the counter works before a model loads
_REFERENCE_TOKENIZER = Path(__file__).resolve().parents[2] / "configs" / "sd15" / "tokenizer"


@dataclass(frozen=True)
class TokenCount:
    """`tokens` used of `limit` (a multiple of 75: one more chunk each time a chunk fills)."""

    tokens: int
    limit: int

    @property
    def chunks(self) -> int:
        return self.limit // CHUNK_LENGTH

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


@cache
def reference_tokenizer() -> CLIPTokenizer:
    """The CLIP tokenizer shipped in `configs/` (offline), for counting without a model."""
    return CLIPTokenizer.from_pretrained(str(_REFERENCE_TOKENIZER))
