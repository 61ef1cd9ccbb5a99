"""The API honours A1111's hires-fix and variation-seed fields: the image is upscaled, the
infotext names them, `info` returns the subseeds, and PNG Info reads the fields back."""

from __future__ import annotations

import base64
import io
import json
import shutil

import pytest
import requests
from conftest import RunningServer, folders
from PIL import Image

from webui.arch import Arch


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory, tiny_checkpoint_factory) -> RunningServer:
    settings = folders(tmp_path_factory.mktemp("hires_api"))
    shutil.copy(tiny_checkpoint_factory(Arch.SD1), settings.models_dir / "tiny.safetensors")
    return start_server(settings)


def test_hires_and_variation_fields_are_honoured(server: RunningServer) -> None:
    body = {
        "prompt": "a cat",
        "steps": 2,
        "width": 64,
        "height": 64,
        "seed": 7,
        "subseed": 99,
        "subseed_strength": 0.25,
        "enable_hr": True,
        "hr_scale": 1.5,
        "hr_upscaler": "Latent (nearest)",
        "hr_second_pass_steps": 2,
        "denoising_strength": 0.6,
        "hr_prompt": "a dog",
    }
    response = requests.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=120)
    assert response.status_code == 200, response.text
    data = response.json()
    image = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
    assert image.size == (96, 96)
    info = json.loads(data["info"])
    assert info["seed"] == 7 and info["subseed"] == 99 and info["subseed_strength"] == 0.25
    assert info["denoising_strength"] == 0.6
    png = requests.post(
        server.url + "/sdapi/v1/png-info", json={"image": data["images"][0]}, timeout=30
    ).json()["parameters"]
    expected = {
        "Variation seed": "99",
        "Variation seed strength": "0.25",
        "Denoising strength": "0.6",
        "Hires upscale": "1.5",
        "Hires steps": "2",
        "Hires upscaler": "Latent (nearest)",
        "Hires prompt": "a dog",
    }
    assert {key: png.get(key) for key in expected} == expected


@pytest.mark.parametrize(
    ("field", "value"),
    [("hr_upscaler", "4x-UltraSharp"), ("denoising_strength", 1.5), ("hr_scale", 9)],
)
def test_bad_hires_fields_get_422(server: RunningServer, field: str, value) -> None:
    body = {"prompt": "x", "steps": 2, "enable_hr": True, field: value}
    response = requests.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=60)
    assert response.status_code == 422
    assert field in response.text
