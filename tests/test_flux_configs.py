"""The offline FLUX.1 config folders match the published models, and the tiny FLUX.1 runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from webui.arch import Arch, FluxVariant
from webui.engine.model_factory import ModelSpec, build_pipeline, config_folder

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
VARIANTS = list(FluxVariant)


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _meta_count(module_cls, config) -> int:
    with torch.device("meta"):
        model = (
            module_cls(config) if module_cls is T5EncoderModel else module_cls.from_config(config)
        )
    return sum(p.numel() for p in model.parameters())


# Published parameter counts: the BFL transformers (12B, from the hub's safetensors index totals)
@pytest.mark.parametrize(
    ("variant", "expected"),
    [(FluxVariant.DEV, 11_901_408_320), (FluxVariant.SCHNELL, 11_891_178_560)],
)
def test_full_transformer_has_the_published_parameter_count(
    variant: FluxVariant, expected: int
) -> None:
    config = _json(config_folder(Arch.FLUX1, variant) / "transformer" / "config.json")
    assert _meta_count(FluxTransformer2DModel, config) == expected


def test_guidance_embedder_only_in_dev() -> None:
    dev = _json(CONFIGS / "flux1-dev" / "transformer" / "config.json")
    schnell = _json(CONFIGS / "flux1-schnell" / "transformer" / "config.json")
    assert dev.pop("guidance_embeds") is True
    assert schnell.pop("guidance_embeds") is False
    assert dev == schnell


def test_t5_xxl_encoder_size() -> None:
    # T5 v1.1 XXL encoder: 4,762,310,656 parameters (the t5xxl_fp16 download's tensor total)
    config = _json(CONFIGS / "flux1-dev" / "text_encoder_2" / "config.json")
    t5 = T5Config(**config)
    assert (t5.d_model, t5.d_ff, t5.num_layers, t5.num_heads, t5.d_kv) == (4096, 10240, 24, 64, 64)
    assert t5.is_gated_act and t5.dense_act_fn == "gelu_new"
    assert _meta_count(T5EncoderModel, t5) == 4_762_310_656


def test_vae_is_the_16_channel_flux_ae() -> None:
    config = _json(CONFIGS / "flux1-dev" / "vae" / "config.json")
    assert (config["scaling_factor"], config["shift_factor"]) == (0.3611, 0.1159)
    # BFL's ae.safetensors: 83,819,683 parameters, no quant convs
    assert _meta_count(AutoencoderKL, config) == 83_819_683


@pytest.mark.parametrize(
    ("variant", "shift", "dynamic"),
    [(FluxVariant.DEV, 3.0, True), (FluxVariant.SCHNELL, 1.0, False)],
)
def test_scheduler(variant: FluxVariant, shift: float, dynamic: bool) -> None:
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        config_folder(Arch.FLUX1, variant) / "scheduler"
    )
    assert scheduler.config.shift == shift
    assert scheduler.config.use_dynamic_shifting is dynamic


@pytest.mark.parametrize("variant", VARIANTS)
def test_tokenizers_offline(variant: FluxVariant) -> None:
    folder = config_folder(Arch.FLUX1, variant)
    t5 = T5TokenizerFast.from_pretrained(folder / "tokenizer_2")
    assert t5.model_max_length == 512
    # google/t5-v1_1 token ids, as published in the T5 docs and model cards
    assert t5("Hello world").input_ids == [8774, 296, 1]
    assert t5.pad_token_id == 0
    clip = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert clip("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_flux_pipeline_runs(variant: FluxVariant) -> None:
    pipe = build_pipeline(ModelSpec(Arch.FLUX1, variant=variant))
    assert pipe.transformer.config.guidance_embeds is (variant is FluxVariant.DEV)
    size = sum(p.numel() for p in pipe.components["transformer"].parameters())
    assert size < 1_000_000
    image = pipe(
        "a cat",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert image.shape == (64, 64, 3)
