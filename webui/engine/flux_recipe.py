"""FLUX.1's generation recipe: flow-matching Euler (the shift from the model's scheduler config;
[dev] shifts dynamically with `mu` from the image's token count, computed by the pipeline), the
distilled guidance input ([dev] only), true CFG with the negative prompt only when `cfg_scale` > 1
(Forge's rule; 1 = off), sizes in multiples of 16; LoRAs through the native patcher (every
FLUX.1 format, `te1` = CLIP-L, `te2` = T5), no embeddings yet; hires fix through
FluxImg2ImgPipeline on the unpacked latents, with its own distilled guidance (Forge's)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from webui.arch import FluxVariant
from webui.engine.flux_encoding import encode_flux_prompts
from webui.engine.hires import StrengthRounding
from webui.engine.recipe import GenerationDefaults
from webui.engine.request import GenerationRequest, RequestError
from webui.engine.samplers import FLOW_MATCH_EULER
from webui.networks.library import Embedding

# VAE downscale 8, then 2x2 latent patches per transformer token
SIZE_MULTIPLE: Final = 16
DISTILLED_CFG_KEY: Final = "Distilled CFG Scale"  # Forge's infotext name
HIRES_DISTILLED_CFG_KEY: Final = "Hires Distilled CFG Scale"  # Forge's, its hires pass's
# Forge's "Module N" fields list the separate files: the VAE, then the text encoders
MODULE_ORDER: Final = ("vae", "text_encoder", "text_encoder_2")

_DEFAULTS = {
    FluxVariant.DEV: GenerationDefaults(steps=20, cfg_scale=1.0, sampler=FLOW_MATCH_EULER.name),
    FluxVariant.SCHNELL: GenerationDefaults(steps=4, cfg_scale=1.0, sampler=FLOW_MATCH_EULER.name),
}


@dataclass(frozen=True)
class FluxRecipe:
    variant: FluxVariant

    @property
    def defaults(self) -> GenerationDefaults:
        return _DEFAULTS[self.variant]

    @property
    def applies_loras(self) -> bool:
        return True  # native patcher, or the diffusers fallback's FLUX.1 loader

    @property
    def uses_embeddings(self) -> bool:
        return False

    @property
    def runs_hires(self) -> bool:
        return True  # FluxImg2ImgPipeline, on the unpacked latents

    @property
    def size_multiple(self) -> int:
        return SIZE_MULTIPLE

    @property
    def img2img_rounding(self) -> StrengthRounding:
        return StrengthRounding.START_FLOORED  # FluxImg2ImgPipeline.get_timesteps

    def unpack_latents(
        self, pipe: Any, latents: torch.Tensor, width: int, height: int
    ) -> torch.Tensor:
        # FluxPipeline returns 2x2 patches as tokens; FluxImg2ImgPipeline takes 16-channel maps
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)

    def img2img_size(self, width: int, height: int) -> dict[str, int]:
        return {"width": width, "height": height}  # else FluxImg2ImgPipeline renders 1024x1024

    def noise_shape(self, pipe: Any, request: GenerationRequest) -> tuple[int, int, int]:
        # FluxPipeline.prepare_latents: 16 channels at 1/8 size, rounded to the 2x2 patches
        factor = pipe.vae_scale_factor * 2
        channels = pipe.transformer.config.in_channels // 4
        return (channels, 2 * (request.height // factor), 2 * (request.width // factor))

    def pack_noise(self, pipe: Any, noise: Any) -> Any:
        batch, channels, height, width = noise.shape
        return pipe._pack_latents(noise, batch, channels, height, width)

    @property
    def guided(self) -> bool:
        """[dev] takes a guidance input; [schnell] does not."""
        return self.variant is FluxVariant.DEV

    def resolve(self, request: GenerationRequest, warnings: list[str]) -> GenerationRequest:
        for name in ("width", "height"):
            value = getattr(request, name)
            if value % SIZE_MULTIPLE:
                raise RequestError(
                    f"{name} must be a multiple of {SIZE_MULTIPLE} for FLUX.1 (got {value})"
                )
        euler = FLOW_MATCH_EULER.name
        if request.sampler and request.sampler.strip().lower() != euler.lower():
            warnings.append(
                f"sampler {request.sampler!r} is not available for FLUX.1; used {euler} "
                "(flow matching)"
            )
        if request.negative_prompt.strip() and request.cfg_scale <= 1:
            warnings.append(
                "the negative prompt is ignored on FLUX.1 unless CFG scale is above 1 (true CFG)"
            )
        return replace(request, sampler=euler)

    def scheduler(self, config: Mapping[str, Any], request: GenerationRequest) -> SchedulerMixin:
        return FLOW_MATCH_EULER.create(config)

    def conditioning(
        self, pipe: Any, request: GenerationRequest, embeddings: Sequence[Embedding]
    ) -> dict[str, Any]:
        positive = encode_flux_prompts(pipe, [request.prompt] * request.batch_size)
        args = {"prompt_embeds": positive.embeds, "pooled_prompt_embeds": positive.pooled}
        if request.cfg_scale > 1:  # true CFG: the negative prompt (even empty) is the other pass
            negative = encode_flux_prompts(pipe, [request.negative_prompt] * request.batch_size)
            args["negative_prompt_embeds"] = negative.embeds
            args["negative_pooled_prompt_embeds"] = negative.pooled
        return args

    def guidance(self, request: GenerationRequest) -> dict[str, Any]:
        # FluxPipeline: `guidance_scale` feeds [dev]'s guidance embedder (ignored by [schnell]),
        # `true_cfg_scale` > 1 with negative embeddings runs real CFG
        return {
            "guidance_scale": request.distilled_cfg_scale,
            "true_cfg_scale": max(request.cfg_scale, 1.0),
        }

    def sampling_fields(self, request: GenerationRequest) -> dict[str, str]:
        fields = {"Sampler": FLOW_MATCH_EULER.name, "CFG scale": f"{request.cfg_scale:g}"}
        if self.guided:
            fields[DISTILLED_CFG_KEY] = f"{request.distilled_cfg_scale:g}"
        if self.guided and request.hires is not None:
            # as Forge: written with every hires image of a model that takes distilled CFG
            hires_value = request.hires.distilled_cfg(request.distilled_cfg_scale)
            fields[HIRES_DISTILLED_CFG_KEY] = f"{hires_value:g}"
        return fields

    def module_fields(self, parts: Mapping[str, Path]) -> dict[str, str]:
        stems = [parts[c].stem for c in MODULE_ORDER if c in parts]
        return {f"Module {i}": stem for i, stem in enumerate(stems, start=1)}
