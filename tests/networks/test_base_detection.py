"""Base-model detection: metadata written by kohya/sd-scripts and modelspec, and key/shape
detection on LoRA files LyCORIS writes for tiny SD1, SD2 and SDXL pipelines."""

from __future__ import annotations

import os

# Set before diffusers/transformers import huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
from lora_files import ldm_names, register_preset, write_lycoris

from webui.arch import UNET_ARCHES, Arch
from webui.engine.model_factory import ModelSpec, build_pipeline
from webui.networks.format.base_detection import (
    SOURCE_BASE_VERSION,
    SOURCE_KEYS,
    SOURCE_MODELSPEC,
    SOURCE_NONE,
    SOURCE_V2_FLAG,
    detect_base,
    is_compatible,
)
from webui.networks.format.files import read_header

SD1_KEYS = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (
        4,
        768,
    ),
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320, 1, 1),
}
SD2_KEYS = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (
        4,
        1024,
    ),
}
SDXL_KEYS = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 2048),
}

METADATA_CASES = [
    ({"ss_base_model_version": "sd_v1"}, {}, Arch.SD1, SOURCE_BASE_VERSION),
    ({"ss_base_model_version": "sd_v2"}, {}, Arch.SD2, SOURCE_BASE_VERSION),
    ({"ss_base_model_version": "sd_2.1_768_v"}, {}, Arch.SD2, SOURCE_BASE_VERSION),
    ({"ss_base_model_version": "sdxl_base_v1-0"}, {}, Arch.SDXL, SOURCE_BASE_VERSION),
    # sd-scripts writes ss_v2="False" on SDXL files; the base version must win.
    (
        {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"},
        {},
        Arch.SDXL,
        SOURCE_BASE_VERSION,
    ),
    ({"modelspec.architecture": "stable-diffusion-v1/lora"}, {}, Arch.SD1, SOURCE_MODELSPEC),
    ({"modelspec.architecture": "stable-diffusion-v2-512/lora"}, {}, Arch.SD2, SOURCE_MODELSPEC),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, {}, Arch.SD2, SOURCE_MODELSPEC),
    (
        {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"},
        {},
        Arch.SDXL,
        SOURCE_MODELSPEC,
    ),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-refiner/lora"}, {}, None, SOURCE_MODELSPEC),
    ({"modelspec.architecture": "flux-1-dev/lora"}, {}, Arch.FLUX1, SOURCE_MODELSPEC),
    (
        {
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "ss_base_model_version": "sd_v1",
        },
        {},
        Arch.SDXL,
        SOURCE_MODELSPEC,
    ),
    ({"ss_v2": "True"}, {}, Arch.SD2, SOURCE_V2_FLAG),
    ({"ss_v2": "False"}, {}, Arch.SD1, SOURCE_V2_FLAG),
    # Old files carry only ss_v2 (there was no SDXL then); SDXL keys overrule a stray "False".
    ({"ss_v2": "False"}, SDXL_KEYS, Arch.SDXL, SOURCE_KEYS),
    ({"ss_base_model_version": "flux1"}, {}, Arch.FLUX1, SOURCE_BASE_VERSION),
    ({"ss_base_model_version": "something_new"}, SD1_KEYS, Arch.SD1, SOURCE_KEYS),
    ({}, {}, None, SOURCE_NONE),
    ({"ss_network_dim": "4"}, {"x.lora_down.weight": (4, 7)}, None, SOURCE_NONE),
]


@pytest.mark.parametrize(("metadata", "shapes", "arch", "source"), METADATA_CASES)
def test_metadata_cases(
    metadata: dict[str, str], shapes: dict[str, tuple[int, ...]], arch: Arch | None, source: str
) -> None:
    detection = detect_base(metadata, shapes)
    assert (detection.arch, detection.source) == (arch, source), detection.detail
    assert detection.detail


def test_metadata_disagreeing_with_keys_is_kept_and_noted() -> None:
    detection = detect_base({"ss_base_model_version": "sd_v1"}, SDXL_KEYS)
    assert detection.arch is Arch.SD1
    assert "keys disagree" in detection.detail


KEY_CASES = [
    (SD1_KEYS, Arch.SD1),
    (SD2_KEYS, Arch.SD2),
    (SDXL_KEYS, Arch.SDXL),
    ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768)}, Arch.SD1),
    ({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 1024)}, Arch.SD2),
    ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 1280)}, Arch.SDXL),
    ({"text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": (4, 1280)}, Arch.SDXL),
    (
        {
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.lora_A.weight": (
                4,
                1024,
            )
        },
        Arch.SD2,
    ),
    (
        {
            "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight": (
                4,
                768,
            )
        },
        Arch.SD1,
    ),
    ({"lora_unet_up_blocks_0_attentions_0_proj_in.hada_w1_b": (4, 1280)}, Arch.SDXL),
    (
        {"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.hada_w1_b": (2, 2048)},
        Arch.SDXL,
    ),
    ({"lora_unet_label_emb_0_0.lora_down.weight": (4, 2816)}, Arch.SDXL),
]


@pytest.mark.parametrize(("shapes", "arch"), KEY_CASES)
def test_key_and_shape_cases(shapes: dict[str, tuple[int, ...]], arch: Arch) -> None:
    detection = detect_base({}, shapes)
    assert (detection.arch, detection.source) == (arch, SOURCE_KEYS), detection.detail


@pytest.fixture
def lycoris_preset(monkeypatch: pytest.MonkeyPatch) -> str:
    """Kohya's targets for SD UNets and CLIP, for one test (LyCORIS' "full" preset also targets
    TimestepEmbedding, which duplicates time_embedding.linear_1 on SD UNets)."""
    return register_preset(
        monkeypatch,
        "webui-detect-test",
        unet_target_name=[
            "conv_in",
            "conv_out",
            "time_embedding.linear_1",
            "time_embedding.linear_2",
        ],
        text_encoder_target_module=["CLIPAttention", "CLIPMLP"],
        text_encoder_target_name=[],
    )


@pytest.mark.parametrize("arch", UNET_ARCHES, ids=lambda a: a.value)
def test_lycoris_files_detected_from_keys(lycoris_preset: str, tmp_path: Path, arch: Arch) -> None:
    pipeline = build_pipeline(ModelSpec(arch))
    path = tmp_path / "lora.safetensors"
    write_lycoris(
        pipeline,
        path,
        preset=lycoris_preset,
        algo="lora",
        alpha=4,
        std=None,
        metadata={"ss_network_dim": "4"},
    )
    shapes = read_header(path).shapes

    detection = detect_base(read_header(path).metadata, shapes)
    assert (detection.arch, detection.source, detection.family) == (arch, SOURCE_KEYS, arch.value)

    # The UNet alone, renamed to the original layout (as SDXL trainers write it), still tells.
    unet_keys = [key.partition(".") for key in shapes if key.startswith("lora_unet_")]
    renames = ldm_names(pipeline.unet, [prefix for prefix, _, _ in unet_keys])
    unet_only = {
        f"{renames[prefix]}.{suffix}": shapes[f"{prefix}.{suffix}"]
        for prefix, _, suffix in unet_keys
    }
    assert detect_base({}, unet_only).arch is arch


def test_is_compatible() -> None:
    assert is_compatible(Arch.SD1, Arch.SD1)
    assert is_compatible(Arch.SDXL, Arch.SDXL)
    assert not is_compatible(Arch.SD1, Arch.SDXL)
    assert not is_compatible(Arch.SD2, Arch.SD1)
    assert is_compatible(None, Arch.SD2)  # unknown: allowed, unmatched keys get reported
