"""Model architectures the app knows. Shared by the engine and the LoRA code; imports nothing of ours."""

from __future__ import annotations

from enum import StrEnum


class Arch(StrEnum):
    """A Stable Diffusion family. LoRAs are compatible within a family (SD2 covers SD2-v)."""

    SD1 = "SD1"
    SD2 = "SD2"
    SDXL = "SDXL"

    @property
    def label(self) -> str:
        return self.value


class Prediction(StrEnum):
    """What the UNet predicts; SD2-768 models predict v, everything else epsilon."""

    EPSILON = "epsilon"
    V = "v_prediction"
