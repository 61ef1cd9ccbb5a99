"""FLUX.1 end to end with LoRAs (issue 18's acceptance): the A1111 API through the `webuiapi`
client and `python app.py generate` render a tiny FLUX.1 [dev] file with a kohya FLUX LoRA under
a per-step schedule and a 61-value `lbw=` vector exactly as the engine does in-process for the
same seed; the infotext names the LoRA and the distilled CFG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import webuiapi
from app_in_process import run_app
from conftest import RunningServer, folders
from flux_lora_files import write_flux_lora
from flux_models import write_flux_models
from PIL import Image

from webui.engine.generate import Engine, GenerationRequest
from webui.engine.infotext import parse_infotext, read_image_parameters

SEED, STEPS, DISTILLED = 21, 4, 4.5
SCHEDULED = "a fox <lora:foxstyle:0@0,1@0.5>"  # off for the first half, full for the second
# LoRA Block Weight's FLUX order: CLIP, T5, IN, D00..D18, S00..S37, OUT; D00 off
FLUX_LBW = ",".join(["1", "1", "1", "0", *["1"] * 18, *["1"] * 38, "1"])
SCHEDULED_BLOCKS = f"a fox <lora:foxstyle:0@0,1@0.5:lbw={FLUX_LBW}>"  # the schedule, D00 off


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory) -> RunningServer:
    settings = folders(tmp_path_factory.mktemp("flux-e2e"))
    write_flux_models(settings.models_dir)
    dev = settings.models_dir / "flux1-dev.safetensors"
    write_flux_lora(settings.loras_dir / "foxstyle.safetensors", dev)
    write_flux_lora(settings.loras_dir / "foxsingle.safetensors", dev, double=False)
    return start_server(settings)


@pytest.fixture(scope="module")
def local(server: RunningServer) -> Engine:
    """A second engine in this process on the same folders: the reference renders."""
    engine = Engine(server.engine.settings)
    engine.load("flux1-dev")
    return engine


def render(engine: Engine, prompt: str) -> np.ndarray:
    request = GenerationRequest(
        prompt,
        steps=STEPS,
        width=64,
        height=64,
        seed=SEED,
        cfg_scale=1,
        distilled_cfg_scale=DISTILLED,
    )
    result = engine.generate(request)
    assert not result.warnings, result.warnings
    return pixels(result.images[0].image)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def via_webuiapi(server: RunningServer, prompt: str) -> webuiapi.WebUIApiResult:
    """txt2img through the client; it has no `distilled_cfg_scale` argument, so the payload goes
    through its own request-and-decode path (as Forge users send that field with it)."""
    api = webuiapi.WebUIApi(port=server.port)
    api.util_set_model("flux1-dev")
    payload = {
        "prompt": prompt,
        "steps": STEPS,
        "width": 64,
        "height": 64,
        "seed": SEED,
        "cfg_scale": 1,
        "sampler_name": "Euler",
        "distilled_cfg_scale": DISTILLED,
    }
    return api.post_and_get_api_result(f"{api.baseurl}/txt2img", payload, use_async=False)


def test_sd_models_lists_the_flux_checkpoint(server: RunningServer) -> None:
    api = webuiapi.WebUIApi(port=server.port)
    models = {m["model_name"]: m for m in api.get_sd_models()}
    assert "flux1-dev" in models
    assert models["flux1-dev"]["filename"].endswith("flux1-dev.safetensors")
    assert {lora["name"] for lora in api.get_loras()} >= {"foxstyle", "foxsingle"}


def test_scheduled_flux_lora_through_the_api_is_the_engines_image(
    server: RunningServer, local: Engine
) -> None:
    result = via_webuiapi(server, SCHEDULED)
    got = pixels(result.image)
    assert np.array_equal(got, render(local, SCHEDULED))
    assert not np.array_equal(got, render(local, "a fox"))  # the LoRA acts
    # the schedule acts: full strength from the first step is another image
    assert not np.array_equal(got, render(local, "a fox <lora:foxstyle:1>"))
    params = parse_infotext(read_image_parameters(result.image)).params
    assert params["Distilled CFG Scale"] == "4.5" and params["Model"] == "flux1-dev"
    assert "foxstyle" in params["Lora hashes"]
    assert result.info["infotexts"][0].startswith(SCHEDULED)


def test_flux_block_weights_through_the_api(server: RunningServer, local: Engine) -> None:
    """D00 at 0 leaves only the single block's part of the LoRA: the image of a file that has
    only that part."""
    result = via_webuiapi(server, f"a fox <lora:foxstyle:1:lbw={FLUX_LBW}>")
    assert "lbw=" in result.info["infotexts"][0]
    got = pixels(result.image)
    assert np.array_equal(got, render(local, "a fox <lora:foxsingle:1>"))
    assert not np.array_equal(got, render(local, "a fox <lora:foxstyle:1>"))


def test_cli_renders_the_scheduled_block_weighted_lora_as_the_engine_does(
    server: RunningServer, local: Engine, tmp_path: Path, capfd
) -> None:
    settings = server.engine.settings
    out = tmp_path / "fox.png"
    done = run_app(
        capfd, "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
        "--loras-dir", str(settings.loras_dir), "generate",
        "--model", str(settings.models_dir / "flux1-dev.safetensors"),
        "--prompt", SCHEDULED_BLOCKS,
        "--steps", str(STEPS), "--width", "64", "--height", "64", "--seed", str(SEED),
        "--distilled-cfg", str(DISTILLED), "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr.lower(), done.stderr
    with Image.open(out) as image:
        got = pixels(image)
        params = parse_infotext(read_image_parameters(image)).params
    assert np.array_equal(got, render(local, SCHEDULED_BLOCKS))
    assert not np.array_equal(got, render(local, SCHEDULED))  # the block vector acts
    assert params["Distilled CFG Scale"] == "4.5" and "foxstyle" in params["Lora hashes"]
