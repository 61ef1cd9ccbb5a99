"""Infotext: format and parse against hand-written examples in AUTOMATIC1111's format."""

from __future__ import annotations

from PIL import Image

from webui.engine.infotext import Infotext, parse_infotext, quote, read_image_parameters, save_png

# Written by hand the way A1111 1.x writes them (quoted values hold commas and colons).
A1111_TEXT = (
    "masterpiece, a fox in the snow <lora:ink:0.8>\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "ink: 0123456789ab", '
    "Version: v1.6.0"
)


def test_parses_a1111_text_field_by_field() -> None:
    parsed = parse_infotext(A1111_TEXT)
    assert parsed.prompt == "masterpiece, a fox in the snow <lora:ink:0.8>"
    assert parsed.negative_prompt == "blurry, lowres"
    assert dict(parsed.params) == {
        "Steps": "20",
        "Sampler": "DPM++ 2M Karras",
        "CFG scale": "7",
        "Seed": "1234",
        "Size": "512x768",
        "Model hash": "6ce0161689",
        "Model": "v1-5-pruned-emaonly",
        "Lora hashes": "ink: 0123456789ab",
        "Version": "v1.6.0",
    }


def test_multiline_prompt_and_negative() -> None:
    text = "line one\nline two\nNegative prompt: bad\nworse\nSteps: 5, Sampler: Euler, Seed: 1"
    parsed = parse_infotext(text)
    assert parsed.prompt == "line one\nline two"
    assert parsed.negative_prompt == "bad\nworse"
    assert parsed.params["Sampler"] == "Euler"


def test_text_without_parameters_line_is_all_prompt() -> None:
    parsed = parse_infotext("just a prompt, with: a colon")
    assert parsed.prompt == "just a prompt, with: a colon"
    assert parsed.params == {}


def test_quote_follows_a1111() -> None:
    assert quote("Euler a") == "Euler a"
    assert quote("a: 1, b: 2") == '"a: 1, b: 2"'
    assert quote('say "hi"') == '"say \\"hi\\""'


def test_format_then_parse_round_trips() -> None:
    info = Infotext(
        "a cat, (detailed:1.2)",
        "ugly",
        {"Steps": "20", "Sampler": "Euler a", "Lora hashes": 'x: abc, y: "q"', "Size": "64x64"},
    )
    assert parse_infotext(info.format()) == info


def test_png_round_trip(tmp_path) -> None:
    info = parse_infotext(A1111_TEXT)
    path = tmp_path / "out.png"
    save_png(Image.new("RGB", (8, 8)), path, info)
    with Image.open(path) as image:
        assert read_image_parameters(image) == info.format()
        assert parse_infotext(read_image_parameters(image)) == info


def test_image_without_parameters(tmp_path) -> None:
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    with Image.open(path) as image:
        assert read_image_parameters(image) is None
