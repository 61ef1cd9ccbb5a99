"""The `webuiapi` client from PyPI, unmodified, drives a running server: txt2img with a LoRA,
listings, refreshes and model switching, with HTTP basic auth on."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import webuiapi
from conftest import RunningServer, autov3, folders, sha256
from lora_files import write_kohya_lora

from webui.api import routes
from webui.api.auth import Credential
from webui.api.infotext_fields import a1111_fields
from webui.arch import Arch
from webui.server import Access

SMALL = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def server(start_server, tiny_checkpoint_factory, tmp_path_factory) -> RunningServer:
    settings = folders(tmp_path_factory.mktemp("client"))
    (settings.models_dir / "sub").mkdir()
    tiny = tiny_checkpoint_factory(Arch.SD1)
    shutil.copy(tiny, settings.models_dir / "alpha.safetensors")
    shutil.copy(tiny, settings.models_dir / "sub" / "beta.safetensors")
    write_kohya_lora(
        settings.loras_dir / "ink.safetensors",
        Arch.SD1,
        {"ss_output_name": "inky", "ss_tag_frequency": '{"ink": {"line art": 3}}'},
    )
    return start_server(settings, Access(api=(Credential("bot", "s3cret:x"),)))


@pytest.fixture
def api(server: RunningServer) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(port=server.port, username="bot", password="s3cret:x")


def test_txt2img_with_a_lora_names_it_and_its_hash(
    api: webuiapi.WebUIApi, server: RunningServer
) -> None:
    api.util_set_model("alpha")
    result = api.txt2img(
        prompt="a cat <lora:ink:0.8>",
        negative_prompt="blurry, ugly",
        seed=1234,
        cfg_scale=6.5,
        sampler_name="DPM++ 2M",
        scheduler="Karras",
        enable_hr=True,  # with webuiapi's hires defaults: x2, Latent, denoising 0.7
        restore_faces=True,
        styles=["none"],
        **SMALL,
    )
    assert len(result.images) == 1 and result.image.size == (128, 128)
    model_file = server.engine.settings.models_dir / "alpha.safetensors"
    lora_hash = autov3(server.engine.settings.loras_dir / "ink.safetensors")
    expected = {
        "Prompt": "a cat <lora:ink:0.8>",
        "Negative prompt": "blurry, ugly",
        "Steps": "2",
        "Sampler": "DPM++ 2M Karras",
        "CFG scale": "6.5",
        "Seed": "1234",
        "Size-1": "64",
        "Size-2": "64",
        "Model hash": sha256(model_file)[:10],
        "Model": "alpha",
        "Lora hashes": f"ink: {lora_hash}",
        "Denoising strength": "0.7",
        "Hires upscale": "2",
        "Hires upscaler": "Latent",
    }
    fields = a1111_fields(result.image.info["parameters"])
    assert {key: fields.get(key) for key in expected} == expected
    # the same reading comes back from the server's own png-info route
    assert api.png_info(result.image).json["parameters"] == fields
    assert result.info["all_seeds"] == [1234]
    assert result.info["infotexts"] == [result.image.info["parameters"]]
    assert result.info["sd_model_hash"] == expected["Model hash"]
    assert result.info["denoising_strength"] == 0.7
    assert result.parameters["prompt"] == "a cat <lora:ink:0.8>"
    assert result.parameters["enable_hr"] is True


def test_loras_are_listed_as_a1111_lists_them(
    api: webuiapi.WebUIApi, server: RunningServer
) -> None:
    loras_dir = server.engine.settings.loras_dir
    assert api.get_loras() == [
        {
            "name": "ink",
            "alias": "inky",
            "path": str(loras_dir / "ink.safetensors"),
            "metadata": {"ss_output_name": "inky", "ss_tag_frequency": {"ink": {"line art": 3}}},
        }
    ]
    write_kohya_lora(loras_dir / "later.safetensors", Arch.SD1)
    try:
        api.custom_post("refresh-loras", baseurl=True)  # webuiapi 0.9.17 has no refresh_loras()
        names = {lora["name"]: lora["alias"] for lora in api.get_loras()}
        assert names == {"ink": "inky", "later": "later"}
    finally:
        (loras_dir / "later.safetensors").unlink()
        api.custom_post("refresh-loras", baseurl=True)


def test_lora_headers_are_read_once_per_file_version(
    api: webuiapi.WebUIApi, server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    original = routes.read_metadata

    def counting(path):
        reads.append(Path(path).name)
        return original(path)

    monkeypatch.setattr(routes, "read_metadata", counting)
    later = server.engine.settings.loras_dir / "later.safetensors"

    def listed() -> dict:
        api.custom_post("refresh-loras", baseurl=True)
        return {lora["name"]: lora["metadata"] for lora in api.get_loras()}

    try:
        write_kohya_lora(later, Arch.SD1, {"ss_output_name": "first"})
        assert listed()["later"] == {"ss_output_name": "first"}
        assert listed()["later"] == {"ss_output_name": "first"}
        assert reads.count("later.safetensors") == 1  # not once per request
        write_kohya_lora(later, Arch.SD1, {"ss_output_name": "second version"})
        assert listed()["later"] == {"ss_output_name": "second version"}
        assert reads.count("later.safetensors") == 2
    finally:
        later.unlink(missing_ok=True)
        api.custom_post("refresh-loras", baseurl=True)


def test_sd_models_have_a1111_titles_and_hashes(
    api: webuiapi.WebUIApi, server: RunningServer
) -> None:
    models_dir = server.engine.settings.models_dir
    digest = sha256(models_dir / "alpha.safetensors")
    assert api.get_sd_models() == [
        {
            "title": f"alpha.safetensors [{digest[:10]}]",
            "model_name": "alpha",
            "hash": digest[:10],
            "sha256": digest,
            "filename": str(models_dir / "alpha.safetensors"),
            "config": None,
        },
        {
            "title": f"sub/beta.safetensors [{digest[:10]}]",
            "model_name": "sub_beta",
            "hash": digest[:10],
            "sha256": digest,
            "filename": str(models_dir / "sub" / "beta.safetensors"),
            "config": None,
        },
    ]
    api.refresh_checkpoints()


def test_samplers_list_a1111_names(api: webuiapi.WebUIApi) -> None:
    samplers = {s["name"]: s for s in api.get_samplers()}
    assert {"Euler a", "Euler", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "UniPC"} <= set(samplers)
    assert samplers["Euler a"]["aliases"] == ["k_euler_a", "euler_ancestral"]
    assert samplers["DPM++ 2M Karras"]["options"] == {"use_karras_sigmas": "True"}


def test_switching_models(api: webuiapi.WebUIApi, server: RunningServer) -> None:
    api.util_set_model("beta")  # webuiapi picks the closest title
    assert api.util_get_current_model().startswith("sub/beta.safetensors [")
    assert server.engine.model is not None and server.engine.model.name == "sub/beta"
    result = api.txt2img(prompt="a dog", seed=3, **SMALL)
    assert a1111_fields(result.image.info["parameters"])["Model"] == "beta"

    # one request on another model, through override_settings
    result = api.txt2img(
        prompt="a dog",
        seed=3,
        override_settings={"sd_model_checkpoint": "alpha.safetensors"},
        **SMALL,
    )
    assert a1111_fields(result.image.info["parameters"])["Model"] == "alpha"
    api.set_options({"sd_model_checkpoint": "sub/beta"})
    assert api.get_options()["sd_model_checkpoint"].startswith("sub/beta.safetensors [")


def test_clip_skip_through_override_settings(api: webuiapi.WebUIApi) -> None:
    result = api.txt2img(
        prompt="a dog", seed=3, override_settings={"CLIP_stop_at_last_layers": 2}, **SMALL
    )
    assert a1111_fields(result.image.info["parameters"])["Clip skip"] == "2"
    assert result.info["clip_skip"] == 2


def test_clip_skip_set_through_options_holds_for_later_requests(api: webuiapi.WebUIApi) -> None:
    api.set_options({"CLIP_stop_at_last_layers": 2})
    try:
        assert api.get_options()["CLIP_stop_at_last_layers"] == 2
        result = api.txt2img(prompt="a dog", seed=3, **SMALL)
        assert a1111_fields(result.image.info["parameters"])["Clip skip"] == "2"
        assert result.info["clip_skip"] == 2
    finally:
        api.set_options({"CLIP_stop_at_last_layers": 1})
    result = api.txt2img(prompt="a dog", seed=3, **SMALL)
    assert "Clip skip" not in a1111_fields(result.image.info["parameters"])
