"""Stable Diffusion 2.x: OpenCLIP ViT-H text encoder (1024), context 1024 (512 and 768-v)."""

from webui.arch import Arch
from webui.families.family import Family

FAMILY = Family(
    name="SD2",
    arch=Arch.SD2,
    modelspec=("stable-diffusion-v2",),  # ARCH_SD_V2_512, ARCH_SD_V2_768_V
    base_versions=(r"(sd_?v?2|v2)([._]|$)",),  # "sd_v2", "sd_2.1"
    civitai=("SD 2.0", "SD 2.0 768", "SD 2.1", "SD 2.1 768", "SD 2.1 Unclip"),
    text_widths=frozenset({1024}),
)
