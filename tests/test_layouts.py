"""Our diffusers -> single-file layouts, checked against diffusers' own single-file -> diffusers
converters: converting there and back must give every tensor back, bit for bit, under the same key.

Tiny models (real tensors) check values; full-size SD1/SD2/SDXL models built on the meta device
(shapes only, no memory) check the real key layouts."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from webui.arch import UNET_ARCHES, Arch
from webui.layouts.single_file import to_single_file
from webui.layouts.text_encoders import clip_to_ldm, open_clip_to_ldm
from webui.layouts.unet import unet_module_names

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
REAL_CONFIG_FOLDER = {Arch.SD1: "sd15", Arch.SD2: "sd21", Arch.SDXL: "sdxl"}
OPEN_CLIP_PREFIX = {
    "text_encoder": "cond_stage_model.model.",
    "text_encoder_2": "conditioner.embedders.1.model.",
}

_TINY_TEXT = {
    "vocab_size": 1000,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
}
# Hidden != projection width, so a missing transpose of `text_projection` cannot go unnoticed.
_TINY_TEXT_2 = _TINY_TEXT | {"hidden_size": 48, "intermediate_size": 96}
_TINY_VAE = {
    "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1,
    "norm_num_groups": 8,
}
# Each UNet puts upsamplers both right after a resnet and after an attention, and SDXL's uneven
# transformer depths check that up blocks take them in reverse.
_TINY_UNET = {
    Arch.SD1: {
        "block_out_channels": [32, 32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "attention_head_dim": 4,
        "cross_attention_dim": 32,
        "norm_num_groups": 16,
    },
    Arch.SD2: {
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 2,
        "attention_head_dim": [2, 4],
        "use_linear_projection": True,
        "cross_attention_dim": 32,
        "norm_num_groups": 16,
    },
    Arch.SDXL: {
        "block_out_channels": [32, 32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 1, 2],
        "attention_head_dim": [2, 4, 4],
        "use_linear_projection": True,
        "cross_attention_dim": 32 + 48,  # te1 and te2 hidden states, concatenated
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 8 * 6 + 32,  # 6 time ids + pooled te2
        "norm_num_groups": 16,
    },
}


@dataclass(frozen=True)
class Case:
    """One architecture at one size: diffusers models plus the configs our converter reads."""

    arch: Arch
    full_size: bool
    models: Mapping[str, torch.nn.Module] = field(repr=False)

    @property
    def components(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: model.state_dict() for name, model in self.models.items()}

    @property
    def configs(self) -> dict[str, Mapping[str, Any]]:
        return {
            name: dict(model.config)
            for name, model in self.models.items()
            if name in ("unet", "vae")
        }


def _text_model(config: Mapping[str, Any], with_projection: bool) -> torch.nn.Module:
    clean = CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(clean)


def _build(arch: Arch, full_size: bool) -> Case:
    def read(component: str) -> dict[str, Any]:
        path = CONFIGS_DIR / REAL_CONFIG_FOLDER[arch] / component / "config.json"
        return json.loads(path.read_text(encoding="utf-8"))

    tiny = {
        "unet": _TINY_UNET[arch],
        "vae": _TINY_VAE,
        "text_encoder": _TINY_TEXT,
        "text_encoder_2": _TINY_TEXT_2,
    }
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if arch is Arch.SDXL else [])
    configs = {name: read(name) | ({} if full_size else tiny[name]) for name in names}
    # Full-size models live on the meta device: real shapes, no memory, built in well under a second.
    with torch.device("meta" if full_size else "cpu"):
        torch.manual_seed(0)
        models: dict[str, torch.nn.Module] = {
            "unet": UNet2DConditionModel.from_config(configs["unet"]),
            "vae": AutoencoderKL.from_config(configs["vae"]),
            "text_encoder": _text_model(configs["text_encoder"], with_projection=False),
        }
        if arch is Arch.SDXL:
            models["text_encoder_2"] = _text_model(configs["text_encoder_2"], with_projection=True)
    # Random biases and norms, so a swapped tensor of the right shape is caught.
    if not full_size:
        with torch.no_grad():
            for model in models.values():
                for tensor in model.parameters():
                    tensor.normal_()
    return Case(arch, full_size, models)


_CASES = [(arch, full) for arch in UNET_ARCHES for full in (False, True)]
_IDS = [f"{arch.value}-{'full' if full else 'tiny'}" for arch, full in _CASES]


@pytest.fixture(scope="module", params=_CASES, ids=_IDS)
def case(request: pytest.FixtureRequest) -> Case:
    return _build(*request.param)


def _diffusers_clip(
    model: torch.nn.Module, converted: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    # What diffusers' loader does next: transformers >= 5.6 `CLIPTextModel` has no `text_model.` level.
    if hasattr(model, "text_model"):
        return converted
    return {k.removeprefix("text_model."): v for k, v in converted.items()}


def _reference(
    case: Case, checkpoint: dict[str, torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """The checkpoint read back into diffusers component state dicts by diffusers' converters."""
    models = case.models
    back = {
        "unet": convert_ldm_unet_checkpoint(checkpoint, models["unet"].config),
        "vae": convert_ldm_vae_checkpoint(checkpoint, models["vae"].config),
    }
    te = models["text_encoder"]
    if case.arch is Arch.SD2:
        back["text_encoder"] = _diffusers_clip(
            te, convert_open_clip_checkpoint(te, checkpoint, OPEN_CLIP_PREFIX["text_encoder"])
        )
    else:
        back["text_encoder"] = _diffusers_clip(te, convert_ldm_clip_checkpoint(checkpoint))
    if case.arch is Arch.SDXL:
        te2 = models["text_encoder_2"]
        back["text_encoder_2"] = _diffusers_clip(
            te2, convert_open_clip_checkpoint(te2, checkpoint, OPEN_CLIP_PREFIX["text_encoder_2"])
        )
    return back


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    same_kind = a.shape == b.shape and a.dtype == b.dtype
    return same_kind and (a.is_meta or torch.equal(a, b))


def _expected_key_count(name: str, arch: Arch, state_dict: Mapping[str, torch.Tensor]) -> int:
    is_open_clip = name == "text_encoder_2" or (name == "text_encoder" and arch is Arch.SD2)
    if not is_open_clip:
        return len(state_dict)
    # OpenCLIP keeps q, k and v in one tensor (weight and bias): 6 keys become 2 per layer.
    layers = sum(k.endswith("self_attn.q_proj.weight") for k in state_dict)
    return len(state_dict) - 4 * layers


def test_round_trip_through_diffusers_converters(case: Case) -> None:
    components = case.components
    checkpoint = to_single_file(components, case.configs, case.arch)
    assert len(checkpoint) == sum(
        _expected_key_count(n, case.arch, sd) for n, sd in components.items()
    )

    back = _reference(case, checkpoint)
    for name, original in components.items():
        assert sorted(back[name]) == sorted(original), f"{name}: keys differ"
        differing = [k for k, v in original.items() if not _same(v, back[name][k])]
        assert not differing, f"{name}: tensors differ at {differing[:5]}"


def test_unet_module_names_cover_every_parameter(case: Case) -> None:
    unet = case.models["unet"]
    owners = {
        name
        for name, module in unet.named_modules()
        if next(module.parameters(recurse=False), None) is not None
    }
    names = unet_module_names(unet.config)
    assert set(names) == owners
    assert len(set(names.values())) == len(names), "two diffusers modules share one LDM name"


@pytest.mark.parametrize(
    ("arch", "diffusers_name", "ldm_name"),
    [
        (Arch.SD1, "conv_in", "input_blocks.0.0"),
        (Arch.SD1, "time_embedding.linear_1", "time_embed.0"),
        (Arch.SD1, "down_blocks.0.attentions.0.proj_in", "input_blocks.1.1.proj_in"),
        (Arch.SD1, "down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
        (Arch.SD1, "down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
        (Arch.SD1, "down_blocks.2.downsamplers.0.conv", "input_blocks.9.0.op"),
        (
            Arch.SD1,
            "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
            "middle_block.1.transformer_blocks.0.attn1.to_q",
        ),
        (Arch.SD1, "mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
        (Arch.SD1, "up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
        (Arch.SD1, "up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
        (
            Arch.SD1,
            "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2",
            "output_blocks.11.1.transformer_blocks.0.ff.net.2",
        ),
        (Arch.SD1, "conv_norm_out", "out.0"),
        (Arch.SD2, "up_blocks.3.attentions.2.proj_out", "output_blocks.11.1.proj_out"),
        (Arch.SDXL, "add_embedding.linear_1", "label_emb.0.0"),
        (Arch.SDXL, "add_embedding.linear_2", "label_emb.0.2"),
        (Arch.SDXL, "down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
        (
            Arch.SDXL,
            "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k",
            "input_blocks.8.1.transformer_blocks.9.attn2.to_k",
        ),
        (
            Arch.SDXL,
            "mid_block.attentions.0.transformer_blocks.9.norm3",
            "middle_block.1.transformer_blocks.9.norm3",
        ),
        (Arch.SDXL, "up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
        (Arch.SDXL, "up_blocks.2.resnets.2.conv_shortcut", "output_blocks.8.0.skip_connection"),
    ],
)
def test_unet_module_names_match_real_files(arch: Arch, diffusers_name: str, ldm_name: str) -> None:
    config = json.loads(
        (CONFIGS_DIR / REAL_CONFIG_FOLDER[arch] / "unet" / "config.json").read_text()
    )
    assert unet_module_names(config)[diffusers_name] == ldm_name


def test_text_encoders_accept_keys_with_and_without_text_model_prefix() -> None:
    torch.manual_seed(0)
    state = _text_model(_TINY_TEXT, with_projection=False).state_dict()
    wrapped = {
        ("text_model." + k if not k.startswith("text_model.") else k): v for k, v in state.items()
    }
    assert clip_to_ldm(wrapped).keys() == clip_to_ldm(state).keys()
    assert all(k.startswith("transformer.text_model.") for k in clip_to_ldm(state))
    assert open_clip_to_ldm(wrapped).keys() == open_clip_to_ldm(state).keys()


def test_extra_tensors_fill_gaps_only() -> None:
    torch.manual_seed(0)
    state = _text_model(_TINY_TEXT, with_projection=False).state_dict()
    layer_24 = {"cond_stage_model.model.transformer.resblocks.23.ln_1.weight": torch.ones(32)}
    clash = {"cond_stage_model.model.ln_final.weight": torch.zeros(32)}
    checkpoint = to_single_file({"text_encoder": state}, {}, Arch.SD2, extra=layer_24 | clash)
    assert checkpoint.keys() >= layer_24.keys()
    assert torch.equal(
        checkpoint["cond_stage_model.model.ln_final.weight"], state["final_layer_norm.weight"]
    )


def test_rejects_components_the_architecture_lacks() -> None:
    with pytest.raises(ValueError, match="text_encoder_2"):
        to_single_file({"text_encoder_2": {}}, {}, Arch.SD1)
