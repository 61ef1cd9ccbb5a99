"""FLUX.1 through the A1111 API (the `webuiapi` client, and `distilled_cfg_scale` as Forge takes
it), `/sd-models` listing FLUX files, and `python app.py generate` on a FLUX file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
import webuiapi
from app_in_process import run_app
from conftest import RunningServer, folders
from flux_models import write_flux_models

from webui.engine.infotext import parse_infotext, read_image_parameters

SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 5, "cfg_scale": 1}


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory) -> RunningServer:
    settings = folders(tmp_path_factory.mktemp("flux-api"))
    write_flux_models(settings.models_dir)
    return start_server(settings)


def test_webuiapi_generates_with_flux_and_lists_it(server: RunningServer) -> None:
    api = webuiapi.WebUIApi(port=server.port)
    names = [m["model_name"] for m in api.get_sd_models()]
    assert {"flux1-dev", "flux1-schnell"} <= set(names)
    api.util_set_model("flux1-dev")
    result = api.txt2img(prompt="a fox", **SMALL)
    assert result.image.size == (64, 64)
    params = parse_infotext(read_image_parameters(result.image)).params
    assert params["Model"] == "flux1-dev" and params["Distilled CFG Scale"] == "3.5"
    assert params["Sampler"] == "Euler"


def test_distilled_cfg_scale_field_and_bad_size(server: RunningServer) -> None:
    url = f"{server.url}/sdapi/v1/txt2img"
    body = {"prompt": "a fox", "distilled_cfg_scale": 6, **SMALL}
    answer = requests.post(url, json=body, timeout=300)
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert parse_infotext(info["infotexts"][0]).params["Distilled CFG Scale"] == "6"
    bad = requests.post(url, json={**body, "width": 72}, timeout=300)
    assert bad.status_code == 422 and "multiple of 16" in bad.text
    assert (
        requests.post(url, json={**body, "distilled_cfg_scale": 99}, timeout=60).status_code == 422
    )


def test_cli_generates_a_flux_image(tmp_path: Path, capfd) -> None:
    names = write_flux_models(tmp_path / "models")
    out = tmp_path / "out.png"
    model = tmp_path / "models" / f"{names[next(iter(names))]}.safetensors"
    done = run_app(
        capfd, "--cache-dir", str(tmp_path / "cache"), "generate",
        "--model", str(model), "--prompt", "a fox", "--steps", "2",
        "--width", "64", "--height", "64", "--seed", "3", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    from PIL import Image

    with Image.open(out) as image:
        assert image.size == (64, 64)
        params = parse_infotext(read_image_parameters(image)).params
    assert params["CFG scale"] == "1" and params["Sampler"] == "Euler"  # FLUX.1's defaults
