"""SDXL base: CLIP-L (768) + OpenCLIP bigG (1280) text encoders, context 2048."""

from webui.arch import Arch
from webui.families.family import Family, patterns

FAMILY = Family(
    name="SDXL",
    arch=Arch.SDXL,
    modelspec=("stable-diffusion-xl-v1-base", "stable-diffusion-xl"),
    base_versions=(r"(sdxl|sd_xl|xl)(_|$)",),  # sd-scripts: "sdxl_base_v1-0"
    civitai=(
        "SDXL 1.0",
        "SDXL 0.9",
        "SDXL Turbo",
        "SDXL Lightning",
        "Pony",
        "Illustrious",
        "NoobAI",
    ),
    # te2 / OneTrainer clip_g, stacked transformer blocks, attention in up_blocks.0 or LDM
    # output_blocks 0-2, and the size/pooled-text embedding: SD1/SD2 UNets have none of these.
    keys=patterns(
        r"^(lora_te2_|text_encoder_2_)",
        r"transformer_blocks_[1-9]",
        r"up_blocks_0_attentions_",
        r"output_blocks_[0-2]_1_(norm|proj_in|proj_out|transformer_blocks)",
        r"(^|_)(add_embedding|label_emb)_",
    ),
    text_widths=frozenset({768, 1280}),
)
