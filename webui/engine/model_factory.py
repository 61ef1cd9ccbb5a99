"""Build Stable Diffusion and FLUX.1 pipelines from config alone: the tiny demo/test models and full-size
random-weight models for benchmarks. Nothing here reads weights or touches a model hub."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from webui.arch import Arch, FluxVariant, Prediction
from webui.families.flux1 import model as flux1_model

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"

CONFIG_FOLDER = {Arch.SD1: "sd15", Arch.SD2: "sd21", Arch.SDXL: "sdxl"}


class ModelSize(StrEnum):
    TINY = "tiny"  # a few MB: tests and the demo model
    FULL = "full"  # the real architecture, random weights: benchmarks


@dataclass(frozen=True)
class ModelSpec:
    """What to build: an architecture, its prediction type (SD) or variant (FLUX.1) and a size."""

    arch: Arch
    prediction: Prediction = Prediction.EPSILON
    size: ModelSize = ModelSize.TINY
    variant: FluxVariant = FluxVariant.DEV  # FLUX.1 only


def config_folder(arch: Arch, variant: FluxVariant = FluxVariant.DEV) -> Path:
    """The offline diffusers config folder shipped in `configs/` for an architecture (and, for
    FLUX.1, its variant)."""
    if arch is Arch.FLUX1:
        return CONFIGS_DIR / flux1_model.CONFIG_FOLDERS[variant]
    return CONFIGS_DIR / CONFIG_FOLDER[arch]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


# Tiny variants keep every structural feature of the real ones (cross-attention in down, mid and
# up blocks, two resnets per level, linear projections for SD2/SDXL, SDXL's added time embedding,
# distinct widths for SDXL's two text encoders) so key layouts and LoRA mapping are exercised.
_TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "projection_dim": 32,
}
_TINY_TEXT_2 = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "projection_dim": 32,
}
_TINY_VAE = {
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}
_TINY_UNET = {
    Arch.SD1: {
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 2,
        "attention_head_dim": 4,
        "cross_attention_dim": 32,
        "norm_num_groups": 16,
        "sample_size": 64,
    },
    Arch.SD2: {
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 2,
        "attention_head_dim": [2, 4],
        "cross_attention_dim": 32,
        "norm_num_groups": 16,
        "sample_size": 64,
    },
    Arch.SDXL: {
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 2],
        "attention_head_dim": [2, 4],
        "cross_attention_dim": 96,  # te1 (32) + te2 (64) hidden states, concatenated
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 8 * 6 + 32,  # 6 time ids + pooled te2
        "norm_num_groups": 16,
        "sample_size": 64,
    },
}


# Tiny FLUX.1: two double and two single blocks, 2 heads x 16 (rope axes 4+6+6 = 16), a T5 and a
# CLIP of width 32 (joint_attention_dim and pooled_projection_dim follow them), a 16-channel VAE
# with four levels (scale factor 8, as the real one). Vocabularies stay real: the tokenizers are.
_TINY_FLUX_TRANSFORMER = {
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "axes_dims_rope": [4, 6, 6],
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
}
_TINY_T5 = {
    "d_model": 32,
    "d_ff": 64,
    "d_kv": 16,
    "num_heads": 2,
    "num_layers": 2,
    "num_decoder_layers": 2,
}
_TINY_FLUX_VAE = {**_TINY_VAE, "latent_channels": 16}
FLUX_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


def _flux_component_configs(spec: ModelSpec) -> dict[str, dict[str, Any]]:
    folder = config_folder(spec.arch, spec.variant)
    configs = {name: _read_json(folder / name / "config.json") for name in FLUX_COMPONENTS}
    configs["scheduler"] = _read_json(folder / "scheduler" / "scheduler_config.json")
    if spec.size is ModelSize.TINY:
        configs["transformer"].update(copy.deepcopy(_TINY_FLUX_TRANSFORMER))
        configs["vae"].update(copy.deepcopy(_TINY_FLUX_VAE))
        configs["text_encoder"].update(_TINY_TEXT)
        configs["text_encoder_2"].update(_TINY_T5)
    return configs


def component_configs(spec: ModelSpec) -> dict[str, dict[str, Any]]:
    """Diffusers/transformers configs per component ("unet", "vae", "text_encoder", ...),
    read from `configs/` and shrunk for tiny models."""
    if spec.arch is Arch.FLUX1:
        return _flux_component_configs(spec)
    folder = config_folder(spec.arch)
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if spec.arch is Arch.SDXL else [])
    configs = {name: _read_json(folder / name / "config.json") for name in names}
    configs["scheduler"] = _read_json(folder / "scheduler" / "scheduler_config.json")
    configs["scheduler"]["prediction_type"] = spec.prediction.value
    if spec.size is ModelSize.TINY:
        configs["unet"].update(copy.deepcopy(_TINY_UNET[spec.arch]))
        configs["vae"].update(_TINY_VAE)
        configs["text_encoder"].update(_TINY_TEXT)
        if spec.arch is Arch.SDXL:
            configs["text_encoder_2"].update(_TINY_TEXT_2)
    return configs


def t5_encoder(config: dict[str, Any]) -> T5EncoderModel:
    """A T5 encoder built from a config dict (random weights)."""
    return T5EncoderModel(T5Config(**{k: v for k, v in config.items() if not k.startswith("_")}))


def _text_encoder(config: dict[str, Any], with_projection: bool) -> torch.nn.Module:
    text_config = CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(text_config)


def _realistic_norms(text_encoder: torch.nn.Module) -> None:
    # Fresh LayerNorms have zero bias, so the mean of a random encoder's output is ~1e-9 and
    # A1111's emphasis (which rescales to the original mean) would divide by ~0; trained CLIP
    # models have non-zero biases.
    with torch.no_grad():
        for module in text_encoder.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.bias.normal_(0.0, 0.5)


@contextmanager
def _created_in(dtype: torch.dtype | None) -> Iterator[None]:
    # parameters created directly in `dtype`: no fp32 copy of a 2.6B-parameter UNet first
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_pipeline(
    spec: ModelSpec,
    seed: int = 0,
    *,
    with_vae: bool = True,
    with_text_encoders: bool = True,
    dtype: torch.dtype | None = None,
) -> DiffusionPipeline:
    """A pipeline with random weights (seeded, so the same spec and seed give the same model).
    Benchmarks that never decode or encode leave out the VAE or the text encoders (None)."""
    if spec.arch is Arch.FLUX1:
        return _build_flux(spec, seed, with_vae, with_text_encoders, dtype)
    configs = component_configs(spec)
    folder = config_folder(spec.arch)
    torch.manual_seed(seed)
    text_encoder = text_encoder_2 = None
    with _created_in(dtype):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"]) if with_vae else None
        if with_text_encoders:
            text_encoder = _text_encoder(configs["text_encoder"], with_projection=False)
            _realistic_norms(text_encoder)
            if spec.arch is Arch.SDXL:
                text_encoder_2 = _text_encoder(configs["text_encoder_2"], with_projection=True)
                _realistic_norms(text_encoder_2)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    scheduler = DDIMScheduler.from_config(configs["scheduler"])
    if spec.arch is Arch.SDXL:
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
            unet=unet,
            scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def flux_pipeline(folder: Path, **components: Any) -> FluxPipeline:
    """A FluxPipeline from built components, with the scheduler and tokenizers of a config folder
    (`configs/flux1-*` or a copy of it)."""
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=T5TokenizerFast.from_pretrained(folder / "tokenizer_2"),
        **components,
    )


def _build_flux(
    spec: ModelSpec,
    seed: int,
    with_vae: bool,
    with_text_encoders: bool,
    dtype: torch.dtype | None,
) -> FluxPipeline:
    configs = component_configs(spec)
    torch.manual_seed(seed)
    text_encoder = text_encoder_2 = None
    with _created_in(dtype):
        transformer = FluxTransformer2DModel.from_config(configs["transformer"])
        vae = AutoencoderKL.from_config(configs["vae"]) if with_vae else None
        if with_text_encoders:
            text_encoder = _text_encoder(configs["text_encoder"], with_projection=False)
            _realistic_norms(text_encoder)
            text_encoder_2 = t5_encoder(configs["text_encoder_2"])
    return flux_pipeline(
        config_folder(spec.arch, spec.variant),
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
    )
