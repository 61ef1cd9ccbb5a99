"""Request limits: a body over the cap gets 413, a prompt over it or a non-finite number 422
naming the field, a PNG Info image over the pixel cap 422 before it is decoded; nothing reaches
the engine."""

from __future__ import annotations

import base64
import json
import struct
import zlib

import pytest
import requests
from conftest import RunningServer, folders

from webui.prompt import parse_prompt
from webui.settings import LIMITS
from webui.ui.png_info import describe_image


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory) -> RunningServer:
    return start_server(folders(tmp_path_factory.mktemp("limits")))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` with a few bytes of pixel data: decoding it
    would fail or take gigabytes; reading its size needs neither."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)


def test_a_body_over_the_limit_gets_413(server: RunningServer) -> None:
    body = b'{"prompt": "' + b"a" * LIMITS.max_body_bytes + b'"}'
    response = requests.post(server.url + "/sdapi/v1/txt2img", data=body, timeout=60)
    assert response.status_code == 413
    assert "request body too large" in response.json()["detail"]


def test_a_streamed_body_over_the_limit_gets_413(server: RunningServer) -> None:
    def chunks():  # chunked transfer: no Content-Length to check
        yield b'{"prompt": "'
        for _ in range(LIMITS.max_body_bytes // (1 << 20) + 1):
            yield b"a" * (1 << 20)
        yield b'"}'

    response = requests.post(server.url + "/sdapi/v1/txt2img", data=chunks(), timeout=60)
    assert response.status_code == 413


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_prompt_over_the_limit_gets_422(server: RunningServer, field: str) -> None:
    body = {field: "a" * (LIMITS.max_prompt_chars + 1), "steps": 2}
    response = requests.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=60)
    assert response.status_code == 422
    error = response.json()["detail"][0]
    assert error["loc"] == ["body", field] and "too long" in error["msg"]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["cfg_scale", "subseed_strength"])
def test_non_finite_numbers_get_422(server: RunningServer, field: str, value: str) -> None:
    body = f'{{"prompt": "x", "steps": 2, "{field}": {value}}}'
    response = requests.post(
        server.url + "/sdapi/v1/txt2img",
        data=body,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", field]


def test_png_info_refuses_an_image_over_the_pixel_cap(server: RunningServer) -> None:
    data = base64.b64encode(_png_header_only(12_000, 12_000)).decode()
    response = requests.post(server.url + "/sdapi/v1/png-info", json={"image": data}, timeout=60)
    assert response.status_code == 422
    message = response.json()["detail"][0]["msg"]
    assert "12000x12000" in message and str(LIMITS.max_image_pixels) in message


def test_png_info_tab_refuses_an_image_over_the_pixel_cap(tmp_path) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(20_000, 20_000))  # over PIL's own bomb limit too
    text, rows = describe_image(str(path))
    assert "too large" in text and rows == []


def test_png_info_tab_reads_a_file(tmp_path) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 2, Sampler: Euler, CFG scale: 7")
    path = tmp_path / "small.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    text, rows = describe_image(str(path))
    assert text.startswith("a cat") and ["Steps", "2"] in rows


@pytest.mark.parametrize("tag", ["<lora:ink:1e999>", "<lora:ink:te=-1e999>", "<lora:ink:1e999@5>"])
def test_an_infinite_tag_strength_skips_the_tag(tag: str) -> None:
    parsed = parse_prompt(f"a cat {tag}")
    assert parsed.tags == () and parsed.text == "a cat"
    assert len(parsed.errors) == 1
    assert parsed.errors[0].startswith(tag) and "not a finite number" in parsed.errors[0]
    assert parsed.errors[0].endswith("tag skipped")


def test_nan_never_reaches_json(server: RunningServer) -> None:
    # the 422 itself is valid JSON (JSON cannot hold NaN)
    response = requests.post(
        server.url + "/sdapi/v1/txt2img",
        data='{"prompt": "x", "cfg_scale": NaN}',
        headers={"content-type": "application/json"},
        timeout=60,
    )
    json.loads(response.text)
