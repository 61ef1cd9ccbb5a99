"""Model architectures the app knows. Shared by the engine and the LoRA code; imports nothing of ours."""

from __future__ import annotations

from enum import StrEnum


class Arch(StrEnum):
    """A model family this app runs. LoRAs are compatible within a family (SD2 covers SD2-v,
    FLUX.1 covers dev and schnell)."""

    SD1 = "SD1"
    SD2 = "SD2"
    SDXL = "SDXL"
    FLUX1 = "FLUX.1"

    @property
    def label(self) -> str:
        return self.value

    @property
    def has_unet(self) -> bool:
        """Whether the model is a Stable Diffusion UNet (SD1, SD2, SDXL); FLUX.1 is a transformer."""
        return self is not Arch.FLUX1


# The UNet families, for code and tests that only know Stable Diffusion's layouts.
UNET_ARCHES: tuple[Arch, ...] = tuple(arch for arch in Arch if arch.has_unet)


class FluxVariant(StrEnum):
    """Which FLUX.1 model: [dev] is guidance-distilled (it takes a guidance input, `guidance_in`),
    [schnell] is timestep-distilled (no guidance input, few steps)."""

    DEV = "dev"
    SCHNELL = "schnell"


class Prediction(StrEnum):
    """What the UNet predicts; SD2-768 models predict v, everything else epsilon."""

    EPSILON = "epsilon"
    V = "v_prediction"
