"""Qwen-Image: 60-block MMDiT (width 3072), Qwen2.5-VL text encoder (3584). Names: diffusers
QwenImageTransformer2DModel, musubi-tuner."""

from webui.families.family import Family, patterns

FAMILY = Family(
    name="Qwen-Image",
    modelspec=("qwen-image",),
    base_versions=(r"qwen_?image",),
    civitai=("Qwen",),
    keys=patterns(
        r"_(img|txt)_mlp_net_[02]",
        r"_(img|txt)_mod_1_",
        r"(^|_)transformer_blocks_(3[89]|[45]\d)_attn_",
    ),
    text_widths=frozenset({3584}),
    arch=None,
)
