"""Bad requests get 422 naming the field, and nothing reaches the engine."""

from __future__ import annotations

import base64

import pytest
import requests
from conftest import RunningServer, folders

GOOD = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory) -> RunningServer:
    return start_server(folders(tmp_path_factory.mktemp("validation")))


@pytest.fixture
def engine_calls(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every generate/load that reaches the engine."""
    calls: list[str] = []
    engine = server.engine
    for name in ("generate", "load", "load_default"):
        original = getattr(engine, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(engine, name, spy)
    return calls


@pytest.mark.parametrize(
    ("change", "loc", "message"),
    [
        ({"steps": "many"}, ["body", "steps"], "valid integer"),
        ({"steps": -3}, ["body", "steps"], "steps must be between 1 and 150"),
        ({"steps": 2.5}, ["body", "steps"], "integer"),
        ({"width": 100}, ["body", "width"], "width must be a multiple of 8"),
        ({"height": 4096}, ["body", "height"], "height must be a multiple of 8"),
        ({"cfg_scale": "high"}, ["body", "cfg_scale"], "valid number"),
        ({"cfg_scale": 31}, ["body", "cfg_scale"], "cfg_scale must be between 0 and 30"),
        ({"seed": -2}, ["body", "seed"], "seed must be -1"),
        ({"batch_size": 0}, ["body", "batch_size"], "batch_size must be between 1 and 8"),
        ({"n_iter": 0}, ["body", "n_iter"], "n_iter must be between 1 and 100"),
        ({"sampler_name": "Euler z"}, ["body", "sampler_name"], "unknown sampler 'Euler z'"),
        ({"prompt": ["a", "b"]}, ["body", "prompt"], "valid string"),
        (
            {"override_settings": {"CLIP_stop_at_last_layers": 0}},
            ["body", "override_settings", "CLIP_stop_at_last_layers"],
            "clip_skip must be between 1 and 12",
        ),
        (
            {"override_settings": {"sd_model_checkpoint": "missing.safetensors"}},
            ["body", "override_settings", "sd_model_checkpoint"],
            "unknown checkpoint 'missing.safetensors'",
        ),
    ],
)
def test_txt2img_rejects_bad_fields(
    server: RunningServer, engine_calls: list[str], change: dict, loc: list[str], message: str
) -> None:
    response = requests.post(server.url + "/sdapi/v1/txt2img", json={**GOOD, **change}, timeout=30)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == loc
    assert message in error["msg"]
    assert engine_calls == []


def test_unknown_model_in_options(server: RunningServer, engine_calls: list[str]) -> None:
    response = requests.post(
        server.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}, timeout=30
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "sd_model_checkpoint"]
    assert engine_calls == []


def test_png_info_rejects_what_is_not_an_image(server: RunningServer) -> None:
    for image in ("not base64!", base64.b64encode(b"plain text").decode()):
        response = requests.post(server.url + "/sdapi/v1/png-info", json={"image": image})
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["body", "image"]


def test_fields_a1111_clients_send_are_accepted(
    server: RunningServer, engine_calls: list[str]
) -> None:
    extras = {
        "enable_hr": False,
        "hr_upscaler": "Latent",
        "restore_faces": False,
        "styles": [],
        "alwayson_scripts": {"ControlNet": {"args": []}},
        "script_args": [],
        "script_name": None,
        "send_images": False,
        "save_images": False,
        "do_not_save_grid": True,
        "sampler_index": "Euler",
        "scheduler": "automatic",
    }
    response = requests.post(server.url + "/sdapi/v1/txt2img", json={**GOOD, **extras})
    assert response.status_code == 200
    body = response.json()
    assert body["images"] == []  # send_images: false
    assert body["parameters"]["hr_upscaler"] == "Latent"
    assert "generate" in engine_calls
