"""Stable Diffusion's generation recipe (SD1, SD2, SDXL): A1111's samplers, A1111-style prompt
encoding with textual inversions, classifier-free guidance with the negative prompt."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from webui.arch import Arch
from webui.engine.hires import LATENT_FACTOR, StrengthRounding
from webui.engine.prompt_encoding import encode_for_pipeline
from webui.engine.recipe import GenerationDefaults
from webui.engine.request import GenerationRequest
from webui.engine.samplers import DEFAULT_SAMPLER, get_sampler
from webui.networks.library import Embedding

SD_DEFAULTS = GenerationDefaults(steps=20, cfg_scale=7.0, sampler=DEFAULT_SAMPLER)


@dataclass(frozen=True)
class StableDiffusionRecipe:
    arch: Arch

    @property
    def defaults(self) -> GenerationDefaults:
        return SD_DEFAULTS

    @property
    def applies_loras(self) -> bool:
        return True

    @property
    def uses_embeddings(self) -> bool:
        return True

    @property
    def runs_hires(self) -> bool:
        return True

    @property
    def size_multiple(self) -> int:
        return LATENT_FACTOR

    @property
    def img2img_rounding(self) -> StrengthRounding:
        return StrengthRounding.STEPS_FLOORED

    def unpack_latents(
        self, pipe: Any, latents: torch.Tensor, width: int, height: int
    ) -> torch.Tensor:
        return latents

    def img2img_size(self, width: int, height: int) -> dict[str, int]:
        return {}  # SD's img2img pipelines render at the input latents' size

    def noise_shape(self, pipe: Any, request: GenerationRequest) -> tuple[int, int, int]:
        factor = pipe.vae_scale_factor
        channels = pipe.unet.config.in_channels
        return (channels, request.height // factor, request.width // factor)

    def pack_noise(self, pipe: Any, noise: Any) -> Any:
        return noise

    def resolve(self, request: GenerationRequest, warnings: list[str]) -> GenerationRequest:
        return replace(request, sampler=get_sampler(request.sampler or DEFAULT_SAMPLER).name)

    def scheduler(self, config: Mapping[str, Any], request: GenerationRequest) -> SchedulerMixin:
        return get_sampler(request.sampler).create(config)

    def conditioning(
        self, pipe: Any, request: GenerationRequest, embeddings: Sequence[Embedding]
    ) -> dict[str, Any]:
        return encode_for_pipeline(
            pipe,
            self.arch,
            [request.prompt] * request.batch_size,
            [request.negative_prompt] * request.batch_size,
            request.clip_skip,
            embeddings=embeddings,
        )

    def guidance(self, request: GenerationRequest) -> dict[str, Any]:
        return {"guidance_scale": request.cfg_scale}

    def sampling_fields(self, request: GenerationRequest) -> dict[str, str]:
        return {
            "Sampler": get_sampler(request.sampler or DEFAULT_SAMPLER).name,
            "CFG scale": f"{request.cfg_scale:g}",
        }

    def module_fields(self, parts: Mapping[str, Path]) -> dict[str, str]:
        return {}
