"""README: a LoRA that cannot be used is reported next to the image, which is still generated
with the others. Malformed files, files deleted after the scan, and a network whose delta math
fails each give a warning naming the file; the good LoRA applies as if it were alone."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_settings import cpu_settings
from lora_files import write_kohya_lora
from safetensors.torch import load_file, save_file

from webui.arch import Arch
from webui.engine.generate import Engine, GenerationRequest
from webui.networks.apply.apply_errors import NetworkApplyError

SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 9}


@pytest.fixture
def engine(tmp_path: Path, tiny_checkpoint_factory) -> Engine:
    models, loras = tmp_path / "models", tmp_path / "loras"
    models.mkdir()
    loras.mkdir()
    shutil.copy(tiny_checkpoint_factory(Arch.SD1), models / "tiny.safetensors")
    write_kohya_lora(loras / "ink.safetensors", Arch.SD1, {"ss_base_model_version": "sd_v1"})
    shutil.copy(loras / "ink.safetensors", loras / "twin.safetensors")
    tensors = load_file(loras / "ink.safetensors")
    up = next(key for key in tensors if key.endswith("lora_up.weight"))
    tensors[up] = torch.cat([tensors[up], tensors[up]], dim=1)  # rank no longer matches down
    save_file(tensors, str(loras / "broken.safetensors"))
    for name in ("gone1", "gone2"):
        shutil.copy(loras / "ink.safetensors", loras / f"{name}.safetensors")
    engine = Engine(cpu_settings(models, loras, tmp_path))
    engine.load("tiny")
    return engine


def render(engine: Engine, prompt: str):
    result = engine.generate(GenerationRequest(prompt, **SMALL))
    return np.asarray(result.images[0].image), result


def test_malformed_and_deleted_loras_are_warnings_and_the_good_one_applies(
    engine: Engine,
) -> None:
    alone, result = render(engine, "a cat <lora:ink:0.8>")
    assert result.warnings == []
    for name in ("gone1", "gone2"):
        (engine.settings.loras_dir / f"{name}.safetensors").unlink()  # after the catalog scan
    image, result = render(
        engine, "a cat <lora:broken:1> <lora:gone1:1> <lora:ink:0.8> <lora:gone2:1>"
    )
    joined = "\n".join(result.warnings)
    assert "broken.safetensors" in joined and "rank" in joined
    assert "gone1.safetensors" in joined and "gone2.safetensors" in joined
    assert len(result.warnings) == 3, result.warnings
    assert np.array_equal(alone, image)


def test_a_network_whose_delta_math_fails_is_left_out_with_a_warning(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    alone, _ = render(engine, "a cat <lora:ink:0.8>")
    backends = engine._networks
    assert backends is not None
    real_apply = backends.native.apply
    calls: list[list[str]] = []

    def failing_apply(networks, **kwargs):
        # the patcher's contract: roll back, then raise naming the failing network
        calls.append([network.name for network, _ in networks])
        for network, _ in networks:
            if network.name == "twin":
                raise NetworkApplyError(network, "lora_unet_x", RuntimeError("shapes"))
        return real_apply(networks, **kwargs)

    monkeypatch.setattr(backends.native, "apply", failing_apply)
    image, result = render(engine, "a cat <lora:twin:1> <lora:ink:0.8>")
    assert calls == [["twin", "ink"], ["ink"]]  # one retry, without the failing network
    assert len(result.warnings) == 1 and "twin" in result.warnings[0]
    assert "lora_unet_x" in result.warnings[0]
    assert np.array_equal(alone, image)
