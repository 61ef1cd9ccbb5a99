"""Stable Diffusion 3 / 3.5: MMDiT joint blocks (width 1536 medium, 2432 large), CLIP-L, CLIP-G
and T5. Names: SAI sd3 mmditx.py, diffusers SD3Transformer2DModel, sd-scripts lora_sd3.py."""

from webui.families.family import Family, patterns, shared

FAMILY = Family(
    name="SD3",
    modelspec=("stable-diffusion-3",),  # sd-scripts: "stable-diffusion-3" + "-m", "-5-large"
    base_versions=(r"sd_?3", r"stable_diffusion_3"),
    civitai=("SD 3", "SD 3.5", "SD 3.5 Medium", "SD 3.5 Large", "SD 3.5 Large Turbo"),
    keys=patterns(r"joint_blocks_\d+_(x|context)_block_"),
    widths=(shared(r"(^|_)transformer_blocks_\d+_attn_(to_[qkv]|add_[qkv]_proj)_", 1536, 2432),),
    text_widths=frozenset({768, 1280, 4096}),
    arch=None,
)
