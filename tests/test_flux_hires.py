"""A1111's hires fix on the tiny FLUX.1 models: the target size (floored to FLUX's 16-pixel
step), the same image per seed, the second pass against diffusers' own FluxImg2ImgPipeline run
by hand on the first pass's latents, progress over both passes, the infotext, true CFG in the
hires pass, a LoRA in the hires prompt changing only the second pass, and the img2img step
count against diffusers' own `get_timesteps`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
)
from engine_settings import cpu_settings
from flux_models import write_flux_models
from PIL import Image
from safetensors.torch import save_file

from webui.api.infotext_fields import a1111_fields
from webui.arch import FluxVariant
from webui.engine import hires
from webui.engine.generate import Engine, GenerationRequest, Progress, RequestError, Stage
from webui.engine.hires import HiresFix, StrengthRounding, second_pass_schedule

DEV, SCHNELL = FluxVariant.DEV, FluxVariant.SCHNELL
PROMPT = "a red fox"
SMALL = {"steps": 2, "width": 64, "height": 80, "seed": 11, "cfg_scale": 1.0}


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> tuple[Engine, dict[FluxVariant, str]]:
    root = tmp_path_factory.mktemp("flux-hires")
    models, loras = root / "models", root / "loras"
    models.mkdir()
    loras.mkdir()
    return Engine(cpu_settings(models, loras, root, save_outputs=False)), write_flux_models(models)


def _write_qkv_lora(path: Path, hidden: int) -> None:
    """A kohya FLUX.1 LoRA on the first double block's fused image qkv."""
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    g = torch.Generator().manual_seed(1)
    tensors = {
        f"{key}.lora_up.weight": torch.randn(3 * hidden, 4, generator=g),
        f"{key}.lora_down.weight": torch.randn(4, hidden, generator=g),
    }
    save_file(tensors, path, metadata={"ss_base_model_version": "flux1"})


def _run(engine, variant=DEV, on_progress=None, prompt=PROMPT, **fields):
    eng, names = engine
    eng.load(names[variant])
    return eng.generate(GenerationRequest(prompt, **{**SMALL, **fields}), on_progress)


def _pixels(result, index: int = 0) -> np.ndarray:
    return np.asarray(result.images[index].image).astype(np.int16)


@pytest.fixture
def first_pass(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The first pass's (unpacked) latents, as each latent-upscaled hires run hands them over."""
    seen: list[torch.Tensor] = []
    original = hires.upscale_latents

    def recording(latents, upscaler, size):
        seen.append(latents.clone())
        return original(latents, upscaler, size)

    monkeypatch.setattr(hires, "upscale_latents", recording)
    return seen


@pytest.mark.parametrize(
    ("variant", "fix", "size"),
    [
        (DEV, HiresFix(scale=2.0), (128, 160)),
        # 96 x 120: floored to FLUX's 16-pixel step (SD's 8 would keep 120)
        (DEV, HiresFix(scale=1.5, upscaler="Lanczos"), (96, 112)),
        (SCHNELL, HiresFix(resize_x=100, upscaler="Latent (bicubic)"), (96, 112)),
        (SCHNELL, HiresFix(resize_x=128, resize_y=128, upscaler="Nearest"), (128, 128)),
    ],
    ids=["dev-latent-x2", "dev-lanczos-x1.5", "schnell-resize-x", "schnell-crop"],
)
def test_target_size_and_same_seed_same_image(engine, variant, fix, size) -> None:
    first = _run(engine, variant, hires=fix)
    assert first.images[0].image.size == size
    assert not [w for w in first.warnings if "hires" in w], first.warnings
    assert np.array_equal(_pixels(first), _pixels(_run(engine, variant, hires=fix)))
    other = _run(engine, variant, hires=fix, seed=12)
    assert np.abs(_pixels(first) - _pixels(other)).max() > 30


def _reference_second_pass(
    pipe, first: torch.Tensor, upscaler: str, size: tuple[int, int], seeds: list[int]
) -> list[np.ndarray]:
    """The hires pass done by hand with diffusers' FluxImg2ImgPipeline: the first pass's latents
    interpolated (A1111's "Latent") or decoded and resized with Lanczos, then 2 of 4 steps
    (strength 0.5), the noise from the same seeds."""
    width, height = size
    if upscaler == "Latent":
        image: Any = F.interpolate(first, size=(height // 8, width // 8), mode="bilinear")
    else:
        vae = pipe.vae
        scaled = first / vae.config.scaling_factor + vae.config.shift_factor
        with torch.no_grad():
            pixels = vae.decode(scaled).sample
        decoded = pipe.image_processor.postprocess(pixels, output_type="pil")
        image = [picture.resize(size, Image.Resampling.LANCZOS) for picture in decoded]
    reference = FluxImg2ImgPipeline(
        **{
            **pipe.components,
            "scheduler": FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config),
        }
    )
    reference.set_progress_bar_config(disable=True)
    with torch.no_grad():  # as the engine and the pipeline encode
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=[PROMPT] * len(seeds), prompt_2=None, device="cpu", max_sequence_length=512
        )
    out = reference(
        prompt_embeds=embeds.detach(),
        pooled_prompt_embeds=pooled.detach(),
        image=image,
        width=width,
        height=height,
        strength=0.5,
        num_inference_steps=4,
        guidance_scale=3.5,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
    )
    return [np.asarray(picture).astype(np.int16) for picture in out.images]


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_second_pass_is_diffusers_flux_img2img_on_the_upscaled_first_pass(
    engine, first_pass, monkeypatch: pytest.MonkeyPatch, upscaler: str
) -> None:
    if upscaler != "Latent":  # record the latents the image upscaler decodes instead
        import webui.engine.generate as generate

        original = generate.decode_latents

        def recording(pipe, latents):
            first_pass.append(latents.clone())
            return original(pipe, latents)

        monkeypatch.setattr(generate, "decode_latents", recording)
    fix = HiresFix(scale=2.0, steps=2, denoising_strength=0.5, upscaler=upscaler)
    seen: list[Progress] = []
    result = _run(engine, DEV, seen.append, hires=fix, batch_size=2, distilled_cfg_scale=3.5)
    assert [(p.step, p.total) for p in seen if p.stage is Stage.DENOISE] == [
        (n, 4) for n in range(1, 5)
    ]
    assert len(first_pass) == 1 and first_pass[0].shape == (2, 16, 10, 8)  # unpacked, 1/8 size
    eng, _ = engine
    want = _reference_second_pass(eng.model.pipe, first_pass[0], upscaler, (128, 160), [11, 12])
    for index, reference in enumerate(want):
        assert np.array_equal(_pixels(result, index), reference)


def test_progress_counts_both_passes_and_interrupt_stops(engine) -> None:
    seen: list[Progress] = []
    fix = HiresFix(steps=3)
    eng, _ = engine
    settings = eng.settings
    eng.settings = replace(settings, live_preview_every=1)
    try:
        _run(engine, SCHNELL, seen.append, hires=fix, batch_count=2)
    finally:
        eng.settings = settings
    steps = [(p.step, p.total) for p in seen if p.stage is Stage.DENOISE]
    assert steps == [(n, 10) for n in range(1, 11)]  # 2 first-pass + 3 hires steps, twice
    # each pass's live preview unpacks its own latents: 1/8 of the first, then the hires size
    sizes = [p.preview.size for p in seen if p.preview is not None]
    assert sizes == ([(8, 10)] * 2 + [(16, 20)] * 3) * 2

    stopped: list[int] = []

    def stop_in_the_hires_pass(progress: Progress) -> None:
        stopped.append(progress.step)
        if progress.step == 3:
            eng.interrupt()

    result = _run(engine, SCHNELL, stop_in_the_hires_pass, hires=fix, batch_count=2)
    assert result.interrupted and stopped == [1, 2, 3] and len(result.images) == 1
    assert result.images[0].image.size == (128, 160)

    def stop_after_the_first_pass(progress: Progress) -> None:
        if progress.step == 2:
            eng.interrupt()

    # the first pass's latents decoded (unpacked, unshifted) as FluxPipeline decodes them
    early = _run(engine, SCHNELL, stop_after_the_first_pass, hires=fix)
    assert early.interrupted and early.images[0].image.size == (64, 80)
    assert np.array_equal(_pixels(early), _pixels(_run(engine, SCHNELL)))


def test_infotext_has_a1111s_hires_fields(engine) -> None:
    fix = HiresFix(
        scale=2.0,
        steps=3,
        denoising_strength=0.55,
        upscaler="Latent (bicubic)",
        prompt="a grey wolf",
        sampler="DPM++ 2M",
        cfg_scale=1.0,
    )
    result = _run(engine, DEV, hires=fix, distilled_cfg_scale=4.5)
    # FLUX.1 runs flow-matching Euler in the hires pass too: said, and written as it ran
    assert any(w.startswith("hires fix: sampler 'DPM++ 2M'") for w in result.warnings)
    fields = a1111_fields(result.images[0].infotext.format())
    expected = {
        "Size-1": "64",
        "Size-2": "80",
        "Denoising strength": "0.55",
        "Hires upscale": "2",
        "Hires steps": "3",
        "Hires upscaler": "Latent (bicubic)",
        "Hires prompt": "a grey wolf",
        "Hires sampler": "Euler",
        "Hires CFG Scale": "1",
        "Distilled CFG Scale": "4.5",
    }
    assert {key: fields.get(key) for key in expected} == expected


def test_denoising_strength_zero_is_refused_as_for_sd(engine) -> None:
    with pytest.raises(RequestError, match="denoising_strength must be above 0"):
        _run(engine, DEV, hires=HiresFix(denoising_strength=0.0))


def test_hires_cfg_above_one_runs_true_cfg_with_the_hires_negative(engine, first_pass) -> None:
    off = _run(engine, SCHNELL, hires=HiresFix(negative_prompt="blurry"))
    on = _run(engine, SCHNELL, hires=HiresFix(negative_prompt="blurry", cfg_scale=3))
    other = _run(engine, SCHNELL, hires=HiresFix(negative_prompt="sharp", cfg_scale=3))
    assert all(torch.equal(first_pass[0], latents) for latents in first_pass)
    assert any("hires fix: the negative prompt is ignored" in w for w in off.warnings)
    assert not np.array_equal(_pixels(on), _pixels(off))
    assert not np.array_equal(_pixels(on), _pixels(other))  # the hires negative text matters


def test_a_lora_only_in_the_hires_prompt_changes_only_the_second_pass(engine, first_pass) -> None:
    eng, names = engine
    config = eng.load(names[DEV]).pipe.transformer.config
    _write_qkv_lora(
        eng.settings.loras_dir / "qkv.safetensors",
        config.attention_head_dim * config.num_attention_heads,
    )
    eng.catalog.refresh()
    plain = _run(engine, DEV, hires=HiresFix(prompt=PROMPT))
    tagged = _run(engine, DEV, hires=HiresFix(prompt=f"{PROMPT} <lora:qkv:1>"))
    assert not [w for w in tagged.warnings if "qkv" in w], tagged.warnings
    assert torch.equal(first_pass[0], first_pass[1])
    assert not np.array_equal(_pixels(plain), _pixels(tagged))
    assert tagged.images[0].infotext.params["Hires prompt"] == f"{PROMPT} <lora:qkv:1>"
    again = _run(engine, DEV, hires=HiresFix(prompt=PROMPT))  # and it came off
    assert np.array_equal(_pixels(again), _pixels(plain))


@pytest.mark.parametrize(
    ("rounding", "pipeline"),
    [
        (StrengthRounding.START_FLOORED, FluxImg2ImgPipeline),
        (StrengthRounding.STEPS_FLOORED, StableDiffusionImg2ImgPipeline),
    ],
)
def test_each_img2img_pipeline_runs_exactly_the_asked_steps(rounding, pipeline) -> None:
    """diffusers' own `get_timesteps` of each pipeline, on the schedule we ask for."""
    scheduler = FlowMatchEulerDiscreteScheduler()
    for steps in (1, 2, 3, 7, 20, 49, 150):
        for strength in (0.05, 0.3, 0.5, 0.6, 0.7, 0.75, 0.99, 1.0):
            schedule = second_pass_schedule(steps, strength, rounding)
            scheduler.set_timesteps(schedule.num_inference_steps)
            owner = SimpleNamespace(scheduler=scheduler)
            timesteps, run = pipeline.get_timesteps(
                owner, schedule.num_inference_steps, schedule.strength, "cpu"
            )
            assert run == len(timesteps) == steps, (steps, strength)
