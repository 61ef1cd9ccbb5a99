"""FLUX.1 generation through the Engine (dev and schnell files as users have them): sizes,
seeds, distilled CFG ([dev] only), true CFG above 1, the flow-matching schedule with its shift,
Forge's infotext fields round-tripping through the PNG Info parser, progress, interrupt, batches,
and LoRA tags warned about, never applied."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from engine_settings import cpu_settings
from flux_models import write_flux_models
from safetensors.torch import save_file

from webui.arch import FluxVariant
from webui.engine.generate import Engine, GenerationRequest, RequestError
from webui.engine.infotext import parse_infotext

DEV, SCHNELL = FluxVariant.DEV, FluxVariant.SCHNELL
SMALL = {"steps": 2, "width": 64, "height": 64, "seed": 11, "cfg_scale": 1.0}


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> tuple[Engine, dict[FluxVariant, str]]:
    root = tmp_path_factory.mktemp("flux-gen")
    models, loras = root / "models", root / "loras"
    models.mkdir()
    settings = cpu_settings(models, loras, root, save_outputs=False)
    return Engine(settings), write_flux_models(models)


def _run(engine, variant, **fields):
    eng, names = engine
    eng.load(names[variant])
    return eng.generate(GenerationRequest("a red fox", **{**SMALL, **fields}))


def _pixels(result, index: int = 0) -> np.ndarray:
    return np.asarray(result.images[index].image).astype(np.int16)


@pytest.mark.parametrize("variant", list(FluxVariant), ids=str)
def test_right_size_and_same_seed_same_image(engine, variant) -> None:
    first = _run(engine, variant, width=96, height=64)
    again = _run(engine, variant, width=96, height=64)
    assert first.images[0].image.size == (96, 64)
    assert np.array_equal(_pixels(first), _pixels(again))
    assert not np.array_equal(_pixels(first), _pixels(_run(engine, variant, seed=12)))


def test_dev_distilled_cfg_changes_the_image_and_is_written(engine) -> None:
    low, high = _run(engine, DEV, distilled_cfg_scale=1.5), _run(engine, DEV, distilled_cfg_scale=6)
    assert not np.array_equal(_pixels(low), _pixels(high))
    params = parse_infotext(high.images[0].infotext.format()).params
    assert params["Distilled CFG Scale"] == "6"
    assert params["Sampler"] == "Euler" and params["CFG scale"] == "1"


def test_schnell_ignores_distilled_cfg(engine) -> None:
    low, high = (
        _run(engine, SCHNELL, distilled_cfg_scale=1.5),
        _run(engine, SCHNELL, distilled_cfg_scale=6),
    )
    assert np.array_equal(_pixels(low), _pixels(high))
    assert "Distilled CFG Scale" not in high.images[0].infotext.params


@pytest.mark.parametrize("variant", list(FluxVariant), ids=str)
def test_true_cfg_above_one_uses_the_negative_prompt(engine, variant) -> None:
    off = _run(engine, variant, negative_prompt="blurry")
    assert any("negative prompt is ignored" in w for w in off.warnings)
    assert np.array_equal(_pixels(off), _pixels(_run(engine, variant)))  # cfg 1: unused
    on = _run(engine, variant, negative_prompt="blurry", cfg_scale=3)
    other = _run(engine, variant, negative_prompt="sharp", cfg_scale=3)
    assert not np.array_equal(_pixels(on), _pixels(off))
    assert not np.array_equal(_pixels(on), _pixels(other))  # the negative text matters


def test_infotext_round_trips_with_model_and_modules(engine) -> None:
    result = _run(engine, SCHNELL, negative_prompt="ugly", cfg_scale=2)
    text = result.images[0].infotext.format()
    parsed = parse_infotext(text)
    assert parsed == result.images[0].infotext
    assert parsed.negative_prompt == "ugly"
    params = parsed.params
    assert params["Model"] == "flux1-schnell" and params["Steps"] == "2"
    # Forge's names for the separate files: their stems, VAE first
    assert [params[f"Module {i}"] for i in (1, 2, 3)] == ["ae", "clip_l", "t5xxl_fp16"]
    dev = _run(engine, DEV).images[0].infotext.params
    assert not any(key.startswith("Module") for key in dev)  # all-in-one: no separate parts


def _sigmas(engine, variant, width: int, steps: int = 3) -> list[float]:
    eng, names = engine
    eng.load(names[variant])
    seen: list[float] = []

    def on_progress(_progress) -> None:
        seen.append(float(eng.model.pipe.scheduler.sigmas[eng.model.pipe.scheduler.step_index]))

    eng.generate(
        GenerationRequest("a fox", **{**SMALL, "steps": steps, "width": width}), on_progress
    )
    return seen


def test_schedule_shift_static_for_schnell_dynamic_for_dev(engine) -> None:
    # schnell: shift 1, sigmas 1, 2/3, 1/3 (the next sigma after each step)
    assert _sigmas(engine, SCHNELL, 64) == pytest.approx([2 / 3, 1 / 3, 0.0], abs=1e-6)
    # dev: mu from the packed latent's token count, BFL's time_shift(mu, 1, t)
    for width in (64, 128):
        tokens = (64 // 16) * (width // 16)
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)
        want = [math.exp(mu) / (math.exp(mu) + (1 / t - 1)) for t in (2 / 3, 1 / 3)] + [0.0]
        assert _sigmas(engine, DEV, width) == pytest.approx(want, abs=1e-5)


def test_progress_each_step_and_batches(engine) -> None:
    eng, names = engine
    eng.load(names[SCHNELL])
    steps: list[tuple[int, int]] = []
    request = GenerationRequest("a fox", **{**SMALL, "batch_size": 2, "batch_count": 2})
    result = eng.generate(request, lambda p: steps.append((p.step, p.total)))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [image.seed for image in result.images] == [11, 12, 13, 14]
    # each image's noise comes from its own CPU generator: as rendered alone (batched matmuls
    # round differently: a level or two of 255, where another seed differs by far more)
    alone = _run(engine, SCHNELL, seed=12)
    assert np.abs(_pixels(result, 1) - _pixels(alone)).max() <= 3
    assert np.abs(_pixels(result, 0) - _pixels(alone)).max() > 30
    assert not result.warnings  # the default sampler is the family's own


def test_interrupt_stops_the_run(engine) -> None:
    eng, names = engine
    eng.load(names[DEV])
    seen: list[int] = []

    def stop_at_first(progress) -> None:
        seen.append(progress.step)
        eng.interrupt()

    request = GenerationRequest("a fox", **{**SMALL, "steps": 5, "batch_count": 3})
    result = eng.generate(request, stop_at_first)
    assert result.interrupted and seen == [1] and len(result.images) == 1


def test_bad_size_sampler_and_lora_tags(engine) -> None:
    with pytest.raises(RequestError, match=r"width must be a multiple of 16 for FLUX\.1"):
        _run(engine, DEV, width=72)
    result = _run(engine, DEV, sampler="DPM++ 2M")
    assert any("'DPM++ 2M' is not available for FLUX.1; used Euler" in w for w in result.warnings)
    assert result.images[0].infotext.params["Sampler"] == "Euler"
    eng, _ = engine
    tagged = eng.generate(GenerationRequest("a fox <lora:ink:0.8> <lora:pen:1>", **SMALL))
    lora_warnings = [w for w in tagged.warnings if "LoRA" in w]
    assert len(lora_warnings) == 2 and "no LoRA file named 'ink'" in lora_warnings[0]
    plain = eng.generate(GenerationRequest("a fox", **SMALL))
    assert np.array_equal(_pixels(tagged), _pixels(plain))  # the model ran untouched


def test_flux_lora_changes_the_image_and_comes_off(engine) -> None:
    """Issue 18: a kohya FLUX.1 LoRA (fused BFL qkv) is applied, and taken off exactly."""
    eng, names = engine
    config = eng.load(names[DEV]).pipe.transformer.config
    hidden = config.attention_head_dim * config.num_attention_heads
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    g = torch.Generator().manual_seed(1)
    eng.settings.loras_dir.mkdir(exist_ok=True)
    save_file(
        {
            f"{key}.lora_up.weight": torch.randn(3 * hidden, 4, generator=g),
            f"{key}.lora_down.weight": torch.randn(4, hidden, generator=g),
        },
        eng.settings.loras_dir / "qkv.safetensors",
        metadata={"ss_base_model_version": "flux1"},
    )
    eng.catalog.refresh()
    plain = eng.generate(GenerationRequest("a fox", **SMALL))
    tagged = eng.generate(GenerationRequest("a fox <lora:qkv:1>", **SMALL))
    assert not [w for w in tagged.warnings if "qkv" in w], tagged.warnings
    assert not np.array_equal(_pixels(tagged), _pixels(plain))
    again = eng.generate(GenerationRequest("a fox", **SMALL))
    assert np.array_equal(_pixels(again), _pixels(plain))
