"""Live previews while sampling: A1111's "Approx cheap" decoder, one fixed latent-to-RGB matrix
per model family applied to the current latents (no VAE run), shown every N steps.

Coefficients are published facts: SD1/SD2 and SDXL from A1111's `modules/sd_vae_approx.py`
(`cheap_approximation`), FLUX.1 (16 channels, with a bias) from ComfyUI's
`comfy/latent_formats.py` (`Flux.latent_rgb_factors`, `latent_rgb_factors_bias`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import torch
from PIL import Image

from webui.arch import Arch


@dataclass(frozen=True)
class LatentRgb:
    """RGB = sum over channels of latent * factors[channel] + bias."""

    factors: tuple[tuple[float, float, float], ...]  # one (R, G, B) row per latent channel
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)


_SD: Final = LatentRgb(
    (
        (0.298, 0.207, 0.208),
        (0.187, 0.286, 0.173),
        (-0.158, 0.189, 0.264),
        (-0.184, -0.271, -0.473),
    )
)

LATENT_RGB: Final[dict[Arch, LatentRgb]] = {
    Arch.SD1: _SD,
    Arch.SD2: _SD,
    Arch.SDXL: LatentRgb(
        (
            (0.3448, 0.4168, 0.4395),
            (-0.1953, -0.0290, 0.0250),
            (0.1074, 0.0886, -0.0163),
            (-0.3730, -0.2499, -0.2088),
        )
    ),
    Arch.FLUX1: LatentRgb(
        (
            (-0.0346, 0.0244, 0.0681),
            (0.0034, 0.0210, 0.0687),
            (0.0275, -0.0668, -0.0433),
            (-0.0174, 0.0160, 0.0617),
            (0.0859, 0.0721, 0.0329),
            (0.0004, 0.0383, 0.0115),
            (0.0405, 0.0861, 0.0915),
            (-0.0236, -0.0185, -0.0259),
            (-0.0245, 0.0250, 0.1180),
            (0.1008, 0.0755, -0.0421),
            (-0.0515, 0.0201, 0.0011),
            (0.0428, -0.0012, -0.0036),
            (0.0817, 0.0765, 0.0749),
            (-0.1264, -0.0522, -0.1103),
            (-0.0280, -0.0881, -0.0499),
            (-0.1262, -0.0982, -0.0778),
        ),
        (-0.0329, -0.0718, -0.0851),
    ),
}


def approximate(latent: torch.Tensor, arch: Arch) -> Image.Image:
    """One image's latent (channels, h, w) as an h x w RGB preview: the family's matrix, then
    A1111's mapping of [-1, 1] to 0..255 (clamped)."""
    table = LATENT_RGB[arch]
    factors = torch.tensor(table.factors, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", latent.detach().float().cpu(), factors)
    rgb = rgb + torch.tensor(table.bias, dtype=torch.float32)
    pixels = ((rgb + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0
    return Image.fromarray(pixels.numpy().astype(np.uint8))
