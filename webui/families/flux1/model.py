"""FLUX.1 checkpoints as data: config folders, the keys that give a file away, where each
component lives in an all-in-one file, and the separate parts users download."""

from __future__ import annotations

from dataclasses import dataclass

from webui.arch import FluxVariant

CONFIG_FOLDERS: dict[FluxVariant, str] = {
    FluxVariant.DEV: "flux1-dev",
    FluxVariant.SCHNELL: "flux1-schnell",
}
DEFAULT_SIZE = 1024

# ComfyUI's prefix for the transformer in checkpoints (`model.diffusion_model.`); diffusers-layout
# single files are also seen with `transformer.` or with no prefix at all.
TRANSFORMER_PREFIXES: tuple[str, ...] = ("model.diffusion_model.", "transformer.", "")
# One key that only each transformer layout has (relative to the prefix).
BFL_MARKER = "double_blocks.0.img_attn.qkv.weight"
DIFFUSERS_MARKER = "transformer_blocks.0.attn.add_q_proj.weight"
# [dev] has a guidance embedder, [schnell] has none (BFL and diffusers names).
GUIDANCE_MARKERS: tuple[str, ...] = (
    "guidance_in.in_layer.weight",
    "time_text_embed.guidance_embedder.linear_1.weight",
)


@dataclass(frozen=True)
class Part:
    """A pipeline component held in all-in-one files under `prefix`, or downloaded alone and put
    in `models/<folder>/`; `marker` is a key (without prefix) that only this part has."""

    component: str  # diffusers component name
    label: str  # as users know the download
    prefix: str  # in ComfyUI all-in-one checkpoints
    folder: str  # ComfyUI's models/ sub-folder for the separate file
    markers: tuple[str, ...]  # any one of them identifies the part


PARTS: tuple[Part, ...] = (
    Part(
        "text_encoder",
        "CLIP-L text encoder (clip_l.safetensors)",
        "text_encoders.clip_l.transformer.",
        "text_encoders",
        (
            "text_model.encoder.layers.0.self_attn.q_proj.weight",
            "encoder.layers.0.self_attn.q_proj.weight",
        ),
    ),
    Part(
        "text_encoder_2",
        "T5-XXL text encoder (t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors)",
        "text_encoders.t5xxl.transformer.",
        "text_encoders",
        ("encoder.block.0.layer.0.SelfAttention.q.weight",),
    ),
    Part(
        "vae",
        "FLUX.1 VAE (ae.safetensors)",
        "vae.",
        "vae",
        ("encoder.down.0.block.0.conv1.weight", "encoder.down_blocks.0.resnets.0.conv1.weight"),
    ),
)
PART_FOLDERS: frozenset[str] = frozenset(part.folder for part in PARTS)
# SAI model-spec `modelspec.architecture` (sd-scripts' sai_model_spec; a LoRA adds `/lora`).
MODELSPEC_ARCHITECTURES: dict[FluxVariant, str] = {
    FluxVariant.DEV: "flux-1-dev",
    FluxVariant.SCHNELL: "flux-1-schnell",
}
