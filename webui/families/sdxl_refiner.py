"""SDXL refiner: its UNet differs from the base, so base LoRAs and refiner LoRAs never mix."""

from webui.families.family import Family

FAMILY = Family(
    name="SDXL Refiner",
    arch=None,
    modelspec=("stable-diffusion-xl-v1-refiner", "stable-diffusion-xl-refiner"),
    base_versions=(r"(sdxl|sd_xl|xl)_?refiner",),
    civitai=("SDXL 1.0 Refiner",),
)
