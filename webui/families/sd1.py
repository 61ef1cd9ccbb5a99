"""Stable Diffusion 1.x: CLIP ViT-L text encoder (768), UNet cross-attention context 768."""

from webui.arch import Arch
from webui.families.family import Family

FAMILY = Family(
    name="SD1",
    arch=Arch.SD1,
    modelspec=("stable-diffusion-v1",),  # sd-scripts library/sai_model_spec.py ARCH_SD_V1
    base_versions=(r"(sd_?v?1|v1)([._]|$)",),  # sd-scripts train_util: "sd_v1"
    civitai=("SD 1.4", "SD 1.5", "SD 1.5 LCM", "SD 1.5 Hyper"),
    text_widths=frozenset({768}),
)
