"""The prompt token counter: A1111's `N/75` counted on the chunks the encoder builds. Expected
numbers are hand-counted from the CLIP vocabulary (one token per plain English word and per
comma) and A1111's rule (every chunk but the last counts as a full 75)."""

from __future__ import annotations

import pytest

from webui.engine.generate import Engine
from webui.engine.token_count import count_tokens, reference_tokenizer
from webui.settings import Settings
from webui.ui.txt2img import token_counter_html


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("", "0/75"),
        ("a cat", "2/75"),
        # emphasis brackets and weights are syntax, the tag is not sent to CLIP: a cat , dog
        ("a (cat:1.3), <lora:x:0.5> dog", "4/75"),
        ("(((cat))) [dog]", "2/75"),
        # BREAK closes the first chunk: it counts as a full 75, then "b"
        ("a BREAK b", "76/150"),
        ("word " * 75, "75/75"),
        ("word " * 80, "80/150"),
        # the comma rule: the chunk fills 5 tokens after the comma, so it ends at the comma
        # (71 tokens, counted as 75) and the 10 words after it fill the second chunk
        ("word " * 70 + ", " + "word " * 10, "85/150"),
        ("word " * 151, "151/225"),
    ],
)
def test_count_matches_a1111(text: str, shown: str) -> None:
    assert count_tokens(reference_tokenizer(), text).format() == shown


def test_engine_counts_with_the_loaded_models_tokenizer(tmp_path) -> None:
    engine = Engine(
        Settings(
            models_dir=tmp_path, loras_dir=tmp_path, embeddings_dir=tmp_path, cache_dir=tmp_path
        )
    )
    # no model: the reference tokenizer; the comma left before a removed tag goes with it
    assert engine.count_tokens("a cat, <lora:x:1>").format() == "2/75"
    engine.load_default()  # the demo model
    assert engine.count_tokens("word " * 80).format() == "80/150"
    assert engine.count_tokens("a BREAK b").format() == "76/150"


def test_counter_html_marks_a_second_chunk() -> None:
    tokenizer = reference_tokenizer()
    assert "lw-tokens-chunked" not in token_counter_html(count_tokens(tokenizer, "a cat"))
    assert ">80/150<" in token_counter_html(count_tokens(tokenizer, "word " * 80))
