"""Standing guards for the text parsers that read user input (the tag grammar, the infotext
parser and A1111's field view of it): on any text they return a result or raise only our own
error types, and they run in linear time on adversarial input."""

from __future__ import annotations

import gc
import re
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from webui.api.infotext_fields import a1111_fields
from webui.engine.infotext import Infotext, parse_infotext
from webui.engine.prompt_encoding import parse_attention
from webui.prompt import ParsedPrompt, parse_prompt

# the pieces the grammars are made of, and those that broke them
ALPHABET = [
    "<lora:", "<lyco:", "<a:", "<", ">", ":", "\n", ",", " ", "(", ")", "[", "]", "=", "@", ".",
    "1", "0.5", "e999", "1e999", "nan", "inf", "-", '"', "\\", "te=", "lbw=", "dyn=", "ALL", "a",
    "Steps: 20", "Negative prompt:", "9" * 30,
]  # fmt: skip
adversarial = st.lists(st.sampled_from(ALPHABET), max_size=60).map("".join)
text = st.one_of(st.text(max_size=200), adversarial)

# A1111's own pair pattern (modules/infotext_utils.py), the reference for our linear-time one
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


@settings(max_examples=400)
@given(text)
def test_prompt_parser_returns_a_result_for_any_text(prompt: str) -> None:
    parsed = parse_prompt(prompt)
    assert isinstance(parsed, ParsedPrompt)
    for tag in parsed.tags:  # a tag that applies has finite strengths only
        for strength in (tag.te1, tag.te2, tag.unet, tag.in_blocks, tag.mid, tag.out):
            assert isinstance(strength, float) is False or strength == strength
            assert not isinstance(strength, float) or abs(strength) < float("inf")


@settings(max_examples=400)
@given(text)
def test_infotext_parsers_return_a_result_for_any_text(raw: str) -> None:
    assert isinstance(parse_infotext(raw), Infotext)
    assert isinstance(a1111_fields(raw), dict)


@settings(max_examples=400)
@given(text)
def test_infotext_pairs_are_read_as_a1111_reads_them(raw: str) -> None:
    line = raw.replace("\n", " ")
    expected = {
        key.strip(): value.strip() for key, value in A1111_PARAM.findall(line)
    }  # unquoting aside
    text = f"prompt\n{line}"
    parsed = parse_infotext(text)
    if len(A1111_PARAM.findall(line)) >= 3:
        assert list(parsed.params) == list(expected)
    else:
        assert parsed.params == {}


def _seconds(parse: Callable[[str], object], text: str) -> float:
    # the collector's passes over the many small objects a parse makes land at random and
    # distort the growth ratio; the parse's own work is what is measured. No gc.collect()
    # first: late in the suite the heap is large and each full collection took ~1 s
    gc.disable()
    try:
        started = time.perf_counter()
        parse(text)
        return time.perf_counter() - started
    finally:
        gc.enable()


SHAPES: dict[str, Callable[[int], str]] = {
    "newlines": lambda n: "a" + "\n" * n + "b",
    "spaces": lambda n: "a" + " " * n + "b",
    "commas and newlines": lambda n: " ," * (n // 2) + "\n" * (n // 2),
    "openings": lambda n: "<lora:" * (n // 6),
    "word openings": lambda n: "<a:" * (n // 3),
    "a long word": lambda n: "a" * n,
    "words": lambda n: "a " * (n // 2),
    "pairs then a word": lambda n: "a: b, " * (n // 12) + "a" * (n // 2),
    "colons": lambda n: ":" * n,
    "parentheses": lambda n: "(" * n,
    "open quotes": lambda n: 'a: "' + "\\a" * (n // 2),
    "open weights": lambda n: "(a:" * (n // 3),
    "brackets": lambda n: "([a]" * (n // 4),
    "breaks": lambda n: "a BREAK " * (n // 8),
}
PARSERS: dict[str, Callable[[str], object]] = {
    "prompt": parse_prompt,
    "infotext": parse_infotext,
    "a1111_fields": a1111_fields,
    "emphasis": parse_attention,
}


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_parsers_run_in_linear_time(parser: str, shape: str) -> None:
    parse, make = PARSERS[parser], SHAPES[shape]
    # 100k characters: the old regexes took minutes here (25 s at 40k newlines in a prompt)
    large = [_seconds(parse, make(100_000)) for _ in range(2)]
    assert large[0] < 1.0
    # growth n -> 4n (25k -> 100k): ~4x when linear, ~16x when quadratic; best of 2 against
    # timer noise, and a 10 ms floor so that a few milliseconds of noise do not decide
    small = min(_seconds(parse, make(25_000)) for _ in range(2))
    assert min(large) < 10 * max(small, 0.01)
