"""A1111's hires fix on a tiny SD1 model: the upscaled size, the second pass's step count in the
progress, the infotext through PNG Info, a LoRA only in the hires prompt changing only the second
pass; and the pure parts (target size, img2img schedule) against A1111's arithmetic."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_settings import cpu_settings
from lora_files import write_kohya_lora

from webui.api.infotext_fields import a1111_fields
from webui.arch import Arch
from webui.engine import hires
from webui.engine.generate import Engine, GenerationRequest, Progress, RequestError, Stage
from webui.engine.hires import HiresFix, second_pass_schedule

SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 5}


@pytest.fixture
def engine(tmp_path: Path, tiny_checkpoint_factory) -> Engine:
    models, loras = tmp_path / "models", tmp_path / "loras"
    models.mkdir()
    loras.mkdir()
    shutil.copy(tiny_checkpoint_factory(Arch.SD1), models / "tiny.safetensors")
    write_kohya_lora(loras / "ink.safetensors", Arch.SD1, {"ss_base_model_version": "sd_v1"})
    engine = Engine(cpu_settings(models, loras, tmp_path, save_outputs=False))
    engine.load("tiny")
    return engine


@pytest.mark.parametrize(
    ("fix", "size"),
    [
        (HiresFix(scale=2.0), (128, 128)),
        (HiresFix(resize_x=96), (96, 96)),
        (HiresFix(scale=1.5, upscaler="Lanczos"), (96, 96)),
        (HiresFix(resize_x=128, resize_y=96, upscaler="Latent (nearest-exact)"), (128, 96)),
    ],
)
def test_output_has_the_upscaled_size(engine: Engine, fix: HiresFix, size) -> None:
    result = engine.generate(GenerationRequest("a cat", hires=fix, **SMALL))
    assert result.images[0].image.size == size


def test_progress_covers_both_passes(engine: Engine) -> None:
    seen: list[Progress] = []
    request = GenerationRequest("a cat", batch_count=2, hires=HiresFix(steps=3), **SMALL)
    engine.generate(request, on_progress=seen.append)
    steps = [(p.step, p.total) for p in seen if p.stage is Stage.DENOISE]
    # Euler a calls back once per step: 2 first-pass then 3 hires steps, twice
    assert steps == [(n, 10) for n in range(1, 11)]


def test_hires_steps_zero_is_the_first_pass_count(engine: Engine) -> None:
    seen: list[Progress] = []
    engine.generate(GenerationRequest("a cat", hires=HiresFix(), **SMALL), on_progress=seen.append)
    assert [p.step for p in seen] == [1, 2, 3, 4]


def test_infotext_round_trips_through_png_info(engine: Engine) -> None:
    fix = HiresFix(
        scale=2.0,
        steps=3,
        denoising_strength=0.55,
        upscaler="Latent (bicubic)",
        prompt="a dog",
        negative_prompt="blur",
        sampler="DPM++ 2M",
        cfg_scale=4.5,
    )
    result = engine.generate(GenerationRequest("a cat", hires=fix, **SMALL))
    fields = a1111_fields(result.images[0].infotext.format())
    expected = {
        "Size-1": "64",
        "Size-2": "64",
        "Denoising strength": "0.55",
        "Hires upscale": "2",
        "Hires steps": "3",
        "Hires upscaler": "Latent (bicubic)",
        "Hires prompt": "a dog",
        "Hires negative prompt": "blur",
        "Hires sampler": "DPM++ 2M",
        "Hires CFG Scale": "4.5",
    }
    assert {key: fields.get(key) for key in expected} == expected


def test_a_lora_only_in_the_hires_prompt_changes_only_the_second_pass(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    first_pass: list[torch.Tensor] = []
    original = hires.upscale_latents

    def recording(latents, upscaler, size):
        first_pass.append(latents.clone())
        return original(latents, upscaler, size)

    monkeypatch.setattr(hires, "upscale_latents", recording)
    plain = engine.generate(GenerationRequest("a cat", hires=HiresFix(prompt="a cat"), **SMALL))
    with_lora = engine.generate(
        GenerationRequest("a cat", hires=HiresFix(prompt="a cat <lora:ink:1>"), **SMALL)
    )
    assert torch.equal(first_pass[0], first_pass[1])
    a, b = (np.asarray(r.images[0].image) for r in (plain, with_lora))
    assert not np.array_equal(a, b)
    assert with_lora.images[0].infotext.params["Hires prompt"] == "a cat <lora:ink:1>"


def test_hires_schedule_runs_exactly_the_asked_steps() -> None:
    # A1111's setup_img2img_steps: a schedule of int(steps / strength), the last `steps` run
    for steps in range(1, 40):
        for strength in (0.05, 0.3, 0.5, 0.7, 0.75, 0.99, 1.0):
            schedule = second_pass_schedule(steps, strength)
            assert schedule.num_inference_steps == max(int(steps / min(strength, 0.999)), steps)
            assert int(schedule.num_inference_steps * schedule.strength) == steps  # diffusers
            assert 0 < schedule.strength <= 1


@pytest.mark.parametrize(
    ("fix", "field"),
    [
        (HiresFix(scale=5.0), "hr_scale"),
        (HiresFix(denoising_strength=0.0), "denoising_strength"),
        (HiresFix(upscaler="ESRGAN_4x"), "hr_upscaler"),
        (HiresFix(sampler="nope"), "hr_sampler_name"),
        (HiresFix(resize_x=4096), "hr_resize_x"),
        (HiresFix(scale=4.0), "hires size"),  # 1024 x 4 = 4096 > 2048
    ],
)
def test_bad_hires_fields_are_named(fix: HiresFix, field: str) -> None:
    with pytest.raises(RequestError, match=field):
        GenerationRequest("a cat", width=1024, hires=fix).validate()
