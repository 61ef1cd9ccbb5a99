"""Auto-applied trigger words: which are added to the encoded prompt, and the infotext line."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from lora_files import write_kohya_lora

from webui.arch import Arch
from webui.engine.generate import DEMO_MODEL_NAME, Engine, GenerationRequest
from webui.engine.trigger_words import ALL_TRIGGER_WORDS, add_trigger_words
from webui.settings import Settings


@pytest.mark.parametrize(
    ("prompt", "words", "limit", "text", "added"),
    [
        ("a cat", [["ink", "wash"]], 0, "a cat", ()),
        ("a cat", [["ink", "wash"]], 1, "a cat, ink", ("ink",)),
        (
            "a cat",
            [["ink", "wash"], ["paper"]],
            ALL_TRIGGER_WORDS,
            "a cat, ink, wash, paper",
            ("ink", "wash", "paper"),
        ),
        ("INK cat", [["ink", "wash"]], ALL_TRIGGER_WORDS, "INK cat, wash", ("wash",)),
        ("inked cat", [["ink"]], 1, "inked cat, ink", ("ink",)),  # whole words only
        ("", [["ink"]], 1, "ink", ("ink",)),
        ("a cat,", [[" ink ", ""]], 3, "a cat, ink", ("ink",)),
    ],
)
def test_add_trigger_words(prompt, words, limit, text, added) -> None:
    result = add_trigger_words(prompt, words, limit)
    assert (result.prompt, result.added) == (text, added)


def test_engine_adds_trigger_words_and_records_them(tmp_path: Path) -> None:
    loras = tmp_path / "loras"
    loras.mkdir()
    write_kohya_lora(loras / "ink.safetensors", Arch.SD1)
    engine = Engine(
        Settings(loras_dir=loras, save_outputs=False, cache_dir=tmp_path, auto_trigger_words=1)
    )
    engine.trigger_words = lambda path: ("ink wash", "mono") if path.stem == "ink" else ()
    engine.load(DEMO_MODEL_NAME)
    request = GenerationRequest("a cat <lora:ink:1>", steps=1, width=64, height=64, seed=1)
    image = engine.generate(request).images[0]
    assert image.infotext.params["Trigger words"] == "ink wash"
    assert image.infotext.prompt == "a cat <lora:ink:1>"  # the prompt stays as typed
    engine.settings = replace(engine.settings, auto_trigger_words=0)
    assert "Trigger words" not in engine.generate(request).images[0].infotext.params
