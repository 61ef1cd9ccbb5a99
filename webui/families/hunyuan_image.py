"""HunyuanImage 2.1: double/single stream blocks in HunyuanVideo naming (`img_attn_qkv`,
`img_mlp.fc1`, `img_mod.linear`), width 3584. Names: sd-scripts hunyuan_image_train_network.py."""

from webui.families.family import Family, patterns, shared

FAMILY = Family(
    name="HunyuanImage",
    modelspec=("hunyuan-image",),  # sd-scripts ARCH_HUNYUAN_IMAGE_2_1 "hunyuan-image-2.1"
    base_versions=(r"hunyuan",),
    civitai=("Hunyuan 1", "HunyuanImage", "Hunyuan Video"),
    keys=patterns(
        r"_(img|txt)_mlp_fc[12]_",
        r"_(img|txt)_mod_linear_",
        r"single_blocks_\d+_modulation_linear_",
        r"(^|_)byt5_in_",
    ),
    widths=(shared(r"double_blocks_\d+_(img|txt)_attn_qkv_|single_blocks_\d+_linear1_", 3584),),
    text_widths=frozenset({3584}),
    arch=None,
)
