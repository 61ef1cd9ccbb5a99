"""`<lora:name:W>` in a prompt applies that file natively before the prompt is encoded; tags are
stripped from the text sent to CLIP, kept in the infotext, and problems become warnings."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_settings import cpu_settings
from lora_files import write_kohya_lora

from webui.arch import Arch
from webui.engine.generate import Engine, GenerationRequest
from webui.engine.infotext import parse_infotext

SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 9}


def autov3(path: Path) -> str:
    data = path.read_bytes()
    header_length = struct.unpack("<Q", data[:8])[0]
    return hashlib.sha256(data[8 + header_length :]).hexdigest()[:12]


@pytest.fixture
def engine(tmp_path: Path, tiny_checkpoint_factory) -> Engine:
    models, loras = tmp_path / "models", tmp_path / "loras"
    models.mkdir()
    (loras / "styles").mkdir(parents=True)
    shutil.copy(tiny_checkpoint_factory(Arch.SD1), models / "tiny.safetensors")
    write_kohya_lora(
        loras / "styles" / "Ink.safetensors", Arch.SD1, {"ss_base_model_version": "sd_v1"}
    )
    write_kohya_lora(
        loras / "xl-only.safetensors", Arch.SDXL, {"ss_base_model_version": "sdxl_base_v1-0"}
    )
    settings = cpu_settings(models, loras, tmp_path)
    engine = Engine(settings)
    engine.load("tiny")
    return engine


def render(engine: Engine, prompt: str, negative: str = ""):
    result = engine.generate(GenerationRequest(prompt, negative_prompt=negative, **SMALL))
    return np.asarray(result.images[0].image), result


def test_lora_changes_the_image_and_is_undone_exactly(engine: Engine) -> None:
    base, _ = render(engine, "a cat")
    weights_before = {k: v.clone() for k, v in engine.model.pipe.unet.state_dict().items()}
    with_lora, result = render(engine, "a cat <lora:ink:0.8>")
    assert result.warnings == []
    assert not np.array_equal(base, with_lora)
    again, _ = render(engine, "a cat")
    assert np.array_equal(base, again)
    for key, tensor in engine.model.pipe.unet.state_dict().items():
        assert torch.equal(tensor, weights_before[key]), key


def test_tags_are_stripped_before_encoding(engine: Engine) -> None:
    base, _ = render(engine, "a cat")
    zero, result = render(engine, "a cat, <lora:ink:0>")  # strength 0 changes no weight
    assert np.array_equal(base, zero)
    assert result.warnings == []


def test_infotext_keeps_the_tag_and_lists_lora_hashes(engine: Engine) -> None:
    _, result = render(engine, "a cat <lora:styles/Ink:0.8>")
    parsed = parse_infotext(result.images[0].infotext.format())
    assert parsed.prompt == "a cat <lora:styles/Ink:0.8>"
    expected = autov3(engine.settings.loras_dir / "styles" / "Ink.safetensors")
    assert parsed.params["Lora hashes"] == f"styles/Ink: {expected}"


def test_problems_become_warnings_and_the_image_still_renders(engine: Engine) -> None:
    base, _ = render(engine, "a cat")
    image, result = render(
        engine, "a cat <lora:missing:1> <lora:xl-only:1> <lora:ink:abc>", negative="<lora:ink:1>"
    )
    joined = "\n".join(result.warnings)
    assert "no LoRA file named 'missing'" in joined
    assert "xl-only: made for SDXL" in joined
    assert "<lora:ink:abc>: strength 'abc' is not a number" in joined
    assert "<lora:ink:1> in the negative prompt is ignored" in joined
    assert np.array_equal(base, image)  # nothing valid was applied
    assert "Lora hashes" not in result.images[0].infotext.params


def test_the_same_lora_twice_adds_strengths(engine: Engine) -> None:
    twice, result = render(engine, "a cat <lora:ink:0.4> <lora:ink:0.4>")
    once, _ = render(engine, "a cat <lora:ink:0.8>")
    assert any("more than once" in w for w in result.warnings)
    assert np.array_equal(twice, once)


def test_a_lora_added_after_start_is_found(engine: Engine) -> None:
    shutil.copy(
        engine.settings.loras_dir / "styles" / "Ink.safetensors",
        engine.settings.loras_dir / "late.safetensors",
    )
    _, result = render(engine, "a cat <lora:late:1>")
    assert result.warnings == []
    assert json.dumps(result.images[0].infotext.params).count("late: ") == 1
