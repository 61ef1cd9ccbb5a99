"""Live previews: A1111's cheap latent-to-RGB approximation maps known latents to the RGB
computed here by hand from the published coefficients, and the engine reports a preview every
`live_preview_every` steps."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from engine_settings import cpu_settings

from webui.arch import Arch
from webui.engine.generate import Engine, GenerationRequest, Progress
from webui.engine.live_preview import approximate


def test_sd_latent_maps_to_hand_computed_rgb() -> None:
    latent = torch.tensor([1.0, -1.0, 0.5, 0.0]).reshape(4, 1, 1)
    # R = 0.298 - 0.187 - 0.5*0.158 = 0.032 -> (1.032 / 2) * 255 = 131.58
    # G = 0.207 - 0.286 + 0.5*0.189 = 0.0155 -> 129.48; B = 0.208 - 0.173 + 0.132 = 0.167 -> 148.79
    assert np.asarray(approximate(latent, Arch.SD1)).tolist() == [[[131, 129, 148]]]


def test_sdxl_has_its_own_matrix() -> None:
    latent = torch.tensor([0.0, 1.0, 0.0, 0.0]).reshape(4, 1, 1)
    # (-0.1953, -0.0290, 0.0250) -> (1 + v) / 2 * 255 = 102.60, 123.80, 130.69
    assert np.asarray(approximate(latent, Arch.SDXL)).tolist() == [[[102, 123, 130]]]


def test_flux_adds_its_bias_and_values_clamp() -> None:
    zero = torch.zeros(16, 1, 2)
    zero[3, 0, 1] = -100.0  # row 3 (-0.0174, 0.0160, 0.0617) x -100: R high, G and B low
    pixels = np.asarray(approximate(zero, Arch.FLUX1)).tolist()
    # bias alone: (-0.0329, -0.0718, -0.0851) -> 123.3, 118.3, 116.6
    assert pixels[0][0] == [123, 118, 116]
    # R: 1.74 - 0.0329 = 1.7071 -> clamped to 255; G: -1.6 - 0.0718 -> 0; B: -6.17... -> 0
    assert pixels[0][1] == [255, 0, 0]


def test_engine_reports_a_preview_every_n_steps(tmp_path: Path, tiny_checkpoint_factory) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_checkpoint_factory(Arch.SD1), models / "tiny.safetensors")
    settings = cpu_settings(models, tmp_path / "loras", tmp_path, save_outputs=False)
    engine = Engine(settings)
    engine.load("tiny")
    engine.settings = replace(engine.settings, live_preview_every=2)
    seen: list[Progress] = []
    engine.generate(GenerationRequest("a cat", steps=5, width=64, height=64), seen.append)
    with_preview = [p.step for p in seen if p.preview is not None]
    assert with_preview == [2, 4]
    assert seen[1].preview.size == (8, 8)  # one pixel per latent cell
    engine.settings = replace(engine.settings, live_preview_every=0)
    seen.clear()
    engine.generate(GenerationRequest("a cat", steps=2, width=64, height=64), seen.append)
    assert all(p.preview is None for p in seen)
