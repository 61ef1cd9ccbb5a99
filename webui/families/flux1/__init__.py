"""FLUX.1: BFL's 12B rectified-flow transformer (19 double + 38 single blocks, width 3072),
CLIP-L + T5-XXL text encoders. Names: BFL flux/model.py, diffusers FluxTransformer2DModel, sd-scripts
networks/lora_flux.py. The model side (configs, checkpoint keys, parts) is in `model.py`."""

from webui.arch import Arch
from webui.families.family import Family, patterns, shared

FAMILY = Family(
    name="FLUX.1",
    modelspec=("flux-1",),  # sd-scripts sai_model_spec: flux-1-dev, flux-1-schnell, flux-1
    base_versions=(r"flux_?1", r"flux($|_dev|_schnell|_krea|_kontext)"),
    civitai=("Flux.1 D", "Flux.1 S", "Flux.1 Krea", "Flux.1 Kontext"),
    keys=patterns(
        r"_(img|txt)_mod_lin_",
        r"single_blocks_\d+_modulation_lin_",
        r"single_transformer_blocks_\d+_norm_linear_",
        r"double_blocks_\d+_processor_(qkv|proj)_lora[12]_",  # XLabs' trainer
    ),
    widths=(
        shared(
            r"double_blocks_\d+_(img|txt)_(attn_qkv|mlp_0)_|single_blocks_\d+_linear1_"
            r"|single_transformer_blocks_\d+_(attn_to_[qkv]|proj_mlp)_"
            r"|(^|_)transformer_blocks_\d+_attn_(to_[qkv]|add_[qkv]_proj)_",
            3072,
        ),
    ),
    text_widths=frozenset({768, 4096}),
    arch=Arch.FLUX1,
)
